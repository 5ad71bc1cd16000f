"""The two slow test images, built once per machine and cached outside the repo.

One OCI layout under /var/cache/ocibox-tests/<RECIPE>/layout holds both tags:

    debian  layer 1: `debootstrap --variant=minbase bookworm` from the machine's apt mirror
            layer 2: whiteouts for a file and a folder, and one new file
    python  debian + layer 3: python3, layer 4: python3-pip python3-venv python3-yaml
            python3-requests python3-jinja2 (apt-get in a chroot, --no-install-recommends)

Layers 2-4 are real diffs of the root filesystem before and after each step: new and changed
files, and a whiteout for each removed path. Building needs root (debootstrap, chroot) and
takes a few minutes; the cache is keyed by RECIPE (this file's hash) and guarded by a file lock, so concurrent test
sessions build it once. `facts.json` next to the layout records sizes, file counts, and the paths
the whiteout layer removes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from .layout import CREATED, EPOCH, Layout

# The cache key: a new version of this file builds new images (and drops the old ones).
RECIPE = "bookworm-minbase-python-" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
CACHE_ROOT = Path(os.environ.get("OCIBOX_TEST_CACHE", "/var/cache/ocibox-tests"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DELETED_FILE = "etc/issue.net"
DELETED_DIR = "usr/share/doc/base-files"
ADDED_FILE = "etc/ocibox-test-image"
PYTHON_EXTRAS = ["python3-pip", "python3-venv", "python3-yaml", "python3-requests", "python3-jinja2"]
# Never in a layer: kernel filesystems and device nodes are the runtime's business.
EMPTY_DIRS = ("dev", "proc", "sys", "tmp", "run")
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "DEBIAN_FRONTEND": "noninteractive",
    "LC_ALL": "C",
    "HOME": "/root",
}

Snapshot = dict[str, tuple]


@dataclass
class BuiltLayout:
    path: Path
    facts: dict  # image name -> facts


def apt_mirror() -> str:
    """The Debian mirror the machine's apt uses (deb822 .sources or one-line lists)."""
    for source in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in source.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and re.search(r"\bbookworm\b", suites.group(1)) and "security" not in uris[1]:
                return uris.group(1)
    lists = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for path in lists:
        if path.exists():
            m = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s+bookworm\s", path.read_text(), re.M)
            if m:
                return m.group(1)
    return DEFAULT_MIRROR


def snapshot(root: Path) -> Snapshot:
    """path (relative) -> what identifies its content, for every entry but the kernel folders'."""
    result: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir in EMPTY_DIRS:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.lstat(os.path.join(dirpath, name))
            link = (
                os.readlink(os.path.join(dirpath, name))
                if os.path.islink(os.path.join(dirpath, name))
                else ""
            )
            result[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ino, link)
    return result


def diff(before: Snapshot, after: Snapshot) -> tuple[list[str], list[str]]:
    """(paths new or changed, top-most paths removed)."""
    changed = sorted(p for p, meta in after.items() if before.get(p) != meta)
    removed = sorted(p for p in before if p not in after)
    removed_set = set(removed)
    top_removed = [p for p in removed if not any(a in removed_set for a in _ancestors(p))]
    return changed, top_removed


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uname = info.gname = ""
    return info


def add_tree_layer(layout: Layout, root: Path, paths: list[str], removed: list[str]):
    """A gzip layer with `paths` from `root` and a whiteout for each of `removed`."""
    items = [(p, False) for p in paths] + [(_whiteout_name(p), True) for p in removed]
    items.sort()

    def fill(tar: tarfile.TarFile) -> None:
        for name, is_whiteout in items:
            if is_whiteout:
                info = tarfile.TarInfo(name)
                info.mtime = EPOCH
                info.mode = 0o644
                tar.addfile(info)
            else:
                tar.add(root / name, arcname=name, recursive=False, filter=_clean)

    return layout.add_layer(fill, "gzip")


def _whiteout_name(path: str) -> str:
    parent, _, name = path.rpartition("/")
    return (parent + "/" if parent else "") + ".wh." + name


def _run(cmd: list[str], **kwargs) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )


def _chroot_apt(root: Path, packages: list[str]) -> None:
    """apt-get install in the chroot, then leave no package lists or .debs behind."""
    resolv = root / "etc" / "resolv.conf"
    had_resolv = resolv.exists() or resolv.is_symlink()
    if not had_resolv:
        shutil.copyfile("/etc/resolv.conf", resolv)
    _run(["mount", "-t", "proc", "proc", str(root / "proc")])
    try:
        _run(["chroot", str(root), "apt-get", "update", "-qq"], env=CHROOT_ENV)
        _run(
            ["chroot", str(root), "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
            env=CHROOT_ENV,
        )
        _run(["chroot", str(root), "apt-get", "clean"], env=CHROOT_ENV)
    finally:
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)
    _remove_package_lists(root)
    if not had_resolv:
        resolv.unlink()


def _remove_package_lists(root: Path) -> None:
    """apt's package lists (50 MB) are the machine's business, not the image's, as in Docker's images."""
    for path in (root / "var/lib/apt/lists").iterdir():
        if path.is_file() and path.name != "lock":
            path.unlink()


def _rootfs_facts(snap: Snapshot, layers: list) -> dict:
    regular = [meta for meta in snap.values() if (meta[0] & 0o170000) == 0o100000]
    return {
        "layers": len(layers),
        "entries": len(snap),
        "files": len(regular),
        "file_bytes": sum(meta[3] for meta in regular),
        "compressed_size": sum(layer.size for layer in layers),
        "tar_size": sum(layer.unpacked_size for layer in layers),
    }


def build(target: Path, workdir: Path) -> dict:
    """Build the layout at `target` using `workdir` for the root filesystem; returns the facts."""
    root = workdir / "rootfs"
    layout = Layout(target)
    timings = {}
    start = time.monotonic()
    _run(["debootstrap", "--variant=minbase", "bookworm", str(root), apt_mirror()])
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    _remove_package_lists(root)
    timings["debootstrap"] = round(time.monotonic() - start, 1)
    for name in EMPTY_DIRS:
        (root / name).mkdir(exist_ok=True)

    snap1 = snapshot(root)
    layers = [add_tree_layer(layout, root, sorted(snap1), [])]

    for rel in (DELETED_FILE, DELETED_DIR):
        if not (root / rel).exists():
            raise RuntimeError(f"debootstrap made no /{rel}; the whiteout recipe needs a new target")
    (root / DELETED_FILE).unlink()
    shutil.rmtree(root / DELETED_DIR)
    (root / ADDED_FILE).write_text(f"ocibox test image, recipe {RECIPE}\n")
    snap2 = snapshot(root)
    changed, removed = diff(snap1, snap2)
    layers.append(add_tree_layer(layout, root, changed, removed))
    history = [
        "debootstrap --variant=minbase bookworm",
        f"rm /{DELETED_FILE}; rm -r /{DELETED_DIR}; add /{ADDED_FILE}",
    ]
    config = {
        "created": CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["bash"],
        },
    }
    layout.add_image(list(layers), config, "debian", history=history)
    facts = {
        "debian": {
            **_rootfs_facts(snap2, layers),
            "deleted": ["/" + DELETED_FILE, "/" + DELETED_DIR],
            "added": ["/" + ADDED_FILE],
        }
    }

    start = time.monotonic()
    before = snap2
    for packages in (["python3"], PYTHON_EXTRAS):
        _chroot_apt(root, packages)
        after = snapshot(root)
        changed, removed = diff(before, after)
        layers.append(add_tree_layer(layout, root, changed, removed))
        history.append("apt-get install --no-install-recommends " + " ".join(packages))
        before = after
    timings["python"] = round(time.monotonic() - start, 1)
    python_config = json.loads(json.dumps(config))
    python_config["config"]["Cmd"] = ["python3"]
    layout.add_image(layers, python_config, "python", history=history)
    facts["python"] = {
        **_rootfs_facts(before, layers),
        "deleted": ["/" + DELETED_FILE, "/" + DELETED_DIR],
        "added": ["/" + ADDED_FILE, "/usr/bin/python3"],
    }
    facts["timings"] = timings
    return facts


def cached_layout(cache_root: Path = CACHE_ROOT) -> BuiltLayout:
    """The cached layout with tags "debian" and "python", built first if missing (needs root)."""
    cache_root.mkdir(parents=True, exist_ok=True)
    final = cache_root / RECIPE
    with open(cache_root / f"{RECIPE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "facts.json").exists():
            if os.geteuid() != 0:
                raise RuntimeError(
                    f"the debian/python test images are not in {final} and building them needs root"
                )
            work = cache_root / f"{RECIPE}.build-{os.getpid()}"
            if work.exists():
                _remove_tree(work)
            work.mkdir()
            try:
                start = time.monotonic()
                facts = build(work / "layout", work)
                facts["timings"]["total"] = round(time.monotonic() - start, 1)
                (work / "layout" / "facts.json").write_text(json.dumps(facts, indent=2))
                if final.exists():
                    _remove_tree(final)
                os.rename(work / "layout", final)
            finally:
                _remove_tree(work)
            _drop_old_recipes(cache_root)
    facts = json.loads((final / "facts.json").read_text())
    return BuiltLayout(path=final, facts=facts)


def _drop_old_recipes(cache_root: Path) -> None:
    """Remove the images of earlier versions of this recipe (unless a session is building them)."""
    for old in cache_root.glob("bookworm-minbase-python-*"):
        if old.name.startswith(RECIPE) or old.suffix == ".lock" or ".build-" in old.name:
            continue
        lock_path = cache_root / f"{old.name}.lock"
        with open(lock_path, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            _remove_tree(old)
        lock_path.unlink(missing_ok=True)


def _remove_tree(path: Path) -> None:
    """rm -r, first making sure nothing is still mounted inside (a build killed mid-apt)."""
    proc = path / "rootfs" / "proc"
    if proc.is_dir() and os.path.ismount(proc):
        subprocess.run(["umount", "-l", str(proc)], check=False)
    shutil.rmtree(path, ignore_errors=True)
