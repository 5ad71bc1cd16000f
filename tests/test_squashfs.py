"""ocibox writes squashfs images itself; every reader sees the tree that was written.

A tree is written once from the in-memory model and once from a directory on disk with
write_directory, then read back by unsquashfs (listing and extraction), sqfs2tar, sqfscat,
squashfuse and the kernel's squashfs, and compared with what was written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
import socket
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from ocibox.errors import IntegrityError
from ocibox.squashfs import (
    Device,
    Dir,
    Fifo,
    File,
    Node,
    Socket,
    SquashfsError,
    SquashfsWriter,
    Symlink,
    write_directory,
)

BLOCK = 128 * 1024
IS_ROOT = os.geteuid() == 0
XATTR_PREFIXES = ("user.", "trusted.", "security.")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def need_root(what: str) -> None:
    if not IS_ROOT:
        pytest.skip(f"{what} needs root")


# --- the trees --------------------------------------------------------------------------------


def random_bytes(n: int, seed: int) -> bytes:
    """Incompressible but reproducible content."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:n])


def text_bytes(n: int, seed: int) -> bytes:
    """Compressible content."""
    line = b"line %d of a text file that compresses well\n" % seed
    return (line * (n // len(line) + 1))[:n]


def file_contents() -> dict[str, bytes]:
    """Files of the interesting sizes, by path."""
    return {
        "files/empty": b"",
        "files/one": b"x",
        "files/block-1": text_bytes(BLOCK - 1, 1),
        "files/block": random_bytes(BLOCK, 2),
        "files/block+1": text_bytes(BLOCK + 1, 3),
        "files/five-blocks": random_bytes(5 * BLOCK + 123, 4),
        "files/two-blocks-exactly": text_bytes(2 * BLOCK, 5),
        "files/sparse": random_bytes(1000, 6) + bytes(3 * BLOCK) + random_bytes(500, 7),
        "files/all-zero": bytes(3 * BLOCK + 17),
        "files/same-a": random_bytes(300_000, 8),
        "files/same-b": random_bytes(300_000, 8),
        "files/small-same-a": b"hello\n",
        "files/small-same-b": b"hello\n",
        "files/sub/deeper/inside": b"deep\n",
    }


def build_model(writer: SquashfsWriter) -> tuple[Dir, dict[str, bytes]]:
    """The test tree as nodes; returns the root and the contents of every regular file by path."""
    contents = file_contents()
    root = Dir(mode=0o755, uid=0, gid=0, mtime=1_700_000_000)
    dirs: dict[str, Dir] = {"": root}

    def place(path: str, node: Node) -> None:
        parent, _, name = path.rpartition("/")
        if parent not in dirs:
            place(parent, Dir(mode=0o755, mtime=1_600_000_000))
        dirs[parent].entries[name] = node
        if isinstance(node, Dir):
            dirs[path] = node

    for i, (path, data) in enumerate(contents.items()):
        ref = writer.add_data(io.BytesIO(data), len(data))
        place(path, File(data=ref, mode=0o644, uid=1000, gid=1000, mtime=1_650_000_000 + i))

    # Hard links: one node at three paths, one of them in another directory.
    data = text_bytes(70_000, 9)
    contents["links/original"] = contents["links/second"] = contents["files/third-link"] = data
    linked = File(data=writer.add_data(io.BytesIO(data), len(data)), mode=0o640, uid=1000, gid=100)
    linked.xattrs = {"user.linked": b"yes"}
    for path in ("links/original", "links/second", "files/third-link"):
        place(path, linked)

    place("links/relative", Symlink(target="original", mtime=1_500_000_000))
    place("links/absolute", Symlink(target="/usr/bin/env"))
    place("links/up", Symlink(target="../files/one"))
    place("links/dangling", Symlink(target="nowhere/at/all", uid=65534, gid=65534))
    place("special/fifo", Fifo(mode=0o600, uid=100000, gid=100000, mtime=1_234_567_890))
    place("special/socket", Socket(mode=0o755))
    place("special/null", Device(kind="c", major=1, minor=3, mode=0o666))
    place("special/big-minor", Device(kind="c", major=240, minor=70000, mode=0o600))
    place("special/loop", Device(kind="b", major=7, minor=0, mode=0o660, gid=6))
    place("modes/setuid", File(data=writer.add_data(io.BytesIO(b"#!/bin/sh\n"), 10), mode=0o4755))
    place("modes/setgid", File(data=writer.add_data(io.BytesIO(b""), 0), mode=0o2711))
    place("modes/sticky", Dir(mode=0o1777))
    place("modes/none", File(data=writer.add_data(io.BytesIO(b"-"), 1), mode=0o000))
    contents.update({"modes/setuid": b"#!/bin/sh\n", "modes/setgid": b"", "modes/none": b"-"})
    place("empty", Dir(mode=0o700, uid=1000, gid=1000))
    place("deep/" + "/".join(f"d{i}" for i in range(40)), Dir())

    # Many entries: several directory headers, metadata blocks crossed, index entries used.
    many = Dir(mode=0o755, xattrs={"user.note": b"many entries"})
    place("many", many)
    for i in range(700):
        name = f"entry-{i:04d}-" + "n" * (i % 50)
        if i % 3 == 0:
            many.entries[name] = Fifo(mtime=i)
        else:
            payload = b"%d\n" % i
            many.entries[name] = File(data=writer.add_data(io.BytesIO(payload), len(payload)))
            contents[f"many/{name}"] = payload
    long = Dir()
    place("long", long)
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        long.entries[c * 255] = Symlink(target=c)
    nonascii = "caf\u00e9-\u6f22\u5b57"
    place(f"names/{nonascii}", File(data=writer.add_data(io.BytesIO(b"u"), 1)))
    contents[f"names/{nonascii}"] = b"u"
    place("names/with space", Fifo())

    contents["files/xattrs"] = b"attributes\n"
    place(
        "files/xattrs",
        File(
            data=writer.add_data(io.BytesIO(b"attributes\n"), 11),
            xattrs={"user.a": b"1", "user.empty": b"", "user.big": bytes(range(256)) * 8, "trusted.t": b"x"},
        ),
    )
    place("files/xattrs-same", File(data=writer.add_data(io.BytesIO(b""), 0), xattrs={"user.a": b"1"}))
    place("links/xattr-link", Symlink(target="original", xattrs={"trusted.sym": b"link"}))
    # Another inode with the same attributes shares their table entry. (Linux allows user.*
    # attributes on files and directories only.)
    place("links/same-xattrs", File(data=writer.add_data(io.BytesIO(b""), 0), xattrs={"user.linked": b"yes"}))
    contents["links/same-xattrs"] = b""
    contents["files/xattrs-same"] = b""
    return root, contents


def model_snapshot(root: Dir, contents: dict[str, bytes]) -> dict[str, tuple]:
    """What a reader should see, in the form of `snapshot`."""
    out: dict[str, tuple] = {}
    stack: list[tuple[str, Node]] = [("", root)]
    while stack:
        path, node = stack.pop()
        common = (node.uid, node.gid, node.mtime, sorted(node.xattrs.items()))
        if isinstance(node, Dir):
            out[path] = ("dir", stat.S_IMODE(node.mode), *common, None)
            for name, child in node.entries.items():
                stack.append((f"{path}/{name}" if path else name, child))
        elif isinstance(node, File):
            digest = hashlib.sha256(contents[path]).hexdigest()
            out[path] = ("file", node.mode, *common, (len(contents[path]), digest))
        elif isinstance(node, Symlink):
            out[path] = ("symlink", None, *common, node.target)
        elif isinstance(node, Device):
            kind = "chr" if node.kind == "c" else "blk"
            out[path] = (kind, node.mode, *common, (node.major, node.minor))
        else:
            out[path] = ("fifo" if isinstance(node, Fifo) else "socket", node.mode, *common, None)
    return out


def hardlink_groups_of_model(root: Dir) -> set[frozenset[str]]:
    paths: dict[int, set[str]] = {}
    stack: list[tuple[str, Node]] = [("", root)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, Dir):
            for name, child in node.entries.items():
                stack.append((f"{path}/{name}" if path else name, child))
        else:
            paths.setdefault(id(node), set()).add(path)
    return {frozenset(p) for p in paths.values() if len(p) > 1}


def snapshot(top: Path, *, times_of_symlinks: bool = True) -> dict[str, tuple]:
    """Every path under `top`: type, mode, owner, mtime, xattrs and content, target or device."""
    out: dict[str, tuple] = {"": _describe(top, times_of_symlinks)}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            out[str(path.relative_to(top))] = _describe(path, times_of_symlinks)
    return out


def _describe(path: Path, times_of_symlinks: bool) -> tuple:
    st = os.lstat(path)
    xattrs = read_xattrs(path)
    mode = stat.S_IMODE(st.st_mode)
    mtime = int(st.st_mtime)
    common = (st.st_uid, st.st_gid, mtime, xattrs)
    if stat.S_ISDIR(st.st_mode):
        return ("dir", mode, *common, None)
    if stat.S_ISREG(st.st_mode):
        return ("file", mode, *common, (st.st_size, hashlib.sha256(path.read_bytes()).hexdigest()))
    if stat.S_ISLNK(st.st_mode):
        if not times_of_symlinks:
            common = (st.st_uid, st.st_gid, None, xattrs)
        return ("symlink", None, *common, os.readlink(path))
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        kind = "chr" if stat.S_ISCHR(st.st_mode) else "blk"
        return (kind, mode, *common, (os.major(st.st_rdev), os.minor(st.st_rdev)))
    return ("fifo" if stat.S_ISFIFO(st.st_mode) else "socket", mode, *common, None)


def read_xattrs(path: Path) -> list[tuple[str, bytes | None]]:
    """Sorted (name, value); None for a value that can't be read."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno == errno.EOPNOTSUPP:  # the kernel's squashfs, on an image without xattrs
            return []
        raise
    found = []
    for name in names:
        if name.startswith(XATTR_PREFIXES):
            try:
                found.append((name, os.getxattr(path, name, follow_symlinks=False)))
            except OSError as err:
                if err.errno != errno.ENODATA:
                    raise
                found.append((name, None))
    return sorted(found)


def as_squashfuse_shows(snap: dict[str, tuple]) -> dict[str, tuple]:
    """squashfuse 0.1.104 names trusted.* attributes security.*, and can't read empty values
    (images from mksquashfs alike): the kernel, unsquashfs and the listing show them right."""
    out = {}
    for path, value in snap.items():
        xattrs = sorted(
            (name.replace("trusted.", "security.", 1), data if data else None) for name, data in value[5]
        )
        out[path] = value[:5] + (xattrs,) + value[6:]
    return out


def hardlink_groups(top: Path) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            path = Path(dirpath, name)
            groups.setdefault(os.lstat(path).st_ino, set()).add(str(path.relative_to(top)))
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def without_symlink_times(snap: dict[str, tuple]) -> dict[str, tuple]:
    return {p: (v[:4] + (None,) + v[5:] if v[0] == "symlink" else v) for p, v in snap.items()}


def assert_same_tree(got: dict[str, tuple], want: dict[str, tuple]) -> None:
    assert sorted(got) == sorted(want)
    different = {p: (got[p], want[p]) for p in want if got[p] != want[p]}
    assert not different


# --- the readers ------------------------------------------------------------------------------


@contextlib.contextmanager
def kernel_mount(image: Path, where: Path, offset: int = 0):
    need_root("mounting with the kernel's squashfs")
    where.mkdir(exist_ok=True)
    options = f"loop,ro,offset={offset}" if offset else "loop,ro"
    subprocess.run(["mount", "-t", "squashfs", "-o", options, str(image), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@contextlib.contextmanager
def fuse_mount(image: Path, where: Path, program: str = "squashfuse_ll"):
    """squashfuse_ll uses libsquashfuse's low-level operations, as ocibox's runtime does; it keeps
    inode numbers (plain squashfuse gives each path its own)."""
    need(program)
    need("fusermount3")
    where.mkdir(exist_ok=True)
    subprocess.run([program, str(image), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["fusermount3", "-u", str(where)], check=True)


def unsquashfs_extract(image: Path, dest: Path, *extra: str) -> Path:
    need("unsquashfs")
    subprocess.run(["unsquashfs", "-n", "-xattrs", *extra, "-d", str(dest), str(image)], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return dest


LISTING = re.compile(r"^(\S{10}) (\d+)/(\d+) +(\d+|\d+, *\d+) (\d{4}-\d\d-\d\d \d\d:\d\d) (.*)$")


def unsquashfs_listing(image: Path) -> dict[str, tuple]:
    """`unsquashfs -lln`: mode string, owner, size (or device numbers) and link target per path."""
    need("unsquashfs")
    text = subprocess.run(["unsquashfs", "-n", "-lln", str(image)], check=True, capture_output=True).stdout
    out = {}
    for line in text.decode().splitlines():
        m = LISTING.match(line)
        if m is None:
            continue
        perms, uid, gid, size, _, name = m.groups()
        target = None
        if perms[0] == "l":
            name, _, target = name.partition(" -> ")
        path = name.removeprefix("squashfs-root").lstrip("/")
        out[path] = (perms, int(uid), int(gid), size.replace(" ", ""), target)
    return out


def listing_of_snapshot(snap: dict[str, tuple]) -> dict[str, tuple]:
    """What `unsquashfs -lln` prints for a snapshot."""
    kinds = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK, "chr": stat.S_IFCHR,
             "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO, "socket": stat.S_IFSOCK}  # fmt: skip
    out = {}
    for path, (kind, mode, uid, gid, _, _, extra) in snap.items():
        perms = stat.filemode(kinds[kind] | (0o777 if mode is None else mode))
        target = None
        if kind == "file":
            size = str(extra[0])
        elif kind == "symlink":
            size, target = str(len(os.fsencode(extra))), extra
        elif kind in ("chr", "blk"):
            # unsquashfs prints the stored number the old 8:8 way; the kernel reads it the new way.
            major, minor = extra
            dev = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
            size = f"{dev >> 8},{dev & 0xFF}"
        else:
            size = None
        out[path] = (perms, uid, gid, size, target)
    return out


def check_listing(image: Path, want: dict[str, tuple]) -> None:
    got = unsquashfs_listing(image)
    expected = listing_of_snapshot(want)
    for path, entry in expected.items():
        if entry[3] is None:  # directories, fifos, sockets: the size column is not ours to predict
            got[path] = got[path][:3] + (None,) + got[path][4:]
    assert_same_tree(got, expected)


def sqfs2tar_snapshot(image: Path) -> dict[str, tuple]:
    """sqfs2tar (squashfs-tools-ng): type, mode, owner, mtime, content or target per path."""
    need("sqfs2tar")
    tar_bytes = subprocess.run(["sqfs2tar", str(image)], check=True, capture_output=True).stdout
    out: dict[str, tuple] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = {m.name.rstrip("/"): m for m in tar.getmembers()}
        for name, m in members.items():
            if m.islnk():
                source = members[m.linkname.rstrip("/")]
                data = tar.extractfile(source).read()
                out[name] = (
                    "file",
                    m.mode,
                    m.uid,
                    m.gid,
                    m.mtime,
                    (len(data), hashlib.sha256(data).hexdigest()),
                )
            elif m.isfile():
                data = tar.extractfile(m).read()
                out[name] = (
                    "file",
                    m.mode,
                    m.uid,
                    m.gid,
                    m.mtime,
                    (len(data), hashlib.sha256(data).hexdigest()),
                )
            elif m.issym():
                out[name] = ("symlink", None, m.uid, m.gid, m.mtime, m.linkname)
            elif m.isdir():
                out[name] = ("dir", m.mode, m.uid, m.gid, m.mtime, None)
            elif m.ischr() or m.isblk():
                out[name] = (
                    "chr" if m.ischr() else "blk",
                    m.mode,
                    m.uid,
                    m.gid,
                    m.mtime,
                    (m.devmajor, m.devminor),
                )
            elif m.isfifo():
                out[name] = ("fifo", m.mode, m.uid, m.gid, m.mtime, None)
    return out


def tar_form(snap: dict[str, tuple]) -> dict[str, tuple]:
    """A snapshot as sqfs2tar shows it (no root entry, no sockets: tar can't hold them)."""
    return {p: v[:5] + v[6:] for p, v in snap.items() if p and v[0] != "socket"}


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_image(tmp_path_factory):
    """The test tree written from the model; returns the image, the expected snapshot and hard links."""
    tmp = tmp_path_factory.mktemp("model")
    image = tmp / "model.sqfs"
    with open(image, "w+b") as out, SquashfsWriter(out, mtime=1_700_000_000, workers=2) as writer:
        root, contents = build_model(writer)
        size = writer.finish(root)
    assert size == image.stat().st_size
    assert size % 4096 == 0
    return image, model_snapshot(root, contents), hardlink_groups_of_model(root)


@pytest.fixture(scope="module")
def disk_tree(tmp_path_factory):
    """The same kinds of things on disk (devices, owners and trusted xattrs need root)."""
    top = tmp_path_factory.mktemp("disk") / "tree"
    for path, data in file_contents().items():
        (top / path).parent.mkdir(parents=True, exist_ok=True)
        (top / path).write_bytes(data)
    with open(top / "files/hole", "wb") as f:  # a real sparse file
        f.write(b"start")
        f.seek(4 * BLOCK)
        f.write(b"end")
    (top / "links").mkdir()
    (top / "links/original").write_bytes(text_bytes(70_000, 9))
    os.link(top / "links/original", top / "links/second")
    os.link(top / "links/original", top / "files/third-link")
    os.symlink("original", top / "links/relative")
    os.symlink("/usr/bin/env", top / "links/absolute")
    os.symlink("../files/one", top / "links/up")
    os.symlink("nowhere", top / "links/dangling")
    (top / "special").mkdir()
    os.mkfifo(top / "special/fifo", 0o600)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(top / "special/socket"))
    (top / "modes").mkdir()
    (top / "modes/setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(top / "modes/setuid", 0o4755)
    (top / "modes/setgid").mkdir()
    os.chmod(top / "modes/setgid", 0o2775)
    (top / "modes/sticky").mkdir()
    os.chmod(top / "modes/sticky", 0o1777)
    (top / "empty").mkdir()
    many = top / "many"
    many.mkdir()
    for i in range(400):
        (many / (f"file-{i:04d}" + "x" * (i % 40))).write_bytes(b"%d" % i)
    (top / "long").mkdir()
    (top / "long" / ("L" * 255)).write_bytes(b"long name")
    os.setxattr(top / "files/one", "user.comment", b"one byte")
    os.setxattr(top / "many", "user.dir", b"a directory")
    if IS_ROOT:
        os.mknod(top / "special/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(top / "special/loop", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
        os.chown(top / "special/fifo", 100000, 100000)
        os.chown(top / "links/dangling", 65534, 65534, follow_symlinks=False)
        os.chown(top / "files/one", 1000, 1000)
        os.chown(top / "modes/setuid", 0, 1000)
        os.chmod(top / "modes/setuid", 0o4755)  # chown clears setuid
        os.setxattr(top / "files/block", "trusted.kind", b"trusted")
    for i, path in enumerate(sorted(top.rglob("*"))):
        os.utime(path, (1_600_000_000 + i, 1_600_000_000 + i), follow_symlinks=False)
    os.chmod(top, 0o750)
    os.utime(top, (1_500_000_000, 1_500_000_000))
    return top


@pytest.fixture(scope="module")
def disk_image(disk_tree, tmp_path_factory):
    image = tmp_path_factory.mktemp("diskimg") / "disk.sqfs"
    write_directory(disk_tree, image, workers=2)
    return image


# --- from the model ---------------------------------------------------------------------------


def test_unsquashfs_lists_the_model_tree(model_image):
    image, want, _ = model_image
    check_listing(image, want)


def test_unsquashfs_extracts_the_model_tree(model_image, tmp_path):
    need_root("extracting devices and owners")
    image, want, links = model_image
    dest = unsquashfs_extract(image, tmp_path / "out")
    assert_same_tree(snapshot(dest), want)
    assert hardlink_groups(dest) == links


def test_the_kernel_mounts_the_model_tree(model_image, tmp_path):
    image, want, links = model_image
    with kernel_mount(image, tmp_path / "mnt") as mnt:
        assert_same_tree(snapshot(mnt), want)
        assert hardlink_groups(mnt) == links
        assert os.lstat(mnt / "links/original").st_nlink == 3
        assert os.stat(mnt / "deep").st_nlink == 3  # itself, its entry, one subdirectory
        # Lookups through the directory index, for names present and absent.
        names = sorted(os.listdir(mnt / "many"))
        assert len(names) == 700
        for name in names[::37]:
            assert os.lstat(mnt / "many" / name)
        for missing in ("entry-0000", "entry-0350-x", "zzz", "a"):
            assert not os.path.lexists(mnt / "many" / missing)
        assert (mnt / "files/sparse").read_bytes()[1000 : 1000 + 3 * BLOCK] == bytes(3 * BLOCK)


@pytest.mark.parametrize("program", ["squashfuse", "squashfuse_ll"])
def test_squashfuse_mounts_the_model_tree(model_image, tmp_path, program):
    image, want, links = model_image
    with fuse_mount(image, tmp_path / "mnt", program) as mnt:
        assert_same_tree(snapshot(mnt), as_squashfuse_shows(want))
        assert os.lstat(mnt / "links/original").st_nlink == 3
        if program == "squashfuse_ll":
            assert hardlink_groups(mnt) == links


def test_sqfs2tar_and_sqfscat_read_the_model_tree(model_image):
    image, want, _ = model_image
    assert sqfs2tar_snapshot(image) == tar_form(want)
    need("sqfscat")
    cat = subprocess.run(["sqfscat", str(image), "files/five-blocks"], check=True, capture_output=True)
    assert cat.stdout == random_bytes(5 * BLOCK + 123, 4)


def test_identical_files_are_stored_once(model_image):
    image, _, _ = model_image
    stats = subprocess.run(["unsquashfs", "-s", str(image)], check=True, capture_output=True).stdout
    assert b"Duplicates are removed" in stats
    # The three 300 kB random files would not fit in the image without deduplication.
    size = image.stat().st_size
    assert size < 300_000 * 2 + 5 * BLOCK + 2 * BLOCK


# --- from a directory on disk -----------------------------------------------------------------


def test_write_directory_keeps_everything(disk_tree, disk_image, tmp_path):
    want = snapshot(disk_tree)
    check_listing(disk_image, want)
    with kernel_mount(disk_image, tmp_path / "kernel") as mnt:
        assert_same_tree(snapshot(mnt), want)
        assert hardlink_groups(mnt) == hardlink_groups(disk_tree)
    with fuse_mount(disk_image, tmp_path / "fuse") as mnt:
        assert_same_tree(snapshot(mnt), as_squashfuse_shows(want))
        assert hardlink_groups(mnt) == hardlink_groups(disk_tree)
    dest = unsquashfs_extract(disk_image, tmp_path / "out")
    assert_same_tree(snapshot(dest), want)
    assert hardlink_groups(dest) == hardlink_groups(disk_tree)


def test_sqfsdiff_finds_the_same_tree_as_mksquashfs_writes(disk_tree, disk_image, tmp_path):
    """squashfs-tools-ng's sqfsdiff compares entries, owners, modes, times and contents."""
    need("mksquashfs")
    need("sqfsdiff")
    theirs = tmp_path / "mksquashfs.sqfs"
    subprocess.run(["mksquashfs", str(disk_tree), str(theirs), "-noappend", "-quiet", "-no-progress",
                    "-comp", "zstd"], check=True)  # fmt: skip
    diff = subprocess.run(["sqfsdiff", "-T", "-a", str(disk_image), "-b", str(theirs)], capture_output=True)
    assert diff.returncode in (0, 1), diff.stderr
    # Where the two writers choose basic or extended inodes differently, sqfsdiff says so; that is all.
    lines = diff.stdout.decode().splitlines()
    assert [line for line in lines if not line.endswith(("has a basic type", "has an extended type"))] == []


def test_a_hole_becomes_sparse_blocks(tmp_path):
    (tmp_path / "tree").mkdir()
    with open(tmp_path / "tree/hole", "wb") as f:
        f.write(random_bytes(BLOCK, 1))
        f.seek(6 * BLOCK)
        f.write(b"end")
    image = tmp_path / "hole.sqfs"
    write_directory(tmp_path / "tree", image)
    # One block of data, five of zeros that cost nothing, a tail in a fragment.
    assert image.stat().st_size < BLOCK + 8192
    need("unsquashfs")
    out = subprocess.run(["unsquashfs", "-n", "-cat", str(image), "hole"], capture_output=True, check=True)
    assert out.stdout == random_bytes(BLOCK, 1) + bytes(5 * BLOCK) + b"end"
    with kernel_mount(image, tmp_path / "mnt") as mnt:
        st = os.stat(mnt / "hole")
        assert st.st_blocks * 512 < 2 * BLOCK  # the kernel counts the sparse bytes
        assert (mnt / "hole").read_bytes() == random_bytes(BLOCK, 1) + bytes(5 * BLOCK) + b"end"


def test_a_real_debian_tree_round_trips(tmp_path):
    source = Path("/usr/share/doc")
    if not source.is_dir():
        source = Path("/usr/lib/python3.11")
    image = tmp_path / "doc.sqfs"
    write_directory(source, image, level=3)
    want = snapshot(source)
    with kernel_mount(image, tmp_path / "kernel") as mnt:
        assert_same_tree(snapshot(mnt), want)
    with fuse_mount(image, tmp_path / "fuse") as mnt:
        assert_same_tree(snapshot(mnt), as_squashfuse_shows(want))


def test_streaming_a_layer_tar_into_the_writer(tmp_path):
    """How the layer merge feeds the writer: members in tar order, contents read once from the tar
    stream, hard links resolved to the node of their target, the tree handed over at the end."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for name, data in [
            ("usr/bin/tool", random_bytes(200_000, 1)),
            ("etc/motd", b"hi\n"),
            ("etc/empty", b""),
        ]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid, info.mtime = len(data), 0o755, 0, 0, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("usr/bin/tool-again")
        link.type, link.linkname, link.mtime = tarfile.LNKTYPE, "usr/bin/tool", 1_700_000_000
        tar.addfile(link)
        sym = tarfile.TarInfo("usr/bin/alias")
        sym.type, sym.linkname, sym.mtime = tarfile.SYMTYPE, "tool", 1_700_000_000
        tar.addfile(sym)
    layer.seek(0)
    image = tmp_path / "layer.sqfs"
    root = Dir()
    by_path: dict[str, Node] = {}
    with (
        open(image, "w+b") as out,
        SquashfsWriter(out) as writer,
        tarfile.open(fileobj=layer, mode="r|") as tar,
    ):
        for member in tar:
            *parents, name = member.name.split("/")
            parent = root
            for part in parents:
                parent = parent.entries.setdefault(part, Dir(mtime=1_700_000_000))  # type: ignore[assignment]
            common = {"mode": member.mode, "uid": member.uid, "gid": member.gid, "mtime": member.mtime}
            if member.isfile():
                node: Node = File(data=writer.add_data(tar.extractfile(member), member.size), **common)
            elif member.islnk():
                node = by_path[member.linkname]
            else:
                node = Symlink(target=member.linkname, **common)
            parent.entries[name] = by_path[member.name] = node
        writer.finish(root)
    with kernel_mount(image, tmp_path / "mnt") as mnt:
        assert (mnt / "usr/bin/tool-again").read_bytes() == random_bytes(200_000, 1)
        assert os.stat(mnt / "usr/bin/tool").st_nlink == 2
        assert os.readlink(mnt / "usr/bin/alias") == "tool"
        assert (mnt / "etc/motd").read_bytes() == b"hi\n"
        assert sorted(os.listdir(mnt / "etc")) == ["empty", "motd"]


# --- details of the format --------------------------------------------------------------------


def test_an_image_after_other_bytes_is_read_at_its_offset(tmp_path):
    """A compiled executable is the runtime followed by the image: offsets start at the image."""
    path = tmp_path / "with-head"
    head = b"#!runtime\n" + bytes(8182)
    data = text_bytes(3 * BLOCK + 5, 1)
    with open(path, "w+b") as out:
        out.write(head)
        with SquashfsWriter(out, workers=2) as writer:
            ref = writer.add_data(io.BytesIO(data), len(data))
            size = writer.finish(Dir(entries={"payload": File(data=ref)}))
    assert path.stat().st_size == len(head) + size
    assert path.read_bytes()[: len(head)] == head
    need("unsquashfs")
    out = subprocess.run(["unsquashfs", "-n", "-o", str(len(head)), "-cat", str(path), "payload"],
                         capture_output=True, check=True)  # fmt: skip
    assert out.stdout == data
    with kernel_mount(path, tmp_path / "mnt", offset=len(head)) as mnt:
        assert (mnt / "payload").read_bytes() == data


def test_gzip_and_small_blocks(tmp_path):
    """Other block sizes and the gzip compressor: more blocks per file, the same contents."""
    image = tmp_path / "gzip.sqfs"
    contents = {f"f{i}": text_bytes(i * 3001, i) + random_bytes(i * 1000, i) for i in range(12)}
    options = {"compression": "gzip", "block_size": 4096, "dedupe": False, "exportable": False}
    with open(image, "w+b") as out, SquashfsWriter(out, **options) as writer:
        root = Dir()
        for name, data in contents.items():
            root.entries[name] = File(data=writer.add_data(io.BytesIO(data), len(data)))
        writer.finish(root)
    stats = subprocess.run(["unsquashfs", "-s", str(image)], check=True, capture_output=True).stdout
    assert b"Compression gzip" in stats and b"Block size 4096" in stats
    dest = unsquashfs_extract(image, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == contents


class Zeros(io.RawIOBase):
    """A stream of `size` zero bytes that costs no memory."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.chunk = bytes(BLOCK)

    def read(self, n: int = -1) -> bytes:
        n = min(n, self.left, BLOCK)
        self.left -= n
        return self.chunk if n == BLOCK else bytes(n)


def test_a_file_larger_than_4_gib(tmp_path):
    """Sizes past 32 bits go into extended inodes (here a sparse file: only its tail is stored)."""
    size = 5 * 1024**3
    image = tmp_path / "big.sqfs"
    with open(image, "w+b") as out, SquashfsWriter(out, dedupe=False, exportable=False) as writer:
        zeros = writer.add_data(Zeros(size), size)
        tail = writer.add_data(io.BytesIO(b"end"), 3)
        writer.finish(Dir(entries={"zeros": File(data=zeros), "tail": File(data=tail)}))
    assert image.stat().st_size < 1024 * 1024
    assert unsquashfs_listing(image)["zeros"][3] == str(size)
    with kernel_mount(image, tmp_path / "mnt") as mnt:
        assert os.stat(mnt / "zeros").st_size == size
        with open(mnt / "zeros", "rb") as f:
            f.seek(size - 10)
            assert f.read() == bytes(10)
        assert (mnt / "tail").read_bytes() == b"end"


def test_hard_links_far_apart_in_inode_numbers(tmp_path):
    """Entries whose inode numbers differ by more than 32767 need their own directory header."""
    image = tmp_path / "far.sqfs"
    with open(image, "w+b") as out, SquashfsWriter(out) as writer:
        target = File(data=writer.add_data(io.BytesIO(b"shared"), 6))
        crowd = Dir(entries={f"{i:05d}": Fifo() for i in range(33_000)})
        crowd.entries["link"] = target
        writer.finish(Dir(entries={"a": Dir(entries={"target": target}), "crowd": crowd}))
    listing = unsquashfs_listing(image)
    assert len(listing) == 33_005  # with the root
    with kernel_mount(image, tmp_path / "mnt") as mnt:
        assert os.stat(mnt / "crowd/link").st_ino == os.stat(mnt / "a/target").st_ino
        assert (mnt / "crowd/link").read_bytes() == b"shared"
        assert len(os.listdir(mnt / "crowd")) == 33_001
        assert os.path.lexists(mnt / "crowd/32999")


def test_a_device_as_the_only_entry_and_an_empty_root(tmp_path):
    empty = tmp_path / "empty.sqfs"
    with open(empty, "w+b") as out, SquashfsWriter(out) as writer:
        writer.finish(Dir(mode=0o700, uid=1000, gid=1000))
    assert unsquashfs_listing(empty) == {"": ("drwx------", 1000, 1000, "3", None)}
    dev = tmp_path / "dev.sqfs"
    with open(dev, "w+b") as out, SquashfsWriter(out) as writer:
        writer.finish(Dir(entries={"console": Device(kind="c", major=5, minor=1, mode=0o620, gid=5)}))
    assert unsquashfs_listing(dev)["console"] == ("crw--w----", 0, 5, "5,1", None)


# --- bad input --------------------------------------------------------------------------------


def test_bad_trees_are_refused_with_one_line(tmp_path):
    def attempt(root: Dir) -> str:
        with (
            open(tmp_path / "bad.sqfs", "w+b") as out,
            SquashfsWriter(out) as writer,
            pytest.raises(SquashfsError) as err,
        ):
            writer.finish(root)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "invalid entry name" in attempt(Dir(entries={"a/b": Fifo()}))
    assert "invalid entry name" in attempt(Dir(entries={"..": Fifo()}))
    assert "longer than 256" in attempt(Dir(entries={"x" * 257: Fifo()}))
    assert "namespace" in attempt(Dir(entries={"f": Fifo(xattrs={"system.posix_acl_access": b""})}))
    assert "out of range" in attempt(Dir(entries={"f": Fifo(uid=-1)}))
    assert "symlink target" in attempt(Dir(entries={"l": Symlink(target="x" * 4097)}))
    loop = Dir()
    loop.entries["self"] = loop
    assert "twice" in attempt(Dir(entries={"loop": loop}))


def test_bad_settings_are_refused(tmp_path):
    with open(tmp_path / "x.sqfs", "w+b") as out:
        for options, message in [
            ({"compression": "lz4"}, "unknown compression"),
            ({"block_size": 5000}, "not a power of two"),
            ({"block_size": 2 << 20}, "not a power of two"),
            ({"level": 23}, "not between 1 and 22"),
            ({"compression": "gzip", "level": 10}, "not between 1 and 9"),
        ]:
            with pytest.raises(SquashfsError, match=message):
                SquashfsWriter(out, **options)


def test_a_short_stream_is_an_integrity_error(tmp_path):
    with (
        open(tmp_path / "short.sqfs", "w+b") as out,
        SquashfsWriter(out) as writer,
        pytest.raises(IntegrityError, match="ended early"),
    ):
        writer.add_data(io.BytesIO(b"only ten b"), 20)


def test_write_directory_refuses_a_file(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(SquashfsError, match="is not a directory"):
        write_directory(tmp_path / "f", tmp_path / "out.sqfs")
