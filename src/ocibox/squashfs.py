"""A squashfs 4.0 writer, streamed: file contents go out as they arrive, the tree is written at the end.

    with open(path, "w+b") as out, SquashfsWriter(out) as w:
        ref = w.add_data(stream, size)          # data blocks now, compressed in parallel, in order
        root = Dir(entries={"hello": File(data=ref, mode=0o755)})
        w.finish(root)                          # inode, directory, fragment, export, id, xattr tables

Contents are read once and never kept: full blocks are compressed by a thread pool (zstandard and
zlib release the GIL) and written in submission order; tails of files share fragment blocks;
blocks of zeros become sparse blocks; identical files are stored once; blocks that a quick zstd
level-1 pass can't shrink by 2% are stored as they are (probe=False tries the full level on
everything). `add_data` and `finish` are called from one thread. The tree (a small model of
dataclasses: Dir, File, Symlink, Device, Fifo, Socket) is only needed by `finish`. The same node
object placed at several paths is one inode with nlink > 1 (a hard link).

The image starts where `out` stands when the writer is made, so it can follow other bytes (the
runtime of a compiled executable); all offsets inside are relative to that start. `out` must be
seekable: the superblock is written last, at the start.

On-disk layout follows the kernel's fs/squashfs and squashfs-tools-ng's doc/format.adoc:
superblock, data and fragment blocks, inode table, directory table, fragment table, export
table, id table, xattr table, padding to 4 KiB.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ocibox.errors import IntegrityError, OciboxError

MAGIC = 0x73717368
SUPERBLOCK = struct.Struct("<5I6H8Q")
SUPERBLOCK_SIZE = SUPERBLOCK.size  # 96
META_SIZE = 8192  # uncompressed size of a metadata block
META_UNCOMPRESSED = 0x8000  # bit in a metadata block's 16-bit header
BLOCK_UNCOMPRESSED = 1 << 24  # bit in a data or fragment block's size
NO_INDEX = 0xFFFFFFFF  # no fragment, no xattrs
NO_TABLE = 0xFFFFFFFFFFFFFFFF  # an absent table in the superblock
DEVICE_BLOCK = 4096  # images are padded to this size for loop devices
MAX_NAME = 256  # the kernel refuses longer entry names
MAX_RUN = 256  # entries after one directory header

COMPRESSORS = {"gzip": 1, "zstd": 6}
DEFAULT_LEVELS = {"gzip": 9, "zstd": 15}
XATTR_PREFIXES = ((b"user.", 0), (b"trusted.", 1), (b"security.", 2))

FLAG_DUPLICATES = 0x0040
FLAG_EXPORTABLE = 0x0080
FLAG_NO_XATTRS = 0x0200

# Basic inode types; the extended type of each is 7 more.
T_DIR, T_FILE, T_SYMLINK, T_BLKDEV, T_CHRDEV, T_FIFO, T_SOCKET = range(1, 8)
EXTENDED = 7

U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
INODE_HEADER = struct.Struct("<4H2I")  # type, mode, uid index, gid index, mtime, inode number
DIR_HEADER = struct.Struct("<IIi")  # count - 1, inode block, base inode number
DIR_ENTRY = struct.Struct("<HhHH")  # inode offset, number delta, basic type, name size - 1
DIR_INDEX = struct.Struct("<III")  # offset of the header in the listing, its block, name size - 1
FRAGMENT_ENTRY = struct.Struct("<QII")
XATTR_ENTRY = struct.Struct("<QII")


class SquashfsError(OciboxError):
    """A tree, name, id or value that squashfs can't hold, or a writer used the wrong way."""


# ---------------------------------------------------------------------------------------------
# The tree: what `finish` writes. Names are str (file system encoding) or bytes.


@dataclass(eq=False, slots=True)
class DataRef:
    """Where a file's contents are in the image; returned by `SquashfsWriter.add_data`.

    The writer fills it in as the blocks are written; it is complete when `finish` starts. One
    DataRef may back several File nodes (they share the blocks, without being hard links).
    """

    size: int
    start: int = 0  # image offset of the first block
    blocks: list[int] = field(default_factory=list)  # on-disk size of each block (0: sparse)
    fragment: int = NO_INDEX  # fragment block holding the tail
    fragment_offset: int = 0
    sparse: int = 0  # bytes saved by sparse blocks


@dataclass(eq=False, kw_only=True)
class Node:
    mode: int = 0o644  # permission bits, with setuid/setgid/sticky; file type bits are ignored
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    xattrs: dict[str | bytes, bytes] = field(default_factory=dict)  # user./trusted./security.


@dataclass(eq=False, kw_only=True)
class Dir(Node):
    mode: int = 0o755
    entries: dict[str | bytes, Node] = field(default_factory=dict)


@dataclass(eq=False, kw_only=True)
class File(Node):
    data: DataRef


@dataclass(eq=False, kw_only=True)
class Symlink(Node):
    mode: int = 0o777
    target: str | bytes


@dataclass(eq=False, kw_only=True)
class Device(Node):
    kind: str  # "c" (character) or "b" (block)
    major: int
    minor: int


@dataclass(eq=False, kw_only=True)
class Fifo(Node):
    pass


@dataclass(eq=False, kw_only=True)
class Socket(Node):
    pass


# ---------------------------------------------------------------------------------------------
# Compression


def _compressor(compression: str, level: int) -> Callable[[bytes], bytes]:
    """A compress function for one thread (zstandard contexts can't be shared between threads)."""
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=level).compress
    import zlib

    return lambda data: zlib.compress(data, level)


class _Metadata:
    """A stream of records cut into 8 KiB metadata blocks, each compressed as soon as it is full.

    Positions are (block start, offset): the block's offset from the table's first block and the
    offset inside the uncompressed block. A block's start is known once the blocks before it are
    compressed, which is always true for the block being filled.
    """

    def __init__(self, compress: Callable[[bytes], bytes]) -> None:
        self._compress = compress
        self._buf = bytearray()
        self._blocks: list[bytes] = []
        self.starts: list[int] = []  # start of each finished block
        self._size = 0

    def tell(self) -> int:
        """Uncompressed position of the next byte."""
        return len(self._blocks) * META_SIZE + len(self._buf)

    def ref(self) -> tuple[int, int]:
        return self._size, len(self._buf)

    def block_start(self, number: int) -> int:
        """Start of the numbered block: finished, or the one being filled."""
        return self.starts[number] if number < len(self.starts) else self._size

    def write(self, data: bytes | bytearray) -> None:
        self._buf += data
        if len(self._buf) >= META_SIZE:
            done = len(self._buf) // META_SIZE * META_SIZE
            view = memoryview(self._buf)
            for i in range(0, done, META_SIZE):
                self._emit(bytes(view[i : i + META_SIZE]))
            view.release()
            del self._buf[:done]

    def _emit(self, raw: bytes) -> None:
        packed = self._compress(raw)
        if len(packed) < len(raw):
            block = U16.pack(len(packed)) + packed
        else:
            block = U16.pack(len(raw) | META_UNCOMPRESSED) + raw
        self.starts.append(self._size)
        self._blocks.append(block)
        self._size += len(block)

    def getvalue(self) -> bytes:
        if self._buf:
            self._emit(bytes(self._buf))
            self._buf.clear()
        return b"".join(self._blocks)


# ---------------------------------------------------------------------------------------------
# The writer


class SquashfsWriter:
    """Writes one squashfs image to `out`: `add_data` for each file's contents, then `finish`."""

    def __init__(
        self,
        out: BinaryIO,
        *,
        compression: str = "zstd",
        level: int | None = None,
        block_size: int = 128 * 1024,
        workers: int | None = None,
        mtime: int | None = None,
        dedupe: bool = True,
        exportable: bool = True,
        probe: bool = True,
    ) -> None:
        if compression not in COMPRESSORS:
            raise SquashfsError(f"squashfs: unknown compression {compression!r} (use zstd or gzip)")
        if block_size < 4096 or block_size > 1 << 20 or block_size & (block_size - 1):
            raise SquashfsError(f"squashfs: block size {block_size} is not a power of two from 4K to 1M")
        level = DEFAULT_LEVELS[compression] if level is None else level
        top = 22 if compression == "zstd" else 9
        if not 1 <= level <= top:
            raise SquashfsError(f"squashfs: {compression} level {level} is not between 1 and {top}")
        if workers is not None and workers < 0:
            raise SquashfsError(f"squashfs: negative number of workers {workers}")
        self.compression = compression
        self.level = level
        self.block_size = block_size
        self.mtime = _clamp_time(int(time.time()) if mtime is None else mtime)
        self.dedupe = dedupe
        self.exportable = exportable
        self._probe = probe and compression == "zstd" and self.level > 3
        self._out = out
        self._base = out.tell()
        out.write(bytes(SUPERBLOCK_SIZE))
        self._pos = SUPERBLOCK_SIZE  # image offset of the next byte written
        workers = workers or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="squashfs")
        self._window = 8 * workers + 4  # blocks in flight
        self._local = threading.local()
        # Items waiting to be written in order: (future or None for a sparse block, target, first).
        # target is a DataRef (file block) or an int (fragment block number).
        self._pending: deque[tuple[Future[tuple[bytes, bool]] | None, DataRef | int, bool]] = deque()
        self._zero_block = bytes(block_size)
        self._fragments: list[tuple[int, int]] = []  # (image offset, on-disk size) per fragment block
        self._frag_buf = bytearray()
        self._frag_number = -1
        self._seen: dict[tuple[int, bytes], DataRef] = {}
        self._deduped = False
        self._closed = False

    def __enter__(self) -> SquashfsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stops the worker threads; `finish` does it too. Safe to call twice."""
        if not self._closed:
            self._closed = True
            for fut, _, _ in self._pending:
                if fut is not None:
                    fut.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)

    # -- data ---------------------------------------------------------------------------------

    def add_data(self, stream: BinaryIO, size: int) -> DataRef:
        """Reads exactly `size` bytes from `stream` and stores them; returns where they are.

        Full blocks go to the compression threads now; the tail goes into a fragment block. A
        file identical to one stored before returns that file's DataRef (and its blocks are
        taken back out of the image).
        """
        if self._closed:
            raise SquashfsError("squashfs: add_data after finish")
        if size < 0:
            raise SquashfsError(f"squashfs: negative file size {size}")
        ref = DataRef(size)
        if size == 0:
            return ref
        count, tail_size = divmod(size, self.block_size)
        digest = hashlib.sha256() if self.dedupe else None
        for i in range(count):
            chunk = _read_exact(stream, self.block_size, size)
            if digest is not None:
                digest.update(chunk)
            if chunk == self._zero_block:
                ref.sparse += self.block_size
                self._queue(None, ref, i == 0)
            else:
                self._queue(self._pool.submit(self._compress, chunk), ref, i == 0)
        tail = _read_exact(stream, tail_size, size) if tail_size else b""
        if digest is not None:
            digest.update(tail)
            key = (size, digest.digest())
            same = self._seen.get(key)
            if same is not None:
                if count:
                    self._drain()
                    self._out.seek(self._base + ref.start)
                    self._out.truncate()
                    self._pos = ref.start
                self._deduped = True
                return same
            self._seen[key] = ref
        if tail:
            self._add_fragment(ref, tail)
        return ref

    def _compress(self, chunk: bytes) -> tuple[bytes, bool]:
        """Runs in a worker thread: the block compressed, or as it is when that is not smaller.

        With `probe`, a fast level-1 pass first: what it can't shrink by 2% (data compressed
        already: .gz, .png, .zip) is stored as it is without trying the slow level.
        """
        local = self._local
        compress = getattr(local, "compress", None)
        if compress is None:
            compress = local.compress = _compressor(self.compression, self.level)
            local.probe = _compressor(self.compression, 1) if self._probe else None
        if local.probe is not None and len(local.probe(chunk)) * 50 >= len(chunk) * 49:
            return chunk, True
        packed = compress(chunk)
        if len(packed) < len(chunk):
            return packed, False
        return chunk, True

    def _queue(self, fut: Future[tuple[bytes, bool]] | None, target: DataRef | int, first: bool) -> None:
        self._pending.append((fut, target, first))
        while len(self._pending) > self._window:
            self._write_next()

    def _write_next(self) -> None:
        fut, target, first = self._pending.popleft()
        if isinstance(target, DataRef):
            if first:
                target.start = self._pos
            if fut is None:
                target.blocks.append(0)
                return
        assert fut is not None
        data, raw = fut.result()
        size = len(data) | (BLOCK_UNCOMPRESSED if raw else 0)
        if isinstance(target, DataRef):
            target.blocks.append(size)
        else:
            self._fragments[target] = (self._pos, size)
        self._out.write(data)
        self._pos += len(data)

    def _drain(self) -> None:
        while self._pending:
            self._write_next()

    def _add_fragment(self, ref: DataRef, tail: bytes) -> None:
        if len(self._frag_buf) + len(tail) > self.block_size:
            self._flush_fragment()
        if not self._frag_buf:
            self._frag_number = len(self._fragments)
            self._fragments.append((0, 0))
        ref.fragment = self._frag_number
        ref.fragment_offset = len(self._frag_buf)
        self._frag_buf += tail

    def _flush_fragment(self) -> None:
        if self._frag_buf:
            self._queue(self._pool.submit(self._compress, bytes(self._frag_buf)), self._frag_number, False)
            self._frag_buf.clear()

    # -- tables -------------------------------------------------------------------------------

    def finish(self, root: Dir) -> int:
        """Writes the tree and all tables, then the superblock. Returns the image size (padded)."""
        if self._closed:
            raise SquashfsError("squashfs: finish called twice")
        if not isinstance(root, Dir):
            raise SquashfsError("squashfs: the root must be a directory")
        self._flush_fragment()
        self._drain()
        self.close()
        meta = _compressor(self.compression, self.level)
        tables = _Tables(meta)
        root_ref, inode_count = tables.write_tree(root)

        inode_table = self._pos
        self._emit(tables.inodes.getvalue())
        directory_table = self._pos
        self._emit(tables.dirs.getvalue())
        frag_records = b"".join(FRAGMENT_ENTRY.pack(start, size, 0) for start, size in self._fragments)
        fragment_table = self._write_lookup(meta, frag_records)
        lookup_table = NO_TABLE
        if self.exportable:
            lookup_table = self._write_lookup(meta, b"".join(struct.pack("<Q", r) for r in tables.refs))
        id_table = self._write_lookup(meta, b"".join(U32.pack(i) for i in tables.ids))
        xattr_table = NO_TABLE
        if tables.xattr_entries:
            kv_start = self._pos
            self._emit(tables.xattrs.getvalue())
            records = b"".join(XATTR_ENTRY.pack(*e) for e in tables.xattr_entries)
            xattr_table = self._write_lookup(
                meta, records, struct.pack("<QII", kv_start, len(tables.xattr_entries), 0)
            )
        bytes_used = self._pos
        padded = -(-bytes_used // DEVICE_BLOCK) * DEVICE_BLOCK
        self._emit(bytes(padded - bytes_used))

        flags = FLAG_NO_XATTRS if xattr_table == NO_TABLE else 0
        flags |= FLAG_DUPLICATES if self._deduped else 0
        flags |= FLAG_EXPORTABLE if self.exportable else 0
        superblock = SUPERBLOCK.pack(
            MAGIC, inode_count, self.mtime, self.block_size, len(self._fragments),
            COMPRESSORS[self.compression], self.block_size.bit_length() - 1, flags, len(tables.ids),
            4, 0, root_ref, bytes_used, id_table, xattr_table, inode_table, directory_table,
            fragment_table, lookup_table,
        )  # fmt: skip
        self._out.seek(self._base)
        self._out.write(superblock)
        self._out.seek(self._base + padded)
        self._out.flush()
        return padded

    def _emit(self, data: bytes) -> None:
        self._out.write(data)
        self._pos += len(data)

    def _write_lookup(self, meta: Callable[[bytes], bytes], records: bytes, head: bytes = b"") -> int:
        """A lookup table: metadata blocks, then `head` and the list of their offsets (returned)."""
        table = _Metadata(meta)
        table.write(records)
        blob = table.getvalue()
        start = self._pos
        self._emit(blob)
        where = self._pos
        self._emit(head + struct.pack(f"<{len(table.starts)}Q", *(start + s for s in table.starts)))
        return where


class _Tables:
    """Inode, directory, id and xattr tables of one tree, built in memory by `write_tree`."""

    def __init__(self, compress: Callable[[bytes], bytes]) -> None:
        self.inodes = _Metadata(compress)
        self.dirs = _Metadata(compress)
        self.xattrs = _Metadata(compress)
        self.ids: list[int] = []
        self.refs: list[int] = []  # inode reference by inode number - 1 (the export table)
        self.xattr_entries: list[tuple[int, int, int]] = []
        self._id_index: dict[int, int] = {}
        self._xattr_index: dict[tuple[tuple[bytes, bytes], ...], int] = {}

    def write_tree(self, root: Dir) -> tuple[int, int]:
        """Writes every inode and directory listing; returns the root's reference and inode count."""
        order, listings, numbers, nlinks, parents = _plan(root)
        count = len(order)
        for node in order:
            key = id(node)
            number = numbers[key]
            if isinstance(node, Dir):
                items = listings[key]
                parent = numbers[id(parents[key])] if key in parents else count + 1
                subdirs = sum(1 for _, child in items if isinstance(child, Dir))
                self._write_dir(node, number, parent, 2 + subdirs, items, numbers)
            else:
                self._write_inode(node, number, nlinks[key])
        return self.refs[-1], count

    # -- inodes -------------------------------------------------------------------------------

    def _header(self, kind: int, node: Node, number: int) -> bytes:
        self.refs.append(_pack_ref(*self.inodes.ref()))
        return INODE_HEADER.pack(
            kind, node.mode & 0o7777, self._id(node.uid), self._id(node.gid), _clamp_time(node.mtime), number
        )

    def _write_inode(self, node: Node, number: int, nlink: int) -> None:
        xattr = self._xattr(node.xattrs)
        ext = xattr != NO_INDEX
        if isinstance(node, File):
            data = node.data
            if not isinstance(data, DataRef):
                raise SquashfsError("squashfs: File.data must be a DataRef from add_data")
            sizes = struct.pack(f"<{len(data.blocks)}I", *data.blocks)
            if ext or nlink > 1 or data.sparse or data.size > NO_INDEX or data.start > NO_INDEX:
                body = struct.pack(
                    "<QQQIIII",
                    data.start,
                    data.size,
                    data.sparse,
                    nlink,
                    data.fragment,
                    data.fragment_offset,
                    xattr,
                )
                self.inodes.write(self._header(T_FILE + EXTENDED, node, number) + body + sizes)
            else:
                body = struct.pack("<4I", data.start, data.fragment, data.fragment_offset, data.size)
                self.inodes.write(self._header(T_FILE, node, number) + body + sizes)
        elif isinstance(node, Symlink):
            target = _to_bytes(node.target)
            if not 0 < len(target) <= 4096:  # the kernel's limit
                raise SquashfsError(f"squashfs: symlink target of {len(target)} bytes (1 to 4096 allowed)")
            body = struct.pack("<II", nlink, len(target)) + target + (U32.pack(xattr) if ext else b"")
            self.inodes.write(self._header(T_SYMLINK + EXTENDED * ext, node, number) + body)
        elif isinstance(node, Device):
            if node.kind not in ("c", "b"):
                raise SquashfsError(f"squashfs: device kind {node.kind!r} is not 'c' or 'b'")
            kind = T_CHRDEV if node.kind == "c" else T_BLKDEV
            body = struct.pack("<II", nlink, _encode_dev(node.major, node.minor))
            body += U32.pack(xattr) if ext else b""
            self.inodes.write(self._header(kind + EXTENDED * ext, node, number) + body)
        elif isinstance(node, (Fifo, Socket)):
            kind = T_FIFO if isinstance(node, Fifo) else T_SOCKET
            body = U32.pack(nlink) + (U32.pack(xattr) if ext else b"")
            self.inodes.write(self._header(kind + EXTENDED * ext, node, number) + body)
        else:
            raise SquashfsError(f"squashfs: {type(node).__name__} is not a node type")

    def _write_dir(
        self,
        node: Dir,
        number: int,
        parent: int,
        nlink: int,
        items: list[tuple[bytes, Node]],
        numbers: dict[int, int],
    ) -> None:
        block, offset = self.dirs.ref()
        size, index = self._write_listing(items, numbers)
        xattr = self._xattr(node.xattrs)
        if len(index) > 0xFFFF:
            raise SquashfsError(f"squashfs: directory with {len(items)} entries is too large")
        if index or xattr != NO_INDEX or size > 0xFFFF:
            body = struct.pack("<IIIIHHI", nlink, size, block, parent, len(index), offset, xattr)
            self.inodes.write(self._header(T_DIR + EXTENDED, node, number) + body + b"".join(index))
        else:
            body = struct.pack("<IIHHI", block, nlink, size, offset, parent)
            self.inodes.write(self._header(T_DIR, node, number) + body)

    def _write_listing(
        self, items: list[tuple[bytes, Node]], numbers: dict[int, int]
    ) -> tuple[int, list[bytes]]:
        """Writes a directory's entries; returns its size (+3, as the kernel counts) and index entries.

        A new header starts after 256 entries, when the inode block changes, when the inode
        number is too far from the header's, and when the entries cross a metadata block; the
        headers after the first are indexed for the kernel's lookups.
        """
        start = self.dirs.tell()
        buf = bytearray()
        marks: list[tuple[int, int, bytes]] = []  # (offset in listing, uncompressed block, name)
        count_at = -1
        count = base = ino_block = run_block = 0
        for name, child in items:
            key = id(child)
            num = numbers[key]
            ref = self.refs[num - 1]
            iblock, ioff = ref >> 16, ref & 0xFFFF
            here = start + len(buf)
            if (
                count_at < 0
                or count == MAX_RUN
                or iblock != ino_block
                or not -0x8000 <= num - base <= 0x7FFF
                or here // META_SIZE != run_block
            ):
                if count_at >= 0:
                    U32.pack_into(buf, count_at, count - 1)
                    marks.append((len(buf), (start + len(buf)) // META_SIZE, name))
                count_at = len(buf)
                count, base, ino_block = 0, num, iblock
                buf += DIR_HEADER.pack(0, iblock, num)
                run_block = (start + len(buf)) // META_SIZE
            buf += DIR_ENTRY.pack(ioff, num - base, _basic_type(child), len(name) - 1) + name
            count += 1
        if count_at >= 0:
            U32.pack_into(buf, count_at, count - 1)
        self.dirs.write(buf)
        index = [
            DIR_INDEX.pack(at, self.dirs.block_start(blk), len(name) - 1) + name for at, blk, name in marks
        ]
        return len(buf) + 3, index

    # -- ids and xattrs -----------------------------------------------------------------------

    def _id(self, value: int) -> int:
        index = self._id_index.get(value)
        if index is None:
            if not 0 <= value <= NO_INDEX:
                raise SquashfsError(f"squashfs: uid/gid {value} is out of range")
            if len(self.ids) == 0xFFFF:
                raise SquashfsError("squashfs: more than 65535 distinct uids and gids")
            index = self._id_index[value] = len(self.ids)
            self.ids.append(value)
        return index

    def _xattr(self, xattrs: dict[str | bytes, bytes]) -> int:
        if not xattrs:
            return NO_INDEX
        pairs = tuple(sorted((_to_bytes(k), _to_bytes(v)) for k, v in xattrs.items()))
        index = self._xattr_index.get(pairs)
        if index is not None:
            return index
        kv = bytearray()
        for name, value in pairs:
            kind, rest = _split_xattr_name(name)
            kv += struct.pack("<HH", kind, len(rest)) + rest + U32.pack(len(value)) + value
        ref = _pack_ref(*self.xattrs.ref())
        self.xattrs.write(kv)
        index = self._xattr_index[pairs] = len(self.xattr_entries)
        self.xattr_entries.append((ref, len(pairs), len(kv)))
        return index


def _split_xattr_name(name: bytes) -> tuple[int, bytes]:
    """The namespace id and the rest of an xattr name."""
    for prefix, kind in XATTR_PREFIXES:
        if name.startswith(prefix) and len(prefix) < len(name) <= 255:
            return kind, name[len(prefix) :]
    shown = name.decode(errors="replace")
    if len(name) > 255:
        raise SquashfsError(f"squashfs: xattr name longer than 255 bytes: {shown[:40]!r}...")
    raise SquashfsError(f"squashfs: xattr {shown!r} is not in the user., trusted. or security. namespace")


def _plan(
    root: Dir,
) -> tuple[list[Node], dict[int, list[tuple[bytes, Node]]], dict[int, int], dict[int, int], dict[int, Dir]]:
    """Orders the inodes as they will be written and numbers them.

    Children come before their directory (a listing points at inodes already written): each
    directory's subdirectories first, depth first, then its other entries, then itself. Returns
    the order, each directory's sorted entries, inode numbers, link counts and parents, keyed
    by id(node).
    """
    order: list[Node] = []
    listings: dict[int, list[tuple[bytes, Node]]] = {}
    numbers: dict[int, int] = {}
    nlinks: dict[int, int] = {}
    parents: dict[int, Dir] = {}
    stack: list[tuple[Dir, bool]] = [(root, False)]
    listings[id(root)] = []
    while stack:
        node, expanded = stack.pop()
        items = listings[id(node)]
        if expanded:
            for _, child in items:
                if not isinstance(child, Dir) and id(child) not in numbers:
                    order.append(child)
                    numbers[id(child)] = len(order)
            order.append(node)
            numbers[id(node)] = len(order)
            continue
        items.extend(_sorted_entries(node))
        stack.append((node, True))
        for _, child in reversed(items):
            key = id(child)
            if isinstance(child, Dir):
                if key in listings:
                    raise SquashfsError("squashfs: a directory appears twice in the tree")
                listings[key] = []
                parents[key] = node
                stack.append((child, False))
            elif isinstance(child, Node):
                nlinks[key] = nlinks.get(key, 0) + 1
            else:
                raise SquashfsError(f"squashfs: {type(child).__name__} is not a node type")
    if len(order) > NO_INDEX - 1:
        raise SquashfsError("squashfs: too many inodes")
    return order, listings, numbers, nlinks, parents


def _sorted_entries(node: Dir) -> list[tuple[bytes, Node]]:
    items = []
    for name, child in node.entries.items():
        raw = _to_bytes(name)
        if not raw or raw in (b".", b"..") or b"/" in raw or b"\0" in raw:
            raise SquashfsError(f"squashfs: invalid entry name {raw!r}")
        if len(raw) > MAX_NAME:
            raise SquashfsError(f"squashfs: entry name longer than {MAX_NAME} bytes: {raw[:40]!r}...")
        items.append((raw, child))
    items.sort(key=lambda item: item[0])
    for (a, _), (b, _) in zip(items, items[1:], strict=False):
        if a == b:
            raise SquashfsError(f"squashfs: entry name {a!r} appears twice in one directory")
    return items


def _basic_type(node: Node) -> int:
    if isinstance(node, Dir):
        return T_DIR
    if isinstance(node, File):
        return T_FILE
    if isinstance(node, Symlink):
        return T_SYMLINK
    if isinstance(node, Device):
        return T_CHRDEV if node.kind == "c" else T_BLKDEV
    return T_FIFO if isinstance(node, Fifo) else T_SOCKET


def _pack_ref(block: int, offset: int) -> int:
    if block >= 1 << 32:
        raise SquashfsError("squashfs: metadata table larger than 4 GiB")
    return block << 16 | offset


def _encode_dev(major: int, minor: int) -> int:
    if not (0 <= major < 1 << 12 and 0 <= minor < 1 << 20):
        raise SquashfsError(f"squashfs: device number {major}:{minor} is out of range")
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def _clamp_time(t: int) -> int:
    """Squashfs times are unsigned 32-bit seconds: earlier times become 1970, later ones 2106."""
    return min(max(int(t), 0), NO_INDEX)


def _to_bytes(value: str | bytes) -> bytes:
    return os.fsencode(value) if isinstance(value, str) else bytes(value)


def _read_exact(stream: BinaryIO, n: int, size: int) -> bytes:
    data = stream.read(n)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            raise IntegrityError(f"squashfs: file data ended early (expected {size} bytes)")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# A directory on disk


def write_directory(src: str | os.PathLike[str], out: str | os.PathLike[str], **options: object) -> int:
    """Writes the tree under `src` (lstat, symlinks not followed, hard links kept) to the file `out`.

    `options` go to SquashfsWriter. Returns the image size.
    """
    top = os.fsencode(src)
    try:
        st = os.lstat(top)
    except OSError as err:
        raise SquashfsError(f"squashfs: can't read {os.fsdecode(top)}: {err.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SquashfsError(f"squashfs: {os.fsdecode(top)} is not a directory")
    with open(Path(out), "w+b") as f, SquashfsWriter(f, **options) as writer:  # type: ignore[arg-type]
        root = _scan(top, st, writer)
        return writer.finish(root)


def _scan(top: bytes, top_st: os.stat_result, writer: SquashfsWriter) -> Dir:
    root = Dir(**_attrs(top, top_st))
    links: dict[tuple[int, int], Node] = {}
    stack: list[tuple[bytes, Dir]] = [(top, root)]
    while stack:
        path, node = stack.pop()
        subdirs = []
        for name, full, st in _list(path):
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                same = links.get((st.st_dev, st.st_ino))
                if same is not None:
                    node.entries[name] = same
                    continue
            child = _node(full, st, writer)
            node.entries[name] = child
            if isinstance(child, Dir):
                subdirs.append((full, child))
            elif st.st_nlink > 1:
                links[(st.st_dev, st.st_ino)] = child
        stack.extend(reversed(subdirs))
    return root


def _list(path: bytes) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            yield e.name, e.path, e.stat(follow_symlinks=False)
    except OSError as err:
        where = os.fsdecode(err.filename or path)
        raise SquashfsError(f"squashfs: can't read {where}: {err.strerror}") from None


def _node(path: bytes, st: os.stat_result, writer: SquashfsWriter) -> Node:
    attrs = _attrs(path, st)
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return Dir(**attrs)
    if stat.S_ISREG(mode):
        try:
            with open(path, "rb", buffering=0) as f:
                return File(data=writer.add_data(f, st.st_size), **attrs)
        except OSError as err:
            raise SquashfsError(f"squashfs: can't read {os.fsdecode(path)}: {err.strerror}") from None
    if stat.S_ISLNK(mode):
        return Symlink(target=os.readlink(path), **attrs)
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "c" if stat.S_ISCHR(mode) else "b"
        return Device(kind=kind, major=os.major(st.st_rdev), minor=os.minor(st.st_rdev), **attrs)
    if stat.S_ISFIFO(mode):
        return Fifo(**attrs)
    return Socket(**attrs)


def _attrs(path: bytes, st: os.stat_result) -> dict:
    return {
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime": int(st.st_mtime),
        "xattrs": _read_xattrs(path),
    }


def _read_xattrs(path: bytes) -> dict[str | bytes, bytes]:
    """The user., trusted. and security. attributes (the namespaces squashfs can hold)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    found: dict[str | bytes, bytes] = {}
    for name in names:
        if name.startswith(("user.", "trusted.", "security.")):
            try:
                found[name] = os.getxattr(path, name, follow_symlinks=False)
            except OSError:
                continue
    return found
