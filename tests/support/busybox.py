"""The busybox test images, built from Debian's busybox-static in a second.

Two layers: (1) /bin/busybox with every applet as a symlink to it; (2) users and homes:
/etc/passwd and /etc/group with root, app (1000) and nobody (65534), /root, /home/app, /tmp.
Config: Cmd ["sh"], Env PATH. The arm64 image uses the real arm64 busybox-static .deb.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from .layout import Entry, LayerBlob, Layout

HOST_BUSYBOX = Path("/bin/busybox")
DEB_CACHE = Path("/var/cache/ocibox-tests/debs")
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

PASSWD = """root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:app:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """root:x:0:
app:x:1000:
nogroup:x:65534:
"""

PLATFORMS = {
    "amd64": {"architecture": "amd64", "os": "linux"},
    "arm64": {"architecture": "arm64", "os": "linux", "variant": "v8"},
}


def applets() -> list[str]:
    """Applet paths ("bin/sh", "usr/bin/awk", …) as Debian's busybox-static installs them."""
    out = subprocess.run([str(HOST_BUSYBOX), "--list-full"], check=True, capture_output=True, text=True)
    return sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})


def arm64_busybox(workdir: Path) -> Path:
    """/bin/busybox from the arm64 busybox-static .deb (downloaded by setup.sh, or now)."""
    debs = sorted(DEB_CACHE.glob("busybox-static_*_arm64.deb"))
    if not debs:
        DEB_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["apt-get", "download", "-q", "busybox-static:arm64"],
            cwd=DEB_CACHE,
            check=True,
            capture_output=True,
        )
        debs = sorted(DEB_CACHE.glob("busybox-static_*_arm64.deb"))
    target = workdir / "busybox-arm64"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(target)], check=True)
    return target / "bin" / "busybox"


def busybox_entries(binary: Path) -> list[Entry]:
    """Layer 1: the binary and its applet symlinks, with every parent folder."""
    links = [a for a in applets() if a != "bin/busybox"]
    dirs = sorted(
        {"bin", "sbin", "usr", "usr/bin", "usr/sbin"} | {a.rsplit("/", 1)[0] for a in links if "/" in a}
    )
    entries = [Entry(d, "dir", 0o755) for d in dirs]
    entries.append(Entry("bin/busybox", "file", 0o755, source=binary))
    entries += [Entry(a, "symlink", 0o777, link="/bin/busybox") for a in links]
    return entries


def users_entries() -> list[Entry]:
    """Layer 2: users, groups and their folders."""
    return [
        Entry("etc", "dir", 0o755),
        Entry("etc/group", "file", 0o644, data=GROUP.encode()),
        Entry("etc/hostname", "file", 0o644, data=b"busybox\n"),
        Entry("etc/passwd", "file", 0o644, data=PASSWD.encode()),
        Entry("home", "dir", 0o755),
        Entry("home/app", "dir", 0o755, uid=1000, gid=1000),
        Entry("root", "dir", 0o700),
        Entry("tmp", "dir", 0o1777),
    ]


def image_config(arch: str) -> dict:
    platform = PLATFORMS[arch]
    config = {"created": "2024-01-01T00:00:00Z", "architecture": platform["architecture"], "os": "linux"}
    if "variant" in platform:
        config["variant"] = platform["variant"]
    config["config"] = {"Env": [PATH_ENV], "Cmd": ["sh"]}
    return config


HISTORY = ["busybox-static: /bin/busybox and its applets", "users: root, app (1000), nobody (65534)"]


def add_busybox(layout: Layout, binary: Path, arch: str, ref_name: str | None, compression="gzip") -> dict:
    layers: list[LayerBlob] = [
        layout.add_entries_layer(busybox_entries(binary), compression),
        layout.add_entries_layer(users_entries(), compression),
    ]
    return layout.add_image(layers, image_config(arch), ref_name, platform=PLATFORMS[arch], history=HISTORY)


def build_busybox_layouts(workdir: Path) -> dict[str, Path]:
    """All busybox OCI layouts the tests push, under `workdir`:

    busybox:              amd64, gzip, tag "latest"
    busybox-zstd:         amd64, zstd layers (skopeo 1.9 keeps gzip even with
                          --dest-compress-format zstd, so the layers are written as zstd here)
    busybox-uncompressed: amd64, uncompressed layers
    multiarch:            an OCI index of amd64 + arm64/v8
    """
    workdir = Path(workdir)
    layouts = {}
    gz = Layout(workdir / "busybox")
    add_busybox(gz, HOST_BUSYBOX, "amd64", "latest")
    layouts["busybox"] = gz.path

    zst = Layout(workdir / "busybox-zstd")
    add_busybox(zst, HOST_BUSYBOX, "amd64", "latest", compression="zstd")
    layouts["busybox-zstd"] = zst.path

    raw = Layout(workdir / "busybox-uncompressed")
    add_busybox(raw, HOST_BUSYBOX, "amd64", "latest", compression=None)
    layouts["busybox-uncompressed"] = raw.path

    multi = Layout(workdir / "multiarch")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        arm = arm64_busybox(Path(tmp))
        descs = [
            add_busybox(multi, HOST_BUSYBOX, "amd64", None),
            add_busybox(multi, arm, "arm64", None),
        ]
    multi.add_index(descs, "latest")
    layouts["multiarch"] = multi.path
    return layouts
