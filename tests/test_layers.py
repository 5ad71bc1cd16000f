"""A user unpacks image layers: hostile layers can't write outside the root, and every changeset
rule (files, links, whiteouts, opaque folders, modes, sparse files, devices, …) lands as Docker and
umoci put it.

The hostile table restates, as our own cases, the breakout scenarios of containerd's
pkg/archive TestBreakouts, moby/go-archive's TestApplyLayerInvalid*/TestUntarInvalid* and umoci's
oci/layer tar_extract tests. Each case is applied into tmp/root with a canary folder beside it;
the layer is either refused with a LayerError naming the entry, or applied harmlessly inside the
root. Either way nothing outside the root changes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from layer_builder import CHR, FIFO, OPQ, WH, D, F, H, S, tar_bytes, tree, write_layout
from ocibox.errors import IntegrityError, LayerError
from ocibox.layers import Applier, apply_layer, apply_layers, parse_rootless_xattr, read_meta

REPO = Path(__file__).resolve().parents[1]


def snapshot(top: Path, skip: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p == skip:
                continue
            st = p.lstat()
            content = (
                p.read_bytes() if stat.S_ISREG(st.st_mode) else (os.readlink(p) if p.is_symlink() else "")
            )
            out[str(p)] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, st.st_nlink, content)
    return out


@pytest.fixture(params=["openat2", "walk"])
def resolver(request) -> bool:
    """Both resolvers: openat2(RESOLVE_IN_ROOT) and the no-follow openat walk."""
    return request.param == "openat2"


@dataclass
class World:
    tmp: Path
    root: Path
    outside: Path
    use_openat2: bool

    def apply(self, *layers: list, rootless: bool | None = None) -> None:
        app = Applier(self.root, rootless=rootless, use_openat2=self.use_openat2)
        try:
            for entries in layers:
                apply_layer(self.root, io.BytesIO(tar_bytes(entries)), applier=app)
            app.finish()
        finally:
            app.close()

    def inside(self, path: str) -> Path:
        return self.root / path.lstrip("/")


@pytest.fixture
def world(tmp_path: Path, resolver: bool) -> World:
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "file").write_text("canary")
    (outside / "file").chmod(0o400)
    (outside / "dir" / "passwd").write_text("host passwd")
    root = tmp_path / "root"
    root.mkdir()
    return World(tmp_path, root, outside, resolver)


def _read(p: Path) -> str:
    return p.read_text()


# Each case: (name, layers as a function of the canary folder, expectation).
# expectation: "refused" (LayerError naming the entry) or a check run on the World.
Case = tuple[str, Callable[[Path], list[list]], object]

HOSTILE: list[Case] = [
    # names
    ("dotdot_relative", lambda o: [[F("../outside/file", "pwned")]], "refused"),
    ("dotdot_inside_then_out", lambda o: [[F("a/../../outside/file", "pwned")]], "refused"),
    ("dotdot_runs", lambda o: [[F("./.././../outside/new", "pwned")]], "refused"),
    (
        "absolute_name_is_rooted",
        lambda o: [[F(str(o / "file"), "pwned")]],
        lambda w: _read(w.inside(str(w.outside / "file"))) == "pwned",
    ),
    (
        "absolute_dotdot_is_clamped",
        lambda o: [[F("/../../../x", "in")]],
        lambda w: _read(w.inside("x")) == "in",
    ),
    ("symlink_named_dotdot", lambda o: [[S("..", "/etc")]], "refused"),
    ("symlink_with_empty_name", lambda o: [[S("", "/etc")]], "refused"),
    ("file_replacing_root", lambda o: [[F("./", "x")]], "refused"),
    # symlinks written through (containerd SymlinkAbsolute, SymlinkUpAndOut, SymlinkMultiple*)
    (
        "symlink_absolute_host_path",
        lambda o: [[S("escape", str(o)), F("escape/file", "pwned")]],
        lambda w: _read(w.inside(str(w.outside / "file"))) == "pwned",
    ),
    (
        "symlink_relative_up_and_out",
        lambda o: [[S("escape", "../../../../" + str(o)), F("escape/new", "x")]],
        lambda w: w.inside(str(w.outside / "new")).is_file(),
    ),
    (
        "symlink_up_via_dummy",
        lambda o: [
            [D("etc"), D("dummy"), S("localetc", "/dummy/../etc"), F("/localetc/unbroken", "unbroken")]
        ],
        lambda w: _read(w.inside("etc/unbroken")) == "unbroken",
    ),
    (
        "symlink_chain_absolute",
        lambda o: [
            [
                D("etc"),
                D("dummy"),
                S("/dummy/etc", "/etc"),
                S("localetc", "/dummy/etc"),
                F("/dummy/etc/unbroken", "ok"),
            ]
        ],
        lambda w: _read(w.inside("etc/unbroken")) == "ok",
    ),
    (
        "symlink_chain_relative",
        lambda o: [
            [
                D("etc"),
                D("dummy"),
                S("/dummy/etc", "/etc"),
                S("localetc", "./dummy/etc"),
                F("localetc/unbroken", "ok"),
            ]
        ],
        lambda w: _read(w.inside("etc/unbroken")) == "ok",
    ),
    (
        "symlink_from_lower_layer",
        lambda o: [[S("escape", str(o))], [F("escape/file", "pwned")]],
        lambda w: _read(w.inside(str(w.outside / "file"))) == "pwned",
    ),
    (
        "symlink_then_folders_through_it",
        lambda o: [[S("x", str(o)), D("x/sub"), F("x/sub/f", "in")]],
        lambda w: _read(w.inside(str(w.outside / "sub/f"))) == "in",
    ),
    (
        "implied_folders_through_dangling_symlink",
        lambda o: [[S("x", "/nowhere/deep")], [F("x/sub/f", "in")]],
        lambda w: _read(w.inside("nowhere/deep/sub/f")) == "in",
    ),
    (
        "file_replaces_symlink_not_target",
        lambda o: [[S("victim", str(o / "file")), F("victim", "new")]],
        lambda w: w.inside("victim").is_file() and not w.inside("victim").is_symlink(),
    ),
    (
        "symlink_empties_file_inside_only",
        lambda o: [[D("etc"), F("etc/emptied", "full"), S("localetc", "/etc"), F("/localetc/emptied", "")]],
        lambda w: _read(w.inside("etc/emptied")) == "",
    ),
    ("symlink_loop", lambda o: [[S("a", "b"), S("b", "a"), F("a/x", "x")]], "refused"),
    ("file_under_a_file", lambda o: [[F("f", "x"), F("f/x", "y")]], "refused"),
    (
        "dir_replaces_symlink",
        lambda o: [[S("localetc", str(o))], [D("localetc"), F("localetc/file", "in")]],
        lambda w: w.inside("localetc").is_dir() and not w.inside("localetc").is_symlink(),
    ),
    # hardlinks (containerd Hardlink*, moby TestUntarInvalidHardlink)
    ("hardlink_relative_out", lambda o: [[H("h", "../outside/file")]], "refused"),
    ("hardlink_deep_relative_out", lambda o: [[H("h", "../../../../../" + str(o / "file"))]], "refused"),
    ("hardlink_absolute_host_path", lambda o: [[H("h", str(o / "file"))]], "refused"),
    (
        "hardlink_absolute_inside",
        lambda o: [[D("etc"), F("etc/passwd", "inside"), H("localpasswd", "/etc/passwd")]],
        lambda w: w.inside("localpasswd").stat().st_ino == w.inside("etc/passwd").stat().st_ino,
    ),
    (
        "hardlink_through_abs_symlink",
        lambda o: [
            [D("etc"), F("etc/passwd", "in"), S("localetc", "/etc"), H("localpasswd", "/localetc/passwd")]
        ],
        lambda w: w.inside("localpasswd").stat().st_ino == w.inside("etc/passwd").stat().st_ino,
    ),
    (
        "hardlink_through_long_relative_symlink",
        lambda o: [
            [
                D("etc"),
                F("etc/passwd", "in"),
                S("localetc", "../../../../../../../etc"),
                H("localpasswd", "/localetc/passwd"),
            ]
        ],
        lambda w: w.inside("localpasswd").stat().st_ino == w.inside("etc/passwd").stat().st_ino,
    ),
    ("hardlink_through_symlink_to_host", lambda o: [[S("le", str(o)), H("h", "le/file")]], "refused"),
    ("hardlink_to_folder", lambda o: [[D("dir"), H("loophole", "dir")]], "refused"),
    ("hardlink_to_missing", lambda o: [[H("h", "nothing")]], "refused"),
    (
        "hardlink_replaced_not_written_through",
        lambda o: [[D("etc"), F("etc/passwd", "inside"), H("link", "etc/passwd"), F("link", "new")]],
        lambda w: _read(w.inside("etc/passwd")) == "inside" and _read(w.inside("link")) == "new",
    ),
    (
        "hardlink_to_symlink_links_the_symlink",
        lambda o: [
            [D("etc"), S("localpasswd", "/etc/passwd"), H("dup", "localpasswd"), F("etc/passwd", "after")]
        ],
        lambda w: os.readlink(w.inside("dup")) == "/etc/passwd",
    ),
    (
        "hardlink_to_host_symlink_no_chmod",
        lambda o: [[S(str(o / "alias"), str(o / "file")), H("sketchy", str(o / "alias"), mode=0o777)]],
        lambda w: stat.S_IMODE((w.outside / "file").stat().st_mode) == 0o400,
    ),
    # whiteouts (containerd Whiteout*, umoci TestUnpackEntryWhiteout)
    ("whiteout_root_parent", lambda o: [[D("etc"), F("etc/passwd", "x")], [F(".wh...")]], "refused"),
    ("whiteout_parent", lambda o: [[D("etc"), F("etc/passwd", "x")], [F("etc/.wh...")]], "refused"),
    ("whiteout_root", lambda o: [[D("etc"), F("etc/passwd", "x")], [F(".wh..")]], "refused"),
    ("whiteout_current_folder", lambda o: [[D("etc"), F("etc/passwd", "x")], [F("etc/.wh..")]], "refused"),
    ("whiteout_empty_name", lambda o: [[F("etc/.wh.")]], "refused"),
    (
        "whiteout_symlink_removes_link_only",
        lambda o: [[D("etc"), F("etc/passwd", "all"), S("localetc", "/etc")], [WH("localetc")]],
        lambda w: _read(w.inside("etc/passwd")) == "all" and not os.path.lexists(w.inside("localetc")),
    ),
    (
        "whiteout_through_symlink_stays_inside",
        lambda o: [[S("le", str(o))], [F("le/.wh.file")]],
        lambda w: True,
    ),
    (
        "whiteout_through_symlink_path",
        lambda o: [[D("etc"), F("etc/gone", "x"), S("localetc", "/etc")], [F("localetc/.wh.gone")]],
        lambda w: not w.inside("etc/gone").exists(),
    ),
    (
        "whiteout_dead_symlink_parent",
        lambda o: [[D("etc"), F("etc/passwd", "all"), S("localetc", "/dne")], [F("localetc/.wh.etc")]],
        lambda w: _read(w.inside("etc/passwd")) == "all",
    ),
    (
        "whiteout_relative_path",
        lambda o: [[D("etc"), F("etc/passwd", "all")], [F("dne/../.wh.etc")]],
        lambda w: not w.inside("etc").exists(),
    ),
    (
        "whiteout_folder_name_is_a_file",
        lambda o: [[F(".wh.etc/somefile", "non-empty")]],
        lambda w: _read(w.inside(".wh.etc/somefile")) == "non-empty",
    ),
    ("opaque_through_symlink", lambda o: [[S("le", str(o))], [OPQ("le")]], lambda w: True),
    (
        "opaque_through_symlink_inside",
        lambda o: [[D("etc"), F("etc/old", "x"), S("le", "/etc")], [OPQ("le"), F("etc/new", "y")]],
        lambda w: sorted(tree(w.root)) == ["etc", "etc/new", "le"],
    ),
    ("opaque_through_symlink_to_host_etc", lambda o: [[S("le", "/etc")], [OPQ("le")]], lambda w: True),
]


@pytest.mark.parametrize("name,layers,expect", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_layer_never_writes_outside_the_root(world: World, name: str, layers, expect) -> None:
    before = snapshot(world.tmp, world.root)
    host_etc = os.stat("/etc").st_mtime_ns
    entries = layers(world.outside)
    if expect == "refused":
        with pytest.raises(LayerError) as err:
            world.apply(*entries)
        last = [e.name for layer in entries for e in layer]
        assert any(repr(n) in str(err.value) or n in str(err.value) for n in last), str(err.value)
    else:
        world.apply(*entries)
        assert expect(world), f"{name}: unexpected tree {sorted(tree(world.root))}"
    assert snapshot(world.tmp, world.root) == before
    assert os.stat("/etc").st_mtime_ns == host_etc


def test_truncated_and_garbage_layers_are_refused(tmp_path: Path) -> None:
    good = tar_bytes([F("a", "x" * 5000)])
    for bad in (
        good[:1100],
        b"\x00" * 100 + b"junk" * 300,
        gzip.compress(good)[:-4],
        gzip.compress(good)[:40],
    ):
        with pytest.raises(LayerError):
            apply_layer(tmp_path / "root", io.BytesIO(bad))


def test_go_tar_corpus_fails_cleanly_or_stays_inside(tmp_path: Path) -> None:
    """Malformed headers from Go's archive/tar test data: a LayerError or a harmless unpack."""
    corpus = Path("/usr/share/go-1.19/src/archive/tar/testdata")
    if not corpus.is_dir():
        pytest.skip("golang-1.19-src is not installed")
    for n, tf in enumerate(sorted(corpus.glob("*.tar"))):
        root = tmp_path / f"r{n}" / "root"
        canary = root.parent / "canary"
        canary.mkdir(parents=True)
        try:
            apply_layer(root, tf.open("rb"), rootless=True)
        except (LayerError, IntegrityError):
            pass
        assert list(canary.iterdir()) == [], tf.name
        assert sorted(p.name for p in root.parent.iterdir()) in (
            ["canary", "root"],
            ["canary", "root", "root.meta"],
        )


# --- functional rules --------------------------------------------------------------------------


def apply_all(root: Path, *layers: list, rootless: bool | None = None) -> None:
    app = Applier(root, rootless=rootless)
    try:
        for entries in layers:
            apply_layer(root, io.BytesIO(tar_bytes(entries)), applier=app)
        app.finish()
    finally:
        app.close()


def listing(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        out += [str(rel / d) + "/" if str(rel) != "." else d + "/" for d in dirnames]
        out += [str(rel / f) if str(rel) != "." else f for f in filenames]
    return sorted(out)


def _layer(paths: list[str]) -> list:
    return [D(p) if p.endswith("/") else F(p) for p in paths]


def test_whiteouts_and_opaque_folders_follow_the_image_spec(tmp_path: Path) -> None:
    """moby's TestApplyLayerWhiteouts vector: a base and three change sets, each with its listing."""
    base = [
        ".baz",
        "bar/",
        "bar/bax",
        "bar/bay/",
        "baz",
        "foo/",
        "foo/.abc",
        "foo/.bcd/",
        "foo/.bcd/a",
        "foo/cde/",
        "foo/cde/def",
        "foo/cde/efg",
        "foo/fgh",
        "foobar",
    ]
    steps = [
        (base, base),
        (
            [".bay", ".wh.baz", "foo/", "foo/.bce", "foo/.wh..wh..opq", "foo/cde/", "foo/cde/efg"],
            [
                ".bay",
                ".baz",
                "bar/",
                "bar/bax",
                "bar/bay/",
                "foo/",
                "foo/.bce",
                "foo/cde/",
                "foo/cde/efg",
                "foobar",
            ],
        ),
        (
            [".bay", ".wh..baz", ".wh.foobar", "foo/", "foo/.abc", "foo/.wh.cde", "bar/"],
            [".bay", "bar/", "bar/bax", "bar/bay/", "foo/", "foo/.abc", "foo/.bce"],
        ),
        ([".abc", ".wh..wh..opq", "foobar"], [".abc", "foobar"]),
    ]
    root = tmp_path / "root"
    for change, expected in steps:
        apply_all(root, _layer(change))
        assert listing(root) == sorted(expected)


def test_whiteouts_keep_entries_of_their_own_layer(tmp_path: Path) -> None:
    root = tmp_path / "root"
    apply_all(
        root,
        [F("etc/obsolete", "old"), F("etc/keep/lower", "lower"), F("usr/bin/tool", "old")],
        [
            F("etc/current", "c"),
            F("etc/keep/current", "c"),
            F("usr/bin/tool", "new"),
            WH("usr/bin/tool"),
            OPQ("etc"),
        ],
    )
    assert listing(root) == [
        "etc/",
        "etc/current",
        "etc/keep/",
        "etc/keep/current",
        "usr/",
        "usr/bin/",
        "usr/bin/tool",
    ]
    assert (root / "usr/bin/tool").read_text() == "new"


@pytest.mark.parametrize(
    "layers,expected",
    [
        # ggcr#2191: a whited-out folder comes back with new content only
        ([[F("a/foo"), F("b/bar")], [WH("a")], [F("a/baz")]], ["a/", "a/baz", "b/", "b/bar"]),
        # opaque marker before its siblings, in a single layer, hides nothing of its own layer
        ([[D("d"), OPQ("d"), F("d/c.txt")]], ["d/", "d/c.txt"]),
        # upper d/.wh..wh..opq hides lower d/a.txt and d/b.txt but keeps upper d/c.txt (ggcr TestExtractOpaqueWhiteout)
        ([[F("d/a.txt"), F("d/b.txt")], [D("d"), F("d/c.txt"), OPQ("d")]], ["d/", "d/c.txt"]),
        # opaque, multi-level: lower nested content goes, upper nested content stays (umoci MultiLevel)
        (
            [[F("a/b/c/lower"), F("a/b/lower2")], [OPQ("a"), F("a/b/c/upper")]],
            ["a/", "a/b/", "a/b/c/", "a/b/c/upper"],
        ),
        # whiteout of a folder removes all of it
        ([[F("d/x/y"), F("d/z")], [WH("d")]], []),
        # whiteout of something that never existed is a no-op
        ([[F("a")], [WH("nothing"), WH("deep/nothing")]], ["a"]),
        # a file replaces a folder, a folder replaces a file
        ([[F("x/inner"), F("y")], [F("x", "now a file"), D("y"), F("y/inner")]], ["x", "y/", "y/inner"]),
    ],
)
def test_changesets(tmp_path: Path, layers, expected) -> None:
    root = tmp_path / "root"
    apply_all(root, *layers)
    assert listing(root) == sorted(expected)


def test_files_folders_links_modes_and_times_land_as_the_layer_says(tmp_path: Path) -> None:
    root = tmp_path / "root"
    long_dir = "d" * 60 + "/" + "e" * 60
    apply_all(
        root,
        [
            D("bin", 0o755),
            F("bin/tool", "#!/bin/sh\n", 0o4755),
            F("bin/group", "g", 0o2711),
            D("tmp", 0o1777),
            D("locked", 0o500),
            F("locked/f", "in a 0500 folder"),
            D("secret", 0o000),
            F("shadow", "x", 0o000),
            S("abs", "/etc/../bin/tool"),
            S("rel", "../../../outside"),
            S("dangling", "nowhere"),
            F("hard1", "same inode"),
            H("hard2", "hard1"),
            D(long_dir),
            F(long_dir + "/" + "f" * 120, "long name"),
            S("longlink", "/" + "t" * 200),
            FIFO("fifo", 0o640),
            F("xattr", "x", pax={"SCHILY.xattr.user.note": "hello"}),
        ],
        [
            F("locked/g", "added by a later layer"),
            H("hard3", "hard1"),
        ],
    )
    mode = lambda p: stat.S_IMODE((root / p).lstat().st_mode)  # noqa: E731
    assert mode("bin/tool") == 0o4755 and mode("bin/group") == 0o2711 and mode("tmp") == 0o1777
    assert mode("locked") == 0o500 and mode("secret") == 0o000 and mode("shadow") == 0o000
    assert (root / "locked/g").read_text() == "added by a later layer"
    assert os.readlink(root / "abs") == "/etc/../bin/tool" and os.readlink(root / "rel") == "../../../outside"
    assert os.readlink(root / "dangling") == "nowhere" and os.readlink(root / "longlink") == "/" + "t" * 200
    assert (root / long_dir / ("f" * 120)).read_text() == "long name"
    ino = (root / "hard1").stat().st_ino
    assert (root / "hard2").stat().st_ino == ino == (root / "hard3").stat().st_ino
    assert (root / "hard1").stat().st_nlink == 3
    assert stat.S_ISFIFO((root / "fifo").lstat().st_mode) and mode("fifo") == 0o640
    assert os.getxattr(root / "xattr", "user.note") == b"hello"
    assert (root / "bin/tool").stat().st_mtime == 1_600_000_000
    assert (root / "locked").stat().st_mtime == 1_600_000_000
    assert (root / "abs").lstat().st_mtime == 1_600_000_000
    (root / "secret").chmod(0o700)


def test_gnu_long_names_and_link_targets(tmp_path: Path) -> None:
    name = "g/" + "n" * 150
    data = tar_bytes([F(name, "gnu"), S("s", "x" * 180), H("h" * 120, name)], fmt=tarfile.GNU_FORMAT)
    apply_layer(tmp_path / "root", io.BytesIO(data))
    assert (tmp_path / "root" / name).read_text() == "gnu"
    assert os.readlink(tmp_path / "root/s") == "x" * 180
    assert (tmp_path / "root" / ("h" * 120)).stat().st_nlink == 2


def test_sparse_files_from_gnu_tar(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(50 << 20)
        f.write(b"end")
        f.seek(1 << 20)
        f.write(b"middle")
    for fmt in ("gnu", "posix"):
        layer = tmp_path / f"{fmt}.tar"
        subprocess.run(
            ["tar", "--sparse", f"--format={fmt}", "-C", str(src), "-cf", str(layer), "sparse"], check=True
        )
        root = tmp_path / f"root-{fmt}"
        apply_layers(root, [(layer, None)])
        out = root / "sparse"
        assert out.stat().st_size == (50 << 20) + 3
        assert (
            hashlib.sha256(out.read_bytes()).digest()
            == hashlib.sha256((src / "sparse").read_bytes()).digest()
        )
        assert out.stat().st_blocks * 512 < (1 << 20) * 4


def test_compression_is_detected_from_the_bytes_and_diff_ids_checked(tmp_path: Path) -> None:
    import zstandard

    raw = tar_bytes([F("hello", "world")])
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    variants = {
        "plain": raw,
        "gzip": gzip.compress(raw),
        "gzip-multi-member": gzip.compress(raw[:700]) + gzip.compress(raw[700:]),
        "zstd": zstandard.ZstdCompressor().compress(raw),
    }
    for name, blob in variants.items():
        path = tmp_path / f"{name}.layer"
        path.write_bytes(blob)
        root = tmp_path / name
        apply_layers(root, [(path, digest)])
        assert (root / "hello").read_text() == "world", name
    with pytest.raises(IntegrityError, match="DiffID"):
        apply_layers(tmp_path / "bad", [(tmp_path / "gzip.layer", "sha256:" + "0" * 64)])


def test_devices_as_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = tmp_path / "root"
    apply_all(root, [D("dev"), CHR("dev/null", 1, 3), F("owned", "x", uid=1234, gid=5678)], rootless=False)
    st = (root / "dev/null").lstat()
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert (root / "owned").stat().st_uid == 1234 and (root / "owned").stat().st_gid == 5678


def test_rootless_records_ownership_in_xattr_and_meta_file(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    apply_all(
        root,
        [
            D("etc"),
            F("etc/shadow", "s", 0o640, gid=42),
            D("home/u", 0o700, uid=1000, gid=1000),
            S("home/u/link", "x", uid=1000),
            CHR("null", 1, 3),
            F("plain", "p"),
        ],
        rootless=True,
    )
    assert parse_rootless_xattr(os.getxattr(root / "etc/shadow", "user.rootlesscontainers")) == (0, 42)
    assert parse_rootless_xattr(os.getxattr(root / "home/u", "user.rootlesscontainers")) == (1000, 1000)
    assert "user.rootlesscontainers" not in os.listxattr(root / "plain")
    meta = read_meta(tmp_path / "rootfs.meta")
    assert meta["/etc/shadow"] == {"path": "/etc/shadow", "type": "file", "uid": 0, "gid": 42, "mode": 0o640}
    assert meta["/home/u/link"]["uid"] == 1000 and meta["/home/u"]["mode"] == 0o700
    assert meta["/null"] == {
        "path": "/null",
        "type": "char",
        "uid": 0,
        "gid": 0,
        "mode": 0o666,
        "rdev": [1, 3],
    }
    assert not (root / "null").exists() and "/plain" not in meta


# --- as the unprivileged user ------------------------------------------------------------------


@pytest.fixture(scope="module")
def user_src(tmp_path_factory) -> Path:
    """A world-readable copy of src/ and tests/layer_builder.py for the test user."""
    top = Path(tmp_path_factory.mktemp("user-src"))
    shutil.copytree(REPO / "src" / "ocibox", top / "ocibox")
    shutil.copy(REPO / "tests" / "layer_builder.py", top / "layer_builder.py")
    for p in [top, *top.parents]:
        if p == Path("/"):
            break
        p.chmod(p.stat().st_mode | 0o755)
    for dirpath, _, files in os.walk(top):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)
    return top


def run_as_user(src: Path, script: str, cwd: Path) -> subprocess.CompletedProcess:
    try:
        import pwd

        pw = pwd.getpwnam("ocibox-test")
    except KeyError:
        pytest.skip("the test user ocibox-test does not exist (scripts/setup.sh makes it)")
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the test user")
    cwd.mkdir(parents=True, exist_ok=True)
    os.chown(cwd, pw.pw_uid, pw.pw_gid)
    for p in cwd.parents:
        if p == Path("/"):
            break
        p.chmod(p.stat().st_mode | 0o711)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(src), "HOME": str(cwd), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={pw.pw_uid}",
            f"--regid={pw.pw_gid}",
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-c",
            script,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


USER_SCRIPT = r"""
import io, json, os, stat
from pathlib import Path
from layer_builder import CHR, D, F, H, S, FIFO, tar_bytes
from ocibox.layers import Applier, apply_layer
root = Path("rootfs")
app = Applier(root)
layers = [
    [D("etc"), F("etc/shadow", "s", 0o640, gid=42), D("ro", 0o500), F("ro/a", "a"), D("none", 0o000),
     F("none/x", "x", 0o000), F("suid", "s", 0o4755), CHR("dev-null", 1, 3), FIFO("fifo"),
     D("home/u", 0o750, uid=1000, gid=1000), F("home/u/f", "f", uid=1000, gid=1000), H("hl", "none/x")],
    [F("ro/b", "later"), F("none/y", "later", 0o000), F("etc/shadow", "replaced", 0o600, gid=42)],
]
for entries in layers:
    apply_layer(root, io.BytesIO(tar_bytes(entries)), applier=app)
app.finish()
m = lambda p: oct(stat.S_IMODE((root / p).lstat().st_mode))
out = {"uid": os.getuid(), "owners": sorted({(root / p).lstat().st_uid for p in ["etc/shadow", "ro", "home/u/f"]}),
       "ro": m("ro"), "none": m("none"), "suid": m("suid"), "dev": os.path.lexists(root / "dev-null"),
       "fifo": stat.S_ISFIFO((root / "fifo").lstat().st_mode),
       "xattr": list(os.getxattr(root / "home/u/f", "user.rootlesscontainers")),
       "meta": [json.loads(line) for line in open("rootfs.meta")]}
os.chmod(root / "ro", 0o700); os.chmod(root / "none", 0o700)
out["ro_b"] = (root / "ro/b").read_text()
out["hl"] = (root / "hl").stat().st_ino == (root / "none/x").stat().st_ino
print(json.dumps(out))
"""


@pytest.mark.rootless
def test_unpacking_as_a_user(user_src: Path, tmp_path: Path) -> None:
    proc = run_as_user(user_src, USER_SCRIPT, tmp_path / "work")
    assert proc.returncode == 0, proc.stderr
    assert "device nodes can't be made as a user" in proc.stderr
    out = json.loads(proc.stdout)
    assert out["owners"] == [out["uid"]]
    assert out["ro"] == "0o500" and out["none"] == "0o0" and out["suid"] == "0o4755"
    assert out["dev"] is False and out["fifo"] is True and out["ro_b"] == "later" and out["hl"]
    assert bytes(out["xattr"]) == b"\x08\xe8\x07\x10\xe8\x07"
    meta = {r["path"]: r for r in out["meta"]}
    assert meta["/etc/shadow"]["gid"] == 42 and meta["/etc/shadow"]["mode"] == 0o600
    assert meta["/dev-null"]["rdev"] == [1, 3] and meta["/home/u"]["mode"] == 0o750


# --- against umoci ----------------------------------------------------------------------------

UMOCI_LAYERS = [
    [
        D("etc"),
        F("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
        F("etc/shadow", "s", 0o640, gid=42),
        D("usr/bin", 0o755),
        F("usr/bin/tool", b"\x7fELF" + b"\0" * 5000, 0o4755),
        F("usr/bin/g", "g", 0o2755),
        S("usr/bin/abs", "/usr/bin/tool"),
        S("usr/bin/up", "../../../../etc/passwd"),
        D("tmp", 0o1777),
        F("hard1", "h"),
        H("hard2", "hard1"),
        D("gone/deep"),
        F("gone/deep/f"),
        F("replace-me", "file"),
        D("dir-to-file"),
        F("dir-to-file/x"),
        D("opq"),
        F("opq/lower"),
        D("opq/sub"),
        F("opq/sub/lower"),
        D("ro", 0o555),
        F("ro/f", "ro"),
        FIFO("fifo"),
        F("p" * 90 + "/" + "q" * 90, "long"),
    ],
    [
        WH("gone"),
        D("replace-me"),
        F("replace-me/now", "dir"),
        F("dir-to-file", "file now"),
        D("opq"),
        OPQ("opq"),
        F("opq/upper"),
        H("hard3", "hard1"),
        F("ro/g", "later"),
        F("usr/bin/new", "n", 0o700),
        S("etc/link", "passwd"),
    ],
    [WH("hard2"), F("etc/passwd", "root:x:0:0::/root:/bin/bash\n")],
]


def test_same_tree_as_umoci(tmp_path: Path) -> None:
    if not shutil.which("umoci"):
        pytest.skip("umoci is not installed")
    layers = [tar_bytes(entries) for entries in UMOCI_LAYERS]
    layout = tmp_path / "layout"
    write_layout(layout, "test", layers)
    bundle = tmp_path / "bundle"
    proc = subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:test", str(bundle)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    ours = tmp_path / "ours" / "rootfs"
    blobs = []
    for n, raw in enumerate(layers):
        p = tmp_path / f"l{n}.tar"
        p.write_bytes(raw)
        blobs.append((p, "sha256:" + hashlib.sha256(raw).hexdigest()))
    apply_layers(ours, blobs, rootless=True)
    theirs, mine = tree(bundle / "rootfs"), tree(ours)
    assert sorted(theirs) == sorted(mine)
    for path in theirs:
        assert theirs[path] == mine[path], path
    for path in ("etc/shadow",):
        assert os.getxattr(ours / path, "user.rootlesscontainers") == os.getxattr(
            bundle / "rootfs" / path, "user.rootlesscontainers"
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
