"""A new image layer from host files, reproducibly: what `ocibox build` appends.

`LayerPlan` collects the entries (the program, --add files and folders, generated files) and
refuses conflicts; `write_layer` writes them as one gzip tar whose bytes depend only on the
entries: sorted, PAX format, owner 0:0 with no names, one fixed mtime, gzip without file name
and with mtime 0. Folders are walked without following symlinks: a symlink stays a symlink.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ocibox.errors import NotFound, OciboxError

GZIP_LEVEL = 6  # Docker's and Go's default


@dataclass
class Entry:
    """One tar entry of the new layer. `path` is relative to the image root, no leading slash."""

    path: str
    kind: str  # "dir", "file", "symlink" or "hardlink" (to `link`, an earlier entry's path)
    mode: int
    origin: str  # what put it here, for error messages
    source: Path | None = None
    data: bytes | None = None
    link: str = ""
    implicit: bool = False  # a parent folder nobody asked for


class LayerPlan:
    """The entries of the new layer, checked for conflicts as they are added."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> None:
        parts = entry.path.split("/")
        for i in range(1, len(parts)):
            self._parent("/".join(parts[:i]), entry)
        old = self.entries.get(entry.path)
        if old is not None:
            if old.kind == "dir" and entry.kind == "dir":
                if old.implicit:
                    self.entries[entry.path] = entry
                return
            raise OciboxError(f"/{entry.path} would come from both {old.origin} and {entry.origin}")
        self.entries[entry.path] = entry

    def _parent(self, path: str, child: Entry) -> None:
        old = self.entries.get(path)
        if old is None:
            self.entries[path] = Entry(path, "dir", 0o755, child.origin, implicit=True)
        elif old.kind != "dir":
            raise OciboxError(
                f"/{path} from {old.origin} is not a folder, but {child.origin} puts /{child.path} in it"
            )

    def sorted(self, with_implicit: bool) -> list[Entry]:
        kept = [e for e in self.entries.values() if with_implicit or not e.implicit]
        return sorted(kept, key=lambda e: e.path.split("/"))


def image_path(dest: str) -> str:
    """`/usr/local/bin/x` → `usr/local/bin/x`; refuses paths that climb out of the root."""
    parts = [p for p in dest.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OciboxError(f"invalid destination {dest!r}: '..' is not allowed")
    if not parts:
        raise OciboxError(f"invalid destination {dest!r}: it names the image root")
    return "/".join(parts)


def parse_add(spec: str) -> tuple[Path, str]:
    """`SRC:DEST` → (SRC, DEST). DEST may end in `/` to mean "into this folder"."""
    src, sep, dest = spec.rpartition(":")
    if not sep or not src or not dest:
        raise OciboxError(f"invalid --add {spec!r}: expected SRC:DEST, e.g. ./static:/srv/static")
    return Path(src), dest


def plan_add(plan: LayerPlan, src: Path, dest: str) -> None:
    """Files and folders of one --add. Folders recursively; symlinks stay symlinks, never followed."""
    origin = f"--add {src}"
    try:
        top = src.stat()  # the named SRC itself may be a symlink: the user asked for what it names
    except FileNotFoundError:
        raise NotFound(f"--add: no such file or folder: {src}") from None
    except OSError as exc:
        raise OciboxError(f"--add: cannot read {src}: {exc.strerror}") from None
    if stat.S_ISREG(top.st_mode):
        target = dest.rstrip("/") + "/" + src.name if dest.endswith("/") else dest
        _check_readable(src)
        plan.add(Entry(image_path(target), "file", stat.S_IMODE(top.st_mode), origin, source=src))
    elif stat.S_ISDIR(top.st_mode):
        root = image_path(dest)
        plan.add(Entry(root, "dir", stat.S_IMODE(top.st_mode), origin))
        _plan_tree(plan, src, root, origin, {})
    else:
        raise OciboxError(f"--add: {src} is neither a file nor a folder")


def _plan_tree(
    plan: LayerPlan, folder: Path, into: str, origin: str, inodes: dict[tuple[int, int], str]
) -> None:
    """Walk `folder` in sorted order (the tar's order); files hard-linked together stay hard links."""
    try:
        children = sorted(os.scandir(folder), key=lambda d: d.name)
    except OSError as exc:
        raise OciboxError(f"--add: cannot read folder {folder}: {exc.strerror}") from None
    for child in children:
        path = Path(child.path)
        st = child.stat(follow_symlinks=False)
        name = f"{into}/{child.name}"
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            plan.add(Entry(name, "symlink", 0o777, origin, link=os.readlink(path)))
        elif stat.S_ISDIR(st.st_mode):
            plan.add(Entry(name, "dir", mode, origin))
            _plan_tree(plan, path, name, origin, inodes)
        elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and (st.st_dev, st.st_ino) in inodes:
            plan.add(Entry(name, "hardlink", mode, origin, link=inodes[st.st_dev, st.st_ino]))
        elif stat.S_ISREG(st.st_mode):
            _check_readable(path)
            plan.add(Entry(name, "file", mode, origin, source=path))
            if st.st_nlink > 1:
                inodes[st.st_dev, st.st_ino] = name
        else:
            raise OciboxError(f"--add: {path} is a device, socket or pipe: only files, folders, symlinks")


def _check_readable(path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise OciboxError(f"cannot read {path}: {exc.strerror}") from None


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts the bytes it passes on."""

    def __init__(self, target: BinaryIO | None) -> None:
        super().__init__()
        self.target = target
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:  # type: ignore[override]
        self.hash.update(data)
        self.size += len(data)
        if self.target is not None:
            self.target.write(data)
        return len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


@dataclass(frozen=True)
class LayerBlob:
    path: Path  # the gzip blob on disk
    digest: str
    size: int
    diff_id: str


def write_layer(entries: list[Entry], mtime: int, into: Path) -> LayerBlob:
    """A gzip tar layer of `entries` in the folder `into`; the same entries give the same bytes."""
    fd, name = tempfile.mkstemp(dir=into, prefix="layer-")
    with os.fdopen(fd, "wb") as out:
        compressed = _Hashing(out)
        gz_file = gzip.GzipFile(filename="", mode="wb", fileobj=compressed, compresslevel=GZIP_LEVEL, mtime=0)
        with gz_file as gz:
            plain = _Hashing(gz)  # type: ignore[arg-type]
            with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                for entry in entries:
                    _write_entry(tar, entry, mtime)
    return LayerBlob(Path(name), compressed.digest, compressed.size, plain.digest)


def _write_entry(tar: tarfile.TarFile, entry: Entry, mtime: int) -> None:
    info = tarfile.TarInfo(entry.path)
    info.mtime = mtime
    info.mode = entry.mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif entry.kind in ("symlink", "hardlink"):
        info.type = tarfile.SYMTYPE if entry.kind == "symlink" else tarfile.LNKTYPE
        info.linkname = entry.link
        tar.addfile(info)
    elif entry.data is not None:
        info.size = len(entry.data)
        tar.addfile(info, io.BytesIO(entry.data))
    else:
        assert entry.source is not None
        try:
            with open(entry.source, "rb") as f:
                info.size = os.fstat(f.fileno()).st_size
                tar.addfile(info, f)
        except OSError as exc:
            raise OciboxError(f"cannot read {entry.source}: {exc.strerror or exc}") from None
        except tarfile.TarError as exc:
            raise OciboxError(f"{entry.source} changed while it was being read: {exc}") from None
