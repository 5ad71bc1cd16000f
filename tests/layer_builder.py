"""Build tar layers and OCI image layouts in memory for the unpack tests (no Docker, no network)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

MTIME = 1_600_000_000


@dataclass
class Entry:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    mtime: int = MTIME
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)


def F(name: str, data: bytes | str = b"", mode: int = 0o644, **kw) -> Entry:  # noqa: N802
    return Entry(name, tarfile.REGTYPE, data.encode() if isinstance(data, str) else data, mode, **kw)


def D(name: str, mode: int = 0o755, **kw) -> Entry:  # noqa: N802
    return Entry(name, tarfile.DIRTYPE, mode=mode, **kw)


def S(name: str, target: str, **kw) -> Entry:  # noqa: N802
    return Entry(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **kw)


def H(name: str, target: str, **kw) -> Entry:  # noqa: N802
    return Entry(name, tarfile.LNKTYPE, linkname=target, **kw)


def FIFO(name: str, mode: int = 0o644) -> Entry:  # noqa: N802
    return Entry(name, tarfile.FIFOTYPE, mode=mode)


def CHR(name: str, major: int, minor: int, mode: int = 0o666) -> Entry:  # noqa: N802
    return Entry(name, tarfile.CHRTYPE, mode=mode, devmajor=major, devminor=minor)


def WH(name: str) -> Entry:  # noqa: N802
    """A whiteout for `name` (`dir/.wh.base`)."""
    head, _, base = name.rpartition("/")
    return F((head + "/" if head else "") + ".wh." + base)


def OPQ(folder: str) -> Entry:  # noqa: N802
    return F(folder.rstrip("/") + "/.wh..wh..opq")


def tar_bytes(entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = e.type
            info.mode = e.mode
            info.uid, info.gid = e.uid, e.gid
            info.mtime = e.mtime
            info.linkname = e.linkname
            info.devmajor, info.devminor = e.devmajor, e.devminor
            if e.pax:
                info.pax_headers = dict(e.pax)
            if e.type == tarfile.REGTYPE:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return out.getvalue()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_layout(layout: Path, tag: str, layers: list[bytes], config: dict | None = None) -> dict:
    """An OCI image layout holding one image of gzip `layers` (uncompressed tars given), tagged `tag`.
    Returns the image config written."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = sha256(data)
        (blobs / digest[7:]).write_bytes(data)
        return digest

    descs = []
    for raw in layers:
        blob = gz(raw)
        descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": put(blob),
                "size": len(blob),
            }
        )
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(raw) for raw in layers]},
    }
    if config:
        cfg["config"].update(config)
    cfg_bytes = json.dumps(cfg).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": put(cfg_bytes),
            "size": len(cfg_bytes),
        },
        "layers": descs,
    }
    man_bytes = json.dumps(manifest).encode()
    index_path = layout / "index.json"
    index = (
        json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    )
    index["manifests"].append(
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": put(man_bytes),
            "size": len(man_bytes),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }
    )
    index_path.write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return cfg


def tree(root: Path, skip_xattr: bool = True) -> dict[str, tuple]:
    """Every path under root: (type, mode, size, sha256 or link target, hardlink group)."""
    out: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", 0, 0, os.readlink(p), None)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, 0, "", None)
            elif stat.S_ISREG(st.st_mode):
                group = None
                if st.st_nlink > 1:
                    group = inodes.setdefault(st.st_ino, rel)
                out[rel] = ("file", mode, st.st_size, hashlib.sha256(p.read_bytes()).hexdigest(), group)
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = ("fifo", mode, 0, "", None)
            else:
                out[rel] = ("dev", mode, 0, f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}", None)
    # hardlink groups named by their first member, independent of walk order
    groups: dict[str, list[str]] = {}
    for rel, t in out.items():
        if t[4] is not None:
            groups.setdefault(t[4], []).append(rel)
    rename = {g: min(members) for g, members in groups.items()}
    return {rel: (t[0], t[1], t[2], t[3], rename.get(t[4]) if t[4] else None) for rel, t in out.items()}
