"""A user unpacks a pulled image: `ocibox unpack REF DIR` writes a bundle runc starts as it is, the
shared rootfs cache is built once and never looks complete when it is not, and the tree matches
umoci's for real Debian images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from layer_builder import tree
from ocibox.errors import IntegrityError
from ocibox.store import Store
from ocibox.unpack import ensure_rootfs, rootfs_path
from support.schemas import validate


def test_unpack_writes_a_bundle_that_runc_runs(ocibox, images, tmp_path: Path) -> None:
    ref = images["busybox"].ref
    bundle = tmp_path / "bundle"
    result = ocibox("unpack", ref, str(bundle))  # pulled first: not in the store yet
    assert result.stdout.strip() == str(bundle)
    assert (bundle / "rootfs" / "bin" / "busybox").is_file()
    assert oct(bundle.stat().st_mode & 0o777) == "0o700"
    config = json.loads((bundle / "config.json").read_text())
    validate(config, "runtime-config")
    assert config["root"]["path"] == "rootfs"
    if os.geteuid() != 0 or not shutil.which("runc"):
        return
    state = tmp_path / "runc-state"

    def runc_run() -> subprocess.CompletedProcess:
        cid = "ocibox-test-" + uuid.uuid4().hex[:8]
        try:
            return subprocess.run(
                ["runc", "--root", str(state), "run", "--bundle", str(bundle), cid],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
            )
        finally:
            subprocess.run(["runc", "--root", str(state), "delete", "-f", cid], capture_output=True)

    proc = runc_run()  # the bundle as ocibox wrote it: busybox's `sh` reads an empty stdin and exits
    assert proc.returncode == 0, proc.stderr
    config["process"]["args"] = ["/bin/sh", "-c", "echo hello from $(id -u) in $(pwd)"]
    (bundle / "config.json").write_text(json.dumps(config))  # a folder the user may edit
    proc = runc_run()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hello from 0 in /"


def test_unpack_as_a_user_is_rootless(ocibox_user, images, tmp_path: Path) -> None:
    ref = images["busybox"].ref
    work = ocibox_user.home / "bundles"
    ocibox_user("pull", "-q", ref)
    ocibox_user("unpack", ref, str(work / "b"))
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=ocibox-test",
            "--regid=ocibox-test",
            "--clear-groups",
            "cat",
            str(work / "b" / "config.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)
    validate(config, "runtime-config")
    uid = int(subprocess.run(["id", "-u", "ocibox-test"], capture_output=True, text=True).stdout)
    assert {"type": "user"} in config["linux"]["namespaces"]
    assert config["linux"]["uidMappings"] == [{"containerID": 0, "hostID": uid, "size": 1}]
    assert "resources" not in config["linux"]
    assert (work / "b" / "rootfs" / "bin" / "busybox").stat().st_uid == uid
    assert (work / "b" / "rootfs.meta").exists()


def test_unpack_of_a_missing_image_is_one_line(ocibox, tmp_path: Path) -> None:
    from support.registry import free_port

    result = ocibox("unpack", f"127.0.0.1:{free_port()}/nothing:here", str(tmp_path / "b"), check=False)
    assert result.returncode == 125
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ocibox: ")


def test_unpack_into_a_folder_that_is_not_empty_is_refused(ocibox, images, tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine").write_text("keep me")
    result = ocibox("unpack", images["busybox"].ref, str(tmp_path / "b"), check=False)
    assert result.returncode == 125 and "not an empty folder" in result.stderr
    assert (tmp_path / "b" / "mine").read_text() == "keep me"


def test_the_rootfs_cache_is_built_once(ocibox, images) -> None:
    ref = images["busybox"].ref
    ocibox("pull", "-q", ref)
    store = Store(ocibox.root)
    image = store.load_image(ref)
    code = (
        "import sys; from ocibox.store import Store; from ocibox.unpack import ensure_rootfs;"
        "s = Store(sys.argv[1]); print(ensure_rootfs(s, s.load_image(sys.argv[2])))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(ocibox.root), ref], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert outs == {str(rootfs_path(store, image))}
    assert all(p.returncode == 0 for p in procs)
    target = ensure_rootfs(store, image)
    marker = os.stat(target).st_ino
    assert ensure_rootfs(store, image) == target and os.stat(target).st_ino == marker
    assert [p.name for p in store.rootfs_dir.iterdir() if p.is_dir()] == [target.name]
    assert [p for p in store.tmp_dir.iterdir() if p.name.startswith("rootfs-")] == []


def test_a_failed_unpack_never_looks_complete(ocibox, images) -> None:
    ref = images["busybox"].ref
    ocibox("pull", "-q", ref)
    store = Store(ocibox.root)
    image = store.load_image(ref)
    blob = store.blob_path(image.manifest.layers[-1].digest)
    good = blob.read_bytes()
    blob.chmod(0o644)
    blob.write_bytes(good[: len(good) // 2])  # cut like an interrupted download
    try:
        with pytest.raises((IntegrityError, Exception)):
            ensure_rootfs(store, image)
        assert not rootfs_path(store, image).exists()
        assert [p for p in store.tmp_dir.iterdir() if p.name.startswith("rootfs-")] == []
        bundle = ocibox.root.parent / "bundle-of-a-damaged-image"
        failed = ocibox("unpack", ref, str(bundle), check=False)
        assert failed.returncode == 125 and not bundle.exists(), "a failed unpack leaves no folder it made"
    finally:
        blob.write_bytes(good)
    assert (ensure_rootfs(store, image) / "bin" / "busybox").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["debian", "python"])
def test_debian_images_unpack_like_umoci(ocibox, images, tmp_path: Path, name: str) -> None:
    if not shutil.which("umoci") or not shutil.which("skopeo"):
        pytest.skip("umoci and skopeo are needed")
    image = images[name]
    layout = tmp_path / "layout"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--insecure-policy",
            "--src-tls-verify=false",
            f"docker://{image.ref}",
            f"oci:{layout}:test",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:test", str(tmp_path / "umoci")],
        check=True,
        capture_output=True,
    )
    ocibox("unpack", image.ref, str(tmp_path / "ours"))
    theirs, ours = tree(tmp_path / "umoci" / "rootfs"), tree(tmp_path / "ours" / "rootfs")
    # umoci --rootless turns device nodes into empty mode-0 files; ocibox as root makes them
    devices = {p for p, t in ours.items() if t[0] == "dev"}
    assert sorted(set(theirs) - devices) == sorted(set(ours) - devices)
    different = [p for p in theirs if p not in devices and theirs[p] != ours[p]]
    assert different == []


@pytest.mark.parametrize("name", ["busybox-zstd", "busybox-uncompressed", "busybox-v2s2"])
def test_zstd_plain_and_docker_v2s2_layers_unpack(ocibox, images, tmp_path: Path, name: str) -> None:
    ocibox("unpack", images[name].ref, str(tmp_path / "b"))
    assert (tmp_path / "b" / "rootfs" / "bin" / "busybox").is_file()


@pytest.mark.slow
@pytest.mark.rootless
def test_debian_as_a_user_unpacks_like_umoci(ocibox_user, images, tmp_path: Path) -> None:
    """As a user: the same tree as umoci --rootless, mode-000 files included (umoci#222), and the
    image's owners in the .meta file and the user.rootlesscontainers xattr."""
    if not shutil.which("umoci") or not shutil.which("skopeo"):
        pytest.skip("umoci and skopeo are needed")
    image = images["debian"]
    layout = tmp_path / "layout"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--insecure-policy",
            "--src-tls-verify=false",
            f"docker://{image.ref}",
            f"oci:{layout}:test",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:test", str(tmp_path / "umoci")],
        check=True,
        capture_output=True,
    )
    bundle = ocibox_user.home / "debian"
    result = ocibox_user("unpack", image.ref, str(bundle))
    assert "device nodes can't be made as a user" in result.stderr or "warning" not in result.stderr
    theirs, ours = tree(tmp_path / "umoci" / "rootfs"), tree(bundle / "rootfs")
    # umoci makes device nodes empty mode-0 files; ocibox skips them and records them in rootfs.meta
    meta = [json.loads(line) for line in (bundle / "rootfs.meta").read_text().splitlines()]
    devices = {r["path"].lstrip("/") for r in meta if r["type"] in ("char", "block")}
    assert sorted(set(theirs) - devices) == sorted(ours)
    assert [p for p in ours if theirs[p] != ours[p]] == []
    uid = int(subprocess.run(["id", "-u", "ocibox-test"], capture_output=True, text=True).stdout)
    assert {(bundle / "rootfs" / p).lstat().st_uid for p in list(ours)[:200]} == {uid}
    for rec in meta:
        p = bundle / "rootfs" / rec["path"].lstrip("/")
        if rec["type"] in ("file", "dir"):
            got = os.getxattr(p, "user.rootlesscontainers")
            assert got == os.getxattr(
                tmp_path / "umoci" / "rootfs" / rec["path"].lstrip("/"), "user.rootlesscontainers"
            ), rec


@pytest.mark.slow
def test_an_image_pushed_by_podman_unpacks_like_umoci(ocibox, images, registry, tmp_path: Path) -> None:
    """podman (vfs storage) re-tars each layer from its own storage, with its own whiteouts and
    gzip, and pushes it; ocibox unpacks what it pushed to the tree umoci makes of the original."""
    if not shutil.which("podman") or not shutil.which("umoci"):
        pytest.skip("podman and umoci are needed")
    image = images["debian"]
    layout = tmp_path / "layout"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--insecure-policy",
            "--src-tls-verify=false",
            f"docker://{image.ref}",
            f"oci:{layout}:test",
        ],
        check=True,
        capture_output=True,
    )
    runroot = Path(tempfile.mkdtemp(prefix="ocibox-podman-"))  # podman wants it under 50 characters
    podman = [
        "podman",
        "--root",
        str(tmp_path / "podman"),
        "--runroot",
        str(runroot),
        "--storage-driver",
        "vfs",
    ]
    try:
        pulled = subprocess.run(podman + ["pull", "-q", f"oci:{layout}:test"], capture_output=True, text=True)
        assert pulled.returncode == 0, pulled.stderr
        pushed = registry.ref("podman/debian")
        push = subprocess.run(
            podman
            + [
                "push",
                "-q",
                "--tls-verify=false",
                "--remove-signatures",
                pulled.stdout.strip(),
                f"docker://{pushed}",
            ],
            capture_output=True,
            text=True,
        )
        assert push.returncode == 0, push.stderr
    finally:
        subprocess.run(podman + ["rmi", "-a", "-f"], capture_output=True)
        shutil.rmtree(runroot, ignore_errors=True)
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:test", str(tmp_path / "umoci")],
        check=True,
        capture_output=True,
    )
    ocibox("unpack", pushed, str(tmp_path / "ours"))
    theirs, ours = tree(tmp_path / "umoci" / "rootfs"), tree(tmp_path / "ours" / "rootfs")
    devices = {p for p, t in ours.items() if t[0] == "dev"}
    assert sorted(set(theirs) - devices) == sorted(set(ours) - devices)
    assert [p for p in theirs if p not in devices and theirs[p] != ours[p]] == []


SUBUID_SCRIPT = """
import os, sys
from ocibox.store import Store
from ocibox.unpack import ensure_rootfs
store = Store(os.environ["OCIBOX_ROOT"])
root = ensure_rootfs(store, store.load_image(sys.argv[1]))
st = os.lstat(root / "etc" / "shadow")
print(st.st_uid, st.st_gid, os.lstat(root / "bin" / "sh").st_uid)
"""


@pytest.mark.slow
@pytest.mark.rootless
def test_a_users_cached_rootfs_belongs_to_their_subordinate_ids(ocibox_user, as_user, images) -> None:
    """With /etc/subuid ranges the shared rootfs is unpacked as root of a user namespace: an image
    file of gid 42 belongs to the user's subordinate gid 42 on disk, root's files to the user."""
    from ocibox.userns import _ranges

    starts = _ranges("/etc/subgid", "ocibox-test", -1)
    if not starts or not shutil.which("newgidmap"):
        pytest.skip("ocibox-test has no subordinate ids")
    ref = images["debian"].ref
    ocibox_user("pull", "-q", ref)
    out = as_user(["/usr/bin/python3", "-c", SUBUID_SCRIPT, ref], env=ocibox_user.env).stdout.split()
    uid = int(subprocess.run(["id", "-u", "ocibox-test"], capture_output=True, text=True).stdout)
    assert [int(x) for x in out] == [uid, starts[0][0] + 42 - 1, uid]


OUT_OF_RANGE_SCRIPT = """
import io, json, os, sys
sys.path.insert(0, sys.argv[1])
from layer_builder import D, F, tar_bytes
from ocibox.layers import apply_layer
from ocibox.userns import run_as_root

def unpack():
    layer = [D("./", 0o755), D("data", 0o750, uid=1000, gid=1000), F("data/far", "x", uid=100000, gid=5)]
    apply_layer("rootfs", io.BytesIO(tar_bytes(layer)))
    st = os.lstat("rootfs/data/far")
    return [os.lstat("rootfs/data").st_uid, st.st_uid, st.st_gid]

print(json.dumps(run_as_root(unpack)))
print(open("rootfs.meta").read())
"""


@pytest.mark.rootless
def test_owners_beyond_the_users_ranges_go_to_the_meta_file(as_user, ocibox_user, tmp_path: Path) -> None:
    from ocibox.userns import _ranges

    if not _ranges("/etc/subuid", "ocibox-test", -1) or not shutil.which("newuidmap"):
        pytest.skip("ocibox-test has no subordinate ids")
    tests = ocibox_user.home / "tests"
    tests.mkdir()
    shutil.copy(Path(__file__).parent / "layer_builder.py", tests / "layer_builder.py")
    os.chmod(tests, 0o755)
    work = ocibox_user.home / "unpack"
    work.mkdir()
    shutil.chown(work, "ocibox-test", "ocibox-test")
    result = as_user(
        ["/usr/bin/python3", "-c", OUT_OF_RANGE_SCRIPT, str(tests)], env=ocibox_user.env, cwd=work
    )
    first, *meta = result.stdout.splitlines()
    assert json.loads(first) == [1000, 0, 0]  # 100000 is not mapped in the namespace: left root:root
    assert json.loads(meta[0]) == {
        "path": "/data/far",
        "type": "file",
        "uid": 100000,
        "gid": 5,
        "mode": 0o644,
    }
    assert "outside this user's id ranges" in result.stderr
