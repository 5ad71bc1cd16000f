"""Which runtime binary heads a compiled executable: `ocibox.runtimes.runtime_for(arch)`.

A user compiling for an architecture gets the runtime built for it (an environment override, the
copy installed beside the package, or the repository's build), and a clear error naming the make
command when there is none, or when the file found is for another architecture or not static.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ocibox.errors import OciboxError
from ocibox.runtimes import host_arch, runtime_for

REPO = Path(__file__).resolve().parent.parent
NATIVE = REPO / "runtime" / "ocibox-runtime"
OTHER = "arm64" if host_arch() == "amd64" else "amd64"
VARIABLES = ("OCIBOX_RUNTIME", "OCIBOX_RUNTIME_AMD64", "OCIBOX_RUNTIME_ARM64")


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def native_runtime() -> Path:
    if not NATIVE.exists():
        pytest.skip("runtime/ocibox-runtime is not built (make -C runtime)")
    return NATIVE


def fake_package(tmp_path: Path) -> Path:
    """An installed layout without a repository around it: site-packages/ocibox."""
    package = tmp_path / "site-packages" / "ocibox"
    package.mkdir(parents=True)
    return package


def test_the_host_architecture_uses_the_native_build(native_runtime):
    assert runtime_for(host_arch()) == native_runtime


def test_ocibox_runtime_overrides_the_native_one(native_runtime, tmp_path, monkeypatch):
    copy = tmp_path / "my-runtime"
    shutil.copy2(native_runtime, copy)
    monkeypatch.setenv("OCIBOX_RUNTIME", str(copy))
    assert runtime_for(host_arch()) == copy
    monkeypatch.setenv(f"OCIBOX_RUNTIME_{host_arch().upper()}", str(native_runtime))
    assert runtime_for(host_arch()) == native_runtime, "the per-architecture variable comes first"


def test_a_runtime_installed_beside_the_package_is_found(native_runtime, tmp_path):
    package = fake_package(tmp_path)
    installed = package / "libexec" / host_arch() / "ocibox-runtime"
    installed.parent.mkdir(parents=True)
    shutil.copy2(native_runtime, installed)
    assert runtime_for(host_arch(), package_dir=package) == installed


def test_a_missing_cross_runtime_names_the_make_command(tmp_path):
    with pytest.raises(OciboxError) as error:
        runtime_for(OTHER, package_dir=fake_package(tmp_path))
    message = str(error.value)
    assert f"make -C runtime ARCH={OTHER}" in message
    assert f"OCIBOX_RUNTIME_{OTHER.upper()}" in message


def test_a_runtime_of_another_architecture_is_refused(native_runtime, monkeypatch):
    monkeypatch.setenv(f"OCIBOX_RUNTIME_{OTHER.upper()}", str(native_runtime))
    with pytest.raises(OciboxError, match=f"is for {host_arch()}, not {OTHER}"):
        runtime_for(OTHER)


def test_a_dynamically_linked_runtime_is_refused(monkeypatch):
    monkeypatch.setenv("OCIBOX_RUNTIME", "/bin/ls")
    with pytest.raises(OciboxError, match="dynamically linked"):
        runtime_for(host_arch())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/no/such/runtime", "can't be read: /no/such/runtime: No such file or directory"),
        ("/etc/passwd", "not an ELF"),
    ],
)
def test_a_bad_override_says_what_is_wrong(monkeypatch, value, message):
    monkeypatch.setenv(f"OCIBOX_RUNTIME_{OTHER.upper()}", value)
    with pytest.raises(OciboxError, match=message):
        runtime_for(OTHER)


def test_an_unknown_architecture_is_refused():
    with pytest.raises(OciboxError, match="unsupported architecture 'riscv64'"):
        runtime_for("riscv64")
