"""Which ocibox-runtime binary heads a compiled executable for a given architecture.

Architectures use the OCI names, amd64 and arm64. `runtime_for(arch)` looks, in order, at:

1. `$OCIBOX_RUNTIME_<ARCH>` (`OCIBOX_RUNTIME_ARM64`, `OCIBOX_RUNTIME_AMD64`); for the host's own
   architecture also `$OCIBOX_RUNTIME`, the variable `ocibox run` reads;
2. the copy installed beside the package: `ocibox/libexec/<arch>/ocibox-runtime` (and, for the host's
   own architecture, `ocibox/libexec/ocibox-runtime`);
3. the repository's builds: `runtime/build/<arch>/ocibox-runtime` from `make -C runtime ARCH=<arch>`;
   for the host's own architecture first `runtime/ocibox-runtime` from `make -C runtime`.

A file found there must be a static ELF executable for that architecture: a runtime of the wrong
architecture, or one needing shared libraries, would make an executable that fails only on the
user's machine.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from ocibox.elf import read_elf
from ocibox.errors import OciboxError

ARCHES = ("amd64", "arm64")
RUNTIME_NAME = "ocibox-runtime"

# platform.machine() → OCI architecture name.
_MACHINES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}

# The Debian cross compiler each architecture needs when it is not the host's.
_CROSS_COMPILERS = {"amd64": "gcc-x86-64-linux-gnu", "arm64": "gcc-aarch64-linux-gnu"}


def host_arch() -> str:
    """The OCI name of this machine's architecture (amd64, arm64, or the raw machine name)."""
    machine = platform.machine()
    return _MACHINES.get(machine.lower(), machine)


def build_command(arch: str) -> str:
    """The make command that builds the runtime for `arch` from a source checkout."""
    return "make -C runtime" if arch == host_arch() else f"make -C runtime ARCH={arch}"


def candidates(arch: str, package_dir: Path | None = None) -> list[Path]:
    """Where an installed or built runtime for `arch` may be, most specific first (no env)."""
    here = package_dir or Path(__file__).resolve().parent
    repo_runtime = here.parent.parent / "runtime"
    if arch != host_arch():
        return [here / "libexec" / arch / RUNTIME_NAME, repo_runtime / "build" / arch / RUNTIME_NAME]
    return [
        here / "libexec" / arch / RUNTIME_NAME,
        here / "libexec" / RUNTIME_NAME,
        repo_runtime / RUNTIME_NAME,  # `make -C runtime`: what `ocibox run` uses too
        repo_runtime / "build" / arch / RUNTIME_NAME,
    ]


def runtime_for(arch: str, package_dir: Path | None = None) -> Path:
    """The runtime binary for `arch` (see the module docstring); OciboxError if none is found."""
    if arch not in ARCHES:
        raise OciboxError(f"unsupported architecture {arch!r}: use one of {', '.join(ARCHES)}")
    variables = [f"OCIBOX_RUNTIME_{arch.upper()}"]
    if arch == host_arch():
        variables.append("OCIBOX_RUNTIME")
    for name in variables:
        if value := os.environ.get(name):
            return _checked(Path(value), arch, f"${name}")
    for path in candidates(arch, package_dir):
        if path.is_file():
            return _checked(path, arch, str(path))
    hint = build_command(arch)
    if arch != host_arch():
        hint += f" (needs {_CROSS_COMPILERS[arch]} and the :{arch} -dev packages of scripts/setup.sh)"
    raise OciboxError(
        f"no ocibox runtime for {arch}: build it with `{hint}` or set OCIBOX_RUNTIME_{arch.upper()}"
    )


def _checked(path: Path, arch: str, origin: str) -> Path:
    """`path` if it is an executable ELF file for `arch`; a clear OciboxError otherwise."""
    try:
        info = read_elf(path)
    except OSError as e:
        raise OciboxError(f"the ocibox runtime {origin} can't be read: {path}: {e.strerror}") from None
    if info is None:
        raise OciboxError(f"the ocibox runtime {origin} is not an ELF executable: {path}")
    if info.architecture != arch:
        found = info.architecture or f"machine {info.machine}"
        raise OciboxError(f"the ocibox runtime {origin} is for {found}, not {arch}: {path}")
    if info.dynamic:
        raise OciboxError(f"the ocibox runtime {origin} is dynamically linked, it must be static: {path}")
    if not os.access(path, os.X_OK):
        raise OciboxError(f"the ocibox runtime {origin} is not executable: {path}")
    return path
