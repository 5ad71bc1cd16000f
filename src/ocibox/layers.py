"""Apply image layers (OCI changesets) to a root filesystem folder, safely and fast.

One layer is a tar stream, compressed with gzip or zstd or not at all (told apart by the first
bytes, not by the media type). A gzip layer file is inflated by ISA-L's `igzip -dc` (Debian's isal
package, three times zlib's speed, in its own process) when it is installed, else by zlib. Its
sha256 (the DiffID) is computed while it streams and checked against the image config. Entries
are applied as the OCI image-spec "Applying changesets" says:

- regular files, directories, symlinks, hardlinks (to this layer or a lower one), fifos, device
  nodes (as root), sparse files, PAX/GNU long names, modes (setuid/setgid/sticky), mtimes, xattrs;
- `.wh.NAME` removes NAME of a lower layer, `DIR/.wh..wh..opq` hides everything a lower layer put
  in DIR (same-layer entries stay, whatever their order in the tar);
- an existing path is replaced, except a directory replaced by a directory, which is kept.

Safety: `tarfile` is used only to parse headers; nothing goes through its extraction code. Every
entry's parent folder is resolved *inside* the root as a chroot would: `openat2(RESOLVE_IN_ROOT)`
from the root's directory fd, or, on kernels without it, a walk of no-follow `openat`s where a
symlink met on the way is resolved against the root, never against the host. The last component
is never followed (files are created O_EXCL|O_NOFOLLOW; an existing symlink there is replaced, not
written through). Hardlink targets are resolved the same way. Names whose `..` climb above the
root are refused with a LayerError naming the entry; absolute names are taken relative to the root
(as Docker does). Symlinks are stored exactly as the layer has them.

Rootless (unpacking as a user, or `rootless=True`): files are owned by the caller, and the image's
owner, group and mode are recorded in two places for the runtime to apply:

1. the `user.rootlesscontainers` xattr, as umoci writes it: a protobuf message with field 1 = uid
   and field 2 = gid (varints, zero fields omitted), on files and folders whose owner is not 0:0,
   where the filesystem allows user xattrs (never on symlinks, which can't carry them);
2. a metadata file beside the rootfs, `<rootfs>.meta` (see `meta_path`), in JSON lines, one object
   per path (relative to the rootfs, with a leading "/") whose recorded owner is not 0:0 or whose
   mode could not be applied as a user (setgid for a foreign group, device nodes):
   `{"path": "/etc/shadow", "type": "file", "uid": 0, "gid": 42, "mode": 416}`, plus
   `"rdev": [major, minor]` for "char"/"block" devices, which a user can't create and are skipped
   with a warning. It works on every filesystem. The caller maps to uid 0 in the container, so
   files without a record are root's.

Folders stay writable by the owner while layers are applied (a mode-0500 folder in one layer can
still receive files from the next); their real modes and mtimes are set once, deepest first, by
`Applier.finish`.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import hashlib
import io
import json
import os
import queue
import stat
import sys
import tarfile
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ocibox.errors import IntegrityError, LayerError

CHUNK = 1 << 20
MAX_SYMLINKS = 40
XATTR_ROOTLESS = "user.rootlesscontainers"
WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"

O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_SYS_OPENAT2 = 437  # x86_64, aarch64 and every other architecture since Linux 5.6
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_IN_ROOT = 0x10


def warn(message: str) -> None:
    print(f"ocibox: warning: {message}", file=sys.stderr)


# --- path resolution inside the root ------------------------------------------------------------


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _Openat2:
    """openat2(2) through ctypes, or None-like when the kernel (or seccomp) doesn't have it."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.syscall = self.libc.syscall
        self.syscall.restype = ctypes.c_long
        self.available = True
        try:
            fd = self.open(os.open("/", O_PATH_DIR), ".", O_PATH_DIR, _RESOLVE_IN_ROOT, close_dirfd=True)
            os.close(fd)
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG):
                self.available = False
            else:
                raise

    def open(self, dirfd: int, path: str, flags: int, resolve: int, close_dirfd: bool = False) -> int:
        how = _OpenHow(flags, 0, resolve)
        encoded = os.fsencode(path)
        try:
            for _ in range(16):
                fd = self.syscall(
                    ctypes.c_long(_SYS_OPENAT2),
                    ctypes.c_int(dirfd),
                    ctypes.c_char_p(encoded),
                    ctypes.byref(how),
                    ctypes.c_size_t(ctypes.sizeof(how)),
                )
                if fd >= 0:
                    return fd
                err = ctypes.get_errno()
                if err not in (errno.EAGAIN, errno.EINTR):
                    raise OSError(err, os.strerror(err), path)
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)
        finally:
            if close_dirfd:
                os.close(dirfd)


def clean_name(name: str, what: str = "entry") -> list[str]:
    """The components of a tar name inside the root. Absolute names are rooted like Docker does;
    a relative name whose `..` climbs above the root is refused."""
    if "\x00" in name:
        raise LayerError(f"{what} {name!r} has a NUL byte in its name")
    absolute = name.startswith("/")
    parts: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
            elif not absolute:
                raise LayerError(f"{what} {name!r} points outside the root")
            continue
        parts.append(comp)
    return parts


@dataclass
class _Resolver:
    """Opens folders of the root by path, as if the root were `/` (a chroot)."""

    root_fd: int
    openat2: _Openat2 | None
    created: list[list[str]] = field(default_factory=list)  # folders made on the way, to fix modes
    dir_mode: int = 0o755

    def open_dir(self, parts: list[str], create: bool) -> int:
        """An O_PATH fd of folder `parts`, following symlinks within the root. Missing folders are
        made when `create` (through dangling symlinks too, at their target inside the root)."""
        if not parts:
            return os.dup(self.root_fd)
        if self.openat2 is not None:
            try:
                return self.openat2.open(
                    self.root_fd, "/".join(parts), O_PATH_DIR, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS
                )
            except FileNotFoundError:
                if not create:
                    raise
        return self._walk(parts, create)

    def _walk(self, parts: list[str], create: bool) -> int:
        pending = list(reversed(parts))
        real: list[str] = []
        fds = [self.root_fd]
        links = 0
        try:
            while pending:
                comp = pending.pop()
                if comp in ("", "."):
                    continue
                if comp == "..":
                    if real:
                        real.pop()
                        os.close(fds.pop())
                    continue
                cur = fds[-1]
                try:
                    fd = os.open(comp, O_PATH_DIR | os.O_NOFOLLOW, dir_fd=cur)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(comp, self.dir_mode, dir_fd=cur)
                        self.created.append([*real, comp])
                    except FileExistsError:
                        pass  # a dangling symlink: the loop below follows it
                    pending.append(comp)
                    continue
                except NotADirectoryError:
                    try:
                        target = os.readlink(comp, dir_fd=cur)
                    except OSError as e:
                        if e.errno == errno.EINVAL:
                            where = "/".join([*real, comp])
                            raise NotADirectoryError(errno.ENOTDIR, "not a directory", where) from None
                        raise
                    links += 1
                    if links > MAX_SYMLINKS:
                        where = "/".join([*real, comp])
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), where) from None
                    if target.startswith("/"):
                        while len(fds) > 1:
                            os.close(fds.pop())
                        real = []
                    pending.extend(reversed(target.split("/")))
                    continue
                fds.append(fd)
                real.append(comp)
            return os.dup(fds[-1])
        finally:
            for fd in fds[1:]:
                os.close(fd)


# --- streams: decompression and DiffID ----------------------------------------------------------


def detect_compression(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return "none"


class LayerStream(io.RawIOBase):
    """The uncompressed bytes of a layer, decompressed and hashed in a thread (zlib, zstd and
    sha256 release the GIL) while the caller parses the tar. Memory stays bounded."""

    def __init__(self, raw: BinaryIO, name: str = "layer") -> None:
        super().__init__()
        self.name = name
        self.raw = raw
        self.digest = hashlib.sha256()
        self.size = 0
        self.compression = "none"
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._buf = memoryview(b"")
        self._eof = False
        self._pos = 0  # bytes handed out: tell(), and forward seeks for tarfile's "r:" mode
        self._thread = threading.Thread(target=self._produce, name="ocibox-decompress", daemon=True)
        self._thread.start()

    def readable(self) -> bool:
        return True

    def _put(self, item: bytes | None) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _emit(self, data: bytes) -> bool:
        if not data:
            return True
        self.digest.update(data)
        self.size += len(data)
        return self._put(data)

    def _produce(self) -> None:
        try:
            if self._igzip_ok():
                self._igunzip()
                self._put(None)
                return
            head = self.raw.read(CHUNK)
            self.compression = detect_compression(head)
            if self.compression == "gzip":
                self._gunzip(head)
            elif self.compression == "zstd":
                self._unzstd(head)
            else:
                chunk = head
                while chunk:
                    if not self._emit(chunk):
                        return
                    chunk = self.raw.read(CHUNK)
        except BaseException as e:  # handed to the reading thread
            self._error = e
        self._put(None)

    def _gunzip(self, head: bytes) -> None:
        d = zlib.decompressobj(wbits=31)
        fed = False  # has the current member seen any bytes?
        chunk = head
        while chunk:
            data = chunk
            while data:
                fed = True
                out = d.decompress(data, 4 * CHUNK)
                if not self._emit(out):
                    return
                if d.eof:  # concatenated gzip members are one stream
                    data = d.unused_data
                    d = zlib.decompressobj(wbits=31)
                    fed = False
                else:
                    data = d.unconsumed_tail
            chunk = self.raw.read(CHUNK)
        if fed or self.size == 0:
            raise zlib.error("truncated gzip stream")

    def _igzip_ok(self) -> bool:
        """Is the layer a gzip file on disk that ISA-L's igzip (Debian's isal, 3x zlib's speed)
        can read straight from its fd?"""
        if not isinstance(self.raw, io.FileIO):
            return False
        fd = self.raw.fileno()
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            head = os.pread(fd, 2, os.lseek(fd, 0, os.SEEK_CUR))
        except OSError:
            return False
        return detect_compression(head) == "gzip" and _igzip_path() is not None

    def _igunzip(self) -> None:
        """gzip through `igzip -dc` fed the layer's fd. Its output is checked as zlib's would be:
        igzip's exit status (bad data, truncation, CRC), then the file's last 8 bytes must be the
        trailer of the whole output (one member); anything else (several members, or bytes after
        the stream, which igzip ignores) is read again by zlib, which refuses trailing garbage.
        One case is not told apart: bytes after a one-member stream that end with a copy of its
        own trailer; the files unpacked are the same and their DiffID is checked all the same."""
        import subprocess

        self.compression = "gzip"
        fd = self.raw.fileno()
        start = os.lseek(fd, 0, os.SEEK_CUR)
        proc = subprocess.Popen(
            [_igzip_path() or "igzip", "-dcq"],
            stdin=fd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        crc = 0
        try:
            assert proc.stdout is not None and proc.stderr is not None
            out = proc.stdout.fileno()
            try:
                fcntl_pipe_size(out, 1 << 20)
            except OSError:
                pass
            while True:
                data = _read_full(out, CHUNK)
                if not data:
                    break
                crc = zlib.crc32(data, crc)
                if not self._emit(data):
                    return
            proc.stderr.read()
            if proc.wait() != 0:
                raise zlib.error("truncated or corrupt gzip stream")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for f in (proc.stdout, proc.stderr):
                if f is not None:
                    f.close()
        end = os.fstat(fd).st_size
        tail = os.pread(fd, 8, end - 8) if end - start >= 26 else b""
        whole = (
            len(tail) == 8
            and self.size > 0
            and tail == (crc.to_bytes(4, "little") + (self.size & 0xFFFFFFFF).to_bytes(4, "little"))
        )
        if not whole:
            _check_gzip(fd, start)

    def _unzstd(self, head: bytes) -> None:
        import zstandard

        class _Joined(io.RawIOBase):
            def __init__(self, first: bytes, rest: BinaryIO) -> None:
                self.first, self.rest = first, rest

            def readable(self) -> bool:
                return True

            def read(self, n: int = -1) -> bytes:
                if self.first:
                    out, self.first = self.first, b""
                    return out
                return self.rest.read(n if n and n > 0 else CHUNK)

            def readinto(self, b) -> int:  # type: ignore[override]
                data = self.read(len(b))
                b[: len(data)] = data
                return len(data)

        reader = zstandard.ZstdDecompressor().stream_reader(_Joined(head, self.raw), read_across_frames=True)
        while True:
            out = reader.read(CHUNK)
            if not out:
                return
            if not self._emit(out):
                return

    def readinto(self, b) -> int:  # type: ignore[override]
        while not self._buf:
            if self._eof:
                return 0
            item = self._queue.get()
            if item is None:
                self._eof = True
                if self._error is not None:
                    raise self._error
                return 0
            self._buf = memoryview(item)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self._pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self.readall()
        while not self._buf:
            if self._eof:
                return b""
            item = self._queue.get()
            if item is None:
                self._eof = True
                if self._error is not None:
                    raise self._error
                return b""
            self._buf = memoryview(item)
        out = bytes(self._buf[:n])
        self._buf = self._buf[n:]
        self._pos += len(out)
        return out

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Forward only (the bytes between are read and dropped), as tarfile skips entry data."""
        target = offset if whence == os.SEEK_SET else self._pos + offset if whence == os.SEEK_CUR else -1
        if target < self._pos:
            raise io.UnsupportedOperation("a layer stream only seeks forward")
        while self._pos < target and self.read(min(CHUNK, target - self._pos)):
            pass
        return self._pos

    def drain(self) -> None:
        """Read to the end (the bytes after the tar's end marker count in the DiffID)."""
        while self.read(CHUNK):
            pass

    def close(self) -> None:
        self._stop.set()
        super().close()

    def hexdigest(self) -> str:
        return "sha256:" + self.digest.hexdigest()


def _igzip_path() -> str | None:
    for folder in ("/usr/bin", "/usr/local/bin", "/bin"):
        path = folder + "/igzip"
        if os.access(path, os.X_OK):
            return path
    return None


def fcntl_pipe_size(fd: int, size: int) -> None:
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)


def _read_full(fd: int, n: int) -> bytes:
    """Up to n bytes from a pipe, fewer only at its end."""
    first = os.read(fd, n)
    if not first or len(first) == n:
        return first
    parts = [first]
    got = len(first)
    while got < n:
        data = os.read(fd, n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _check_gzip(fd: int, start: int) -> None:
    """Read the gzip stream at `start` of fd with zlib, output discarded: zlib.error unless it is
    one or more complete members and nothing else."""
    d = zlib.decompressobj(wbits=31)
    fed = False
    out = 0
    pos = start
    while True:
        chunk = os.pread(fd, CHUNK, pos)
        if not chunk:
            break
        pos += len(chunk)
        data = chunk
        while data:
            fed = True
            out += len(d.decompress(data, 4 * CHUNK))
            if d.eof:
                data = d.unused_data
                d = zlib.decompressobj(wbits=31)
                fed = False
            else:
                data = d.unconsumed_tail
    if fed or out == 0:
        raise zlib.error("truncated gzip stream")


def tar_xattrs(m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    """The extended attributes a tar entry carries, as (name, value): GNU tar/Docker's
    SCHILY.xattr.NAME (value as bytes in the PAX string) and libarchive's LIBARCHIVE.xattr.NAME
    (base64)."""
    out = []
    for key, value in (m.pax_headers or {}).items():
        if key.startswith("SCHILY.xattr."):
            out.append((key[len("SCHILY.xattr.") :], value.encode("utf-8", "surrogateescape")))
        elif key.startswith("LIBARCHIVE.xattr."):
            out.append((key[len("LIBARCHIVE.xattr.") :], base64.b64decode(value + "==")))
    return out


# --- rootless ownership records ---------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


NOOP_ID = 0xFFFFFFFF  # rootlesscontainers' "unchanged": the owner, root in the container


def rootless_xattr(uid: int, gid: int) -> bytes:
    """umoci's `user.rootlesscontainers` value: protobuf `Resource{uint32 uid = 1; uint32 gid = 2}`,
    with 0 written as NoopID as umoci does."""
    return b"\x08" + _varint(uid or NOOP_ID) + b"\x10" + _varint(gid or NOOP_ID)


def parse_rootless_xattr(data: bytes) -> tuple[int, int]:
    values = {1: 0, 2: 0}
    i = 0
    while i < len(data):
        key = data[i]
        i += 1
        n = shift = 0
        while True:
            byte = data[i]
            i += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        values[key >> 3] = 0 if n == NOOP_ID else n
    return values[1], values[2]


def meta_path(root: Path) -> Path:
    """The ownership records of a rootless rootfs: `<rootfs>.meta` beside it."""
    root = Path(root)
    return root.with_name(root.name + ".meta")


def read_meta(path: Path) -> dict[str, dict]:
    records: dict[str, dict] = {}
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                records[rec["path"]] = rec
    return records


# --- applying entries ---------------------------------------------------------------------------

_TYPES = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.GNUTYPE_SPARSE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


@dataclass
class _PendingDir:
    mode: int
    mtime_ns: int | None


@dataclass
class Applier:
    """Applies layers one after the other to `root`; `finish()` sets folder modes and mtimes and
    writes the rootless records. `rootless` defaults to "not running as root"."""

    root: Path
    rootless: bool | None = None
    use_openat2: bool = True
    entries: int = 0
    _root_fd: int = -1
    _resolver: _Resolver | None = None
    _dirs: dict[str, _PendingDir] = field(default_factory=dict)
    _records: dict[str, dict] = field(default_factory=dict)
    _cache: dict[str, int] = field(default_factory=dict)
    _written: set[str] = field(default_factory=set)
    _touched: set[str] = field(default_factory=set)
    _xattr_ok: bool = True
    _warned: set[str] = field(default_factory=set)
    _retired: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.rootless is None:
            self.rootless = os.geteuid() != 0
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_fd = os.open(self.root, O_PATH_DIR)
        opener = _Openat2() if self.use_openat2 else None
        if opener is not None and not opener.available:
            opener = None
        # as a user, folders stay owner-writable until finish()
        self._resolver = _Resolver(self._root_fd, opener, dir_mode=0o700 if self.rootless else 0o755)

    # -- public ------------------------------------------------------------------------------

    def apply(self, stream: BinaryIO, layer: str = "layer") -> None:
        """Apply one uncompressed tar stream."""
        self._written = set()
        self._touched = set()
        # tarfile's "r:" mode reads the stream itself, skipping forward with seek (twice the speed
        # of "r|", which copies everything through its own 10 KiB buffer); "r|" for other streams
        mode = "r:" if isinstance(stream, LayerStream) else "r|"
        try:
            tar = tarfile.open(fileobj=stream, mode=mode, encoding="utf-8", errors="surrogateescape")
        except tarfile.ReadError as e:
            raise LayerError(f"{layer}: not a tar archive ({e})") from None
        with tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.TarError as e:
                    raise LayerError(f"{layer}: bad tar header ({e})") from None
                except EOFError:
                    raise LayerError(f"{layer}: truncated tar archive") from None
                if member is None:
                    break
                tar.members.clear()  # headers aren't kept: memory stays flat whatever the entry count
                self.entries += 1
                try:
                    self._entry(tar, member)
                    if self._retired:
                        self._close_retired()
                except LayerError:
                    raise
                except (tarfile.TarError, EOFError) as e:
                    raise LayerError(f"{layer}: entry {member.name!r}: truncated or bad data ({e})") from None
                except OSError as e:
                    reason = e.strerror or str(e)
                    raise LayerError(f"{layer}: entry {member.name!r}: {reason}") from None
                except ValueError as e:  # NUL bytes in names, xattrs, link targets
                    raise LayerError(f"{layer}: entry {member.name!r}: {e}") from None
        self._flush_cache()

    def finish(self) -> None:
        """Folder modes and mtimes, deepest first; the rootless records; close the root."""
        self._flush_cache()
        for path in sorted(self._dirs, key=lambda p: p.count("/") if p else -1, reverse=True):
            pending = self._dirs[path]
            parts = path.split("/") if path else []
            try:
                fd = self._open_dir_exact(parts)
            except OSError:
                continue  # removed by a later layer
            try:
                real = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                os.close(fd)
                continue
            os.close(fd)
            try:
                os.fchmod(real, pending.mode)
                if pending.mtime_ns is not None:
                    os.utime(real, ns=(pending.mtime_ns, pending.mtime_ns))
            finally:
                os.close(real)
        self._dirs.clear()
        if self.rootless or self._records:
            self._write_meta()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def close(self) -> None:
        self._flush_cache()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    # -- helpers -------------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn(message)

    def _flush_cache(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()
        self._close_retired()

    def _invalidate(self) -> None:
        """Forget cached folders (a folder or symlink was removed) but keep their fds open until
        the current entry is done with them."""
        self._retired.extend(self._cache.values())
        self._cache.clear()

    def _close_retired(self) -> None:
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()

    def _parent(self, parts: list[str], create: bool = True) -> int:
        """A cached O_PATH fd of the folder holding the entry `parts` (not to be closed)."""
        key = "/".join(parts[:-1])
        fd = self._cache.get(key)
        if fd is not None:
            return fd
        if len(self._cache) >= 64:
            self._invalidate()
        assert self._resolver is not None
        self._resolver.created = []
        fd = self._resolver.open_dir(parts[:-1], create)
        for made in self._resolver.created:
            p = "/".join(made)
            self._dirs[p] = _PendingDir(0o755, None)
            self._records.pop(p, None)
        self._cache[key] = fd
        return fd

    def _open_dir_exact(self, parts: list[str]) -> int:
        """A folder by its exact path, following no symlink at all."""
        fd = os.dup(self._root_fd)
        for comp in parts:
            try:
                nfd = os.open(comp, O_PATH_DIR | os.O_NOFOLLOW, dir_fd=fd)
            finally:
                os.close(fd)
            fd = nfd
        return fd

    def _mark(self, parts: list[str]) -> None:
        path = "/".join(parts)
        self._written.add(path)
        for i in range(len(parts) - 1, 0, -1):
            p = "/".join(parts[:i])
            if p in self._touched:
                break
            self._touched.add(p)

    def _remove(self, pfd: int, name: str) -> None:
        """Remove whatever is at `name` in folder `pfd` (a folder with all it holds)."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self._invalidate()
            self._rmtree(pfd, name)
        else:
            if stat.S_ISLNK(st.st_mode):
                self._invalidate()
            os.unlink(name, dir_fd=pfd)

    def _rmtree(self, pfd: int, name: str) -> None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        except PermissionError:
            os.chmod(name, 0o700, dir_fd=pfd, follow_symlinks=True)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o700 != 0o700 and st.st_uid == os.geteuid():
                os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
            with os.scandir(fd) as it:
                children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            for child, is_dir in children:
                if is_dir:
                    self._rmtree(fd, child)
                else:
                    os.unlink(child, dir_fd=fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=pfd)

    def _hide_lower(self, dir_parts: list[str], parent_fd: int | None = None) -> None:
        """Remove what lower layers put under a folder, keeping this layer's entries. The folder
        is found inside the root (through symlinks, as a chroot would); its subfolders exactly."""
        try:
            if parent_fd is None:
                assert self._resolver is not None
                fd = self._resolver.open_dir(dir_parts, create=False)
                try:
                    rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
                finally:
                    os.close(fd)
            else:
                rfd = os.open(
                    dir_parts[-1],
                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                    dir_fd=parent_fd,
                )
        except OSError:
            return
        try:
            with os.scandir(rfd) as it:
                children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            for child, is_dir in children:
                path = "/".join([*dir_parts, child])
                if path in self._written or path in self._touched:
                    if is_dir:
                        self._hide_lower([*dir_parts, child], rfd)
                    continue
                self._invalidate()
                if is_dir:
                    self._rmtree(rfd, child)
                else:
                    os.unlink(child, dir_fd=rfd)
        finally:
            os.close(rfd)

    # -- one entry ---------------------------------------------------------------------------------

    def _entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        kind = _TYPES.get(m.type)
        if kind is None:
            raise LayerError(f"entry {m.name!r}: unsupported tar entry type {m.type!r}")
        parts = clean_name(m.name)
        if not parts:
            if kind == "dir":  # the root itself
                self._dirs[""] = _PendingDir(stat.S_IMODE(m.mode), _ns(m))
                self._set_owner_record("", m, kind)
                if not self.rootless:
                    self._chown(m, "", "dir", self._root_fd, ".")
                return
            raise LayerError(f"entry {m.name!r}: a {kind} can't replace the root folder")
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(m, parts)
            return
        pfd = self._parent(parts)
        path = "/".join(parts)
        self._mark(parts)
        if kind == "file":
            self._file(tar, m, pfd, base, path)
        elif kind == "dir":
            self._dir(m, pfd, base, path)
        elif kind == "symlink":
            self._create(lambda: os.symlink(m.linkname, base, dir_fd=pfd), pfd, base, path)
            if not self.rootless:
                self._chown(m, path, kind, pfd, base)
            self._set_owner_record(path, m, kind)
            os.utime(base, ns=(_ns(m), _ns(m)), dir_fd=pfd, follow_symlinks=False)
        elif kind == "hardlink":
            self._hardlink(m, pfd, base, path)
        elif kind == "fifo":
            self._create(lambda: os.mkfifo(base, 0o600, dir_fd=pfd), pfd, base, path)
            self._finish_special(m, pfd, base, path, kind)
        else:  # char, block
            rec = {
                "path": "/" + path,
                "type": kind,
                "uid": m.uid,
                "gid": m.gid,
                "mode": stat.S_IMODE(m.mode),
                "rdev": [m.devmajor, m.devminor],
            }
            if self.rootless:
                self._skip_device(pfd, base, path, rec)
                return
            devtype = stat.S_IFCHR if kind == "char" else stat.S_IFBLK
            dev = os.makedev(m.devmajor, m.devminor)
            try:
                self._create(lambda: os.mknod(base, 0o600 | devtype, dev, dir_fd=pfd), pfd, base, path)
            except PermissionError:  # root of a user namespace: no device nodes either
                self._skip_device(pfd, base, path, rec)
                return
            self._finish_special(m, pfd, base, path, kind)

    def _skip_device(self, pfd: int, base: str, path: str, rec: dict) -> None:
        self._warn_once("dev", "device nodes can't be made as a user: skipped (recorded in .meta)")
        self._remove(pfd, base)
        self._records[path] = rec

    def _chown(
        self, m: tarfile.TarInfo, path: str, kind: str, pfd: int = -1, base: str = "", fd: int = -1
    ) -> None:
        """Real ownership (of fd, or of base in folder pfd, never following a symlink); as root of
        a user namespace an owner outside its ranges can't be set (EINVAL): the file stays root's
        and the image's owner goes to the .meta records."""
        try:
            if fd >= 0:
                os.fchown(fd, m.uid, m.gid)
            else:
                os.chown(base, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EPERM):
                raise
            self._warn_once(
                "chown",
                f"owner {m.uid}:{m.gid} of {m.name!r} is outside this user's id "
                "ranges: kept as root's (recorded in .meta)",
            )
            self._records[path] = {
                "path": "/" + path,
                "type": kind,
                "uid": m.uid,
                "gid": m.gid,
                "mode": stat.S_IMODE(m.mode),
            }

    def _create(self, make, pfd: int, base: str, path: str) -> None:
        try:
            make()
        except FileExistsError:
            self._remove(pfd, base)
            make()

    def _finish_special(self, m: tarfile.TarInfo, pfd: int, base: str, path: str, kind: str) -> None:
        if not self.rootless:
            self._chown(m, path, kind, pfd, base)
        os.chmod(base, stat.S_IMODE(m.mode), dir_fd=pfd)
        self._set_owner_record(path, m, kind)
        os.utime(base, ns=(_ns(m), _ns(m)), dir_fd=pfd, follow_symlinks=False)

    def _file(self, tar: tarfile.TarFile, m: tarfile.TarInfo, pfd: int, base: str, path: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(base, flags, 0o600, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, base)
            fd = os.open(base, flags, 0o600, dir_fd=pfd)
        try:
            if m.sparse is not None:
                self._copy_sparse(tar.fileobj, fd, m)
            elif m.size:
                self._copy(tar.fileobj, fd, m.size)
            if not self.rootless:
                self._chown(m, path, "file", fd=fd)
            mode = stat.S_IMODE(m.mode)
            os.fchmod(fd, mode)
            self._xattrs(m, fd)
            self._set_owner_record(path, m, "file", fd=fd)
            ns = _ns(m)
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)

    def _copy(self, src, fd: int, size: int) -> None:
        """Copy the entry's data straight from the tar stream (tarfile only parsed the header)."""
        done = 0
        while done < size:
            data = src.read(min(CHUNK, size - done))
            if not data:
                raise EOFError("unexpected end of data")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            done += len(data)

    def _copy_sparse(self, src, fd: int, m: tarfile.TarInfo) -> None:
        """A sparse entry: its data segments are stored one after the other; holes stay holes."""
        for offset, size in m.sparse or []:
            if offset < 0 or size < 0:
                raise LayerError(f"entry {m.name!r}: bad sparse map")
            os.lseek(fd, offset, os.SEEK_SET)
            self._copy(src, fd, size)
        os.ftruncate(fd, m.size)

    def _dir(self, m: tarfile.TarInfo, pfd: int, base: str, path: str) -> None:
        try:
            os.mkdir(base, self._resolver.dir_mode if self._resolver else 0o755, dir_fd=pfd)
        except FileExistsError:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                self._remove(pfd, base)
                os.mkdir(base, 0o700, dir_fd=pfd)
            elif self.rootless and st.st_mode & 0o700 != 0o700:
                os.chmod(base, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=pfd)  # a folder: lstat said so
        if not self.rootless:
            self._chown(m, path, "dir", pfd, base)
        self._dirs[path] = _PendingDir(stat.S_IMODE(m.mode), _ns(m))
        if m.pax_headers or (self.rootless and (m.uid or m.gid)):
            dfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            try:
                self._xattrs(m, dfd)
                self._set_owner_record(path, m, "dir", fd=dfd)
            finally:
                os.close(dfd)
        else:
            self._set_owner_record(path, m, "dir")

    def _hardlink(self, m: tarfile.TarInfo, pfd: int, base: str, path: str) -> None:
        target = clean_name(m.linkname, what=f"hardlink {m.name!r} to")
        if not target:
            raise LayerError(f"entry {m.name!r}: hardlink to the root folder")
        tpath = "/".join(target)
        if tpath == path:
            return  # a link to itself: nothing to do
        try:
            tfd = self._parent(target, create=False)
        except FileNotFoundError:
            raise LayerError(f"entry {m.name!r}: hardlink target {m.linkname!r} does not exist") from None

        def link() -> None:
            os.link(target[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)

        try:
            self._create(link, pfd, base, path)
        except FileNotFoundError:
            raise LayerError(f"entry {m.name!r}: hardlink target {m.linkname!r} does not exist") from None
        except PermissionError:
            st = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise LayerError(f"entry {m.name!r}: hardlink to a folder {m.linkname!r}") from None
            raise
        rec = self._records.get(tpath)
        if rec is not None:
            self._records[path] = {**rec, "path": "/" + path}
        else:
            self._records.pop(path, None)

    def _whiteout(self, m: tarfile.TarInfo, parts: list[str]) -> None:
        base = parts[-1]
        dir_parts = parts[:-1]
        if base == OPAQUE:
            self._hide_lower(dir_parts)
            return
        name = base[len(WHITEOUT_PREFIX) :]
        if name in ("", ".", "..") or name.startswith(WHITEOUT_PREFIX + ".wh."):
            raise LayerError(f"entry {m.name!r}: invalid whiteout")
        victim = [*dir_parts, name]
        path = "/".join(victim)
        if path in self._written or path in self._touched:
            self._hide_lower(victim)  # same-layer content stays; only lower content goes
            return
        try:
            pfd = self._parent(victim, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing there to hide
        self._remove(pfd, name)

    def _xattrs(self, m: tarfile.TarInfo, fd: int) -> None:
        for name, data in tar_xattrs(m):
            if name == XATTR_ROOTLESS and self.rootless:
                continue
            try:
                os.setxattr(fd, name, data)
            except OSError as e:
                if e.errno in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP):
                    self._warn_once(f"xattr:{name.split('.')[0]}", f"xattr {name} can't be set here: skipped")
                else:
                    raise

    def _set_owner_record(self, path: str, m: tarfile.TarInfo, kind: str, fd: int | None = None) -> None:
        if not self.rootless:
            return
        mode = stat.S_IMODE(m.mode)
        if m.uid == 0 and m.gid == 0:
            lost_sgid = mode & stat.S_ISGID and fd is not None and not os.fstat(fd).st_mode & stat.S_ISGID
            if kind == "file" and lost_sgid:
                self._records[path] = {"path": "/" + path, "type": kind, "uid": 0, "gid": 0, "mode": mode}
            else:
                self._records.pop(path, None)
            return
        self._records[path] = {"path": "/" + path, "type": kind, "uid": m.uid, "gid": m.gid, "mode": mode}
        if fd is not None and self._xattr_ok:
            try:
                os.setxattr(fd, XATTR_ROOTLESS, rootless_xattr(m.uid, m.gid))
            except OSError as e:
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
                    self._xattr_ok = False
                    self._warn_once(
                        "rootless-xattr",
                        f"user xattrs unsupported here ({e.strerror}): ownership kept in the .meta file only",
                    )
                else:
                    raise

    def _write_meta(self) -> None:
        target = meta_path(self.root)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            for path in sorted(self._records):
                rec = self._records[path]
                parts = path.split("/")
                try:  # stale records: paths removed by a later layer
                    fd = self._open_dir_exact(parts[:-1])
                    try:
                        os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
                    finally:
                        os.close(fd)
                except OSError:
                    if rec["type"] not in ("char", "block"):
                        continue
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, target)


def _ns(m: tarfile.TarInfo) -> int:
    return int(round(float(m.mtime) * 1e9)) if not isinstance(m.mtime, int) else m.mtime * 1_000_000_000


# --- whole layers -------------------------------------------------------------------------------


def apply_layer(
    root: Path,
    stream: BinaryIO,
    *,
    rootless: bool | None = None,
    diff_id: str | None = None,
    name: str = "layer",
    applier: Applier | None = None,
) -> str:
    """Apply one layer (compressed or not) to `root`; returns its DiffID. With `applier`, the
    caller owns it (and calls finish); otherwise folder modes and records are finalised here."""
    own = applier is None
    app = applier if applier is not None else Applier(Path(root), rootless=rootless)
    data = LayerStream(stream, name)
    try:
        try:
            app.apply(data, name)
            data.drain()
        except (zlib.error, EOFError) as e:
            raise LayerError(f"{name}: bad compressed data ({e})") from None
        except Exception as e:
            if type(e).__module__.startswith("zstd"):
                raise LayerError(f"{name}: bad compressed data ({e})") from None
            raise
        got = data.hexdigest()
        if diff_id is not None and got != diff_id:
            raise IntegrityError(f"{name}: DiffID is {got}, the image config says {diff_id}")
        if own:
            app.finish()
    finally:
        data.close()
        if own:
            app.close()
    return got


def apply_layers(
    root: Path, layers: Iterable[tuple[Path, str | None]], *, rootless: bool | None = None
) -> int:
    """Apply layer files in order (lowest first), each checked against its DiffID. Returns the
    number of tar entries applied."""
    app = Applier(Path(root), rootless=rootless)
    try:
        for path, diff_id in layers:
            with open(path, "rb", buffering=0) as f:
                apply_layer(root, f, diff_id=diff_id, name=f"layer {Path(path).name[:19]}", applier=app)
        app.finish()
    finally:
        app.close()
    return app.entries
