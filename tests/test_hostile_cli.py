"""A user meets a damaged store, a hostile archive or a bad argument, and sees one clear line.

The rule: bad input gets one line on stderr and exit 125, never a traceback (nor the CLI's
"internal error" line, which means a bug), never a half-written store, never a file written
outside where it belongs. Registry-side faults are in test_pull.py and test_push.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

NAME = "localhost/busybox:latest"


def _one_line(done, *words: str) -> str:
    """The error of a finished command: exit 125, one line, every word in it, no bug."""
    assert done.returncode == 125, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1, done.stderr
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr
    return done.stderr


def _ends_with_one_line(done, *words: str) -> str:
    """The same for a command that reports progress on stderr first (pull): its last line."""
    assert done.returncode == 125, (done.returncode, done.stdout, done.stderr)
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("ocibox: ") and all(word in last for word in words), done.stderr
    return last


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _layout_files(layout: Path) -> dict[str, bytes]:
    return {str(p.relative_to(layout)): p.read_bytes() for p in layout.rglob("*") if p.is_file()}


def _write_archive(path: Path, files: dict[str, bytes], extra=None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            _add(tar, name, data)
        if extra:
            extra(tar)
    path.chmod(0o644)
    return path


def _digests(files: dict[str, bytes]) -> tuple[str, str, list[str]]:
    """(manifest, config, layers) hex digests of a one-image layout."""
    manifest_hex = json.loads(files["index.json"])["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(files[f"blobs/sha256/{manifest_hex}"])
    return (
        manifest_hex,
        manifest["config"]["digest"].split(":")[1],
        [layer["digest"].split(":")[1] for layer in manifest["layers"]],
    )


def _with_config(files: dict[str, bytes], change: dict) -> dict[str, bytes]:
    """The layout with its image config changed and every digest up to index.json redone."""
    files = dict(files)
    manifest_hex, config_hex, _ = _digests(files)
    config = {**json.loads(files[f"blobs/sha256/{config_hex}"]), **change}
    config_raw = json.dumps(config).encode()
    config_digest = hashlib.sha256(config_raw).hexdigest()
    manifest = json.loads(files[f"blobs/sha256/{manifest_hex}"])
    manifest["config"].update(digest=f"sha256:{config_digest}", size=len(config_raw))
    manifest_raw = json.dumps(manifest).encode()
    manifest_digest = hashlib.sha256(manifest_raw).hexdigest()
    files[f"blobs/sha256/{config_digest}"] = config_raw
    files[f"blobs/sha256/{manifest_digest}"] = manifest_raw
    index = json.loads(files["index.json"])
    index["manifests"][0].update(digest=f"sha256:{manifest_digest}", size=len(manifest_raw))
    files["index.json"] = json.dumps(index).encode()
    return files


def _tagged(ocibox) -> list[str]:
    index = ocibox.root / "index.json"
    if not index.exists():
        return []
    return [
        m["annotations"]["org.opencontainers.image.ref.name"]
        for m in json.loads(index.read_text())["manifests"]
    ]


@pytest.fixture
def layout_files(busybox_layouts):
    return _layout_files(busybox_layouts["busybox"])


@pytest.fixture
def archive_dir(test_workdir):
    """A folder of this test's files that the test user can read too."""
    folder = Path(tempfile.mkdtemp(prefix="hostile-", dir=test_workdir))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def stored(ocibox, layout_files, archive_dir):
    """A store holding localhost/busybox:latest; returns the blob paths by role."""
    ocibox("load", "-i", str(_write_archive(archive_dir / "busybox.tar", layout_files)))
    manifest_hex, config_hex, layer_hexes = _digests(layout_files)
    blobs = ocibox.root / "blobs" / "sha256"
    return {"manifest": blobs / manifest_hex, "config": blobs / config_hex, "layer": blobs / layer_hexes[0]}


def _replace(path: Path, data: bytes | None = None, symlink_to: str | None = None) -> None:
    path.unlink()
    if symlink_to:
        path.symlink_to(symlink_to)
    else:
        path.write_bytes(data or b"")


# --- a damaged store -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"[1, 2]",
        b'{"manifests": "all of them"}',
        b'{"manifests": [{"mediaType": "x", "digest": "sha256:'
        + b"0" * 64
        + b'", "size": 1, "annotations": [1]}]}',
        b'{"manifests": [{"mediaType": "x", "digest": "sha256:' + b"0" * 64 + b'", "size": 1, '
        b'"annotations": {"org.opencontainers.image.ref.name": "../NOT A NAME"}}]}',
    ],
)
def test_a_damaged_index_json_is_named_and_left_as_it_is(ocibox, stored, content):
    index = ocibox.root / "index.json"
    index.write_bytes(content)
    for args in (["images"], ["inspect", NAME], ["rmi", NAME], ["tag", NAME, "other:1"], ["prune"]):
        _one_line(ocibox(*args, check=False), str(index), "damaged")
    assert index.read_bytes() == content  # nothing rewrote it


def test_a_config_blob_edited_on_disk_is_refused_not_believed(ocibox, stored, archive_dir):
    ocibox("run", "--rm", NAME, "true")  # unpacked: run's quick path is the one to catch it
    config = json.loads(stored["config"].read_bytes())
    config["config"]["Env"] = ["INJECTED=1"]
    _replace(stored["config"], json.dumps(config).encode())
    for args in (["inspect", NAME], ["run", "--rm", NAME, "env"], ["images"]):
        _one_line(ocibox(*args, check=False), "damaged", NAME)
    out = archive_dir / "out.tar"
    _one_line(ocibox("save", "-o", str(out), NAME, check=False), "damaged")
    assert not out.exists()


def test_pulling_again_repairs_a_damaged_manifest_and_config(ocibox, images):
    image = images["busybox"]
    ocibox("pull", "-q", image.ref)
    blobs = ocibox.root / "blobs" / "sha256"
    for digest in (image.digest, image.config_digest):
        (blobs / digest.split(":")[1]).unlink()
        (blobs / digest.split(":")[1]).write_text("{}")
    _one_line(
        ocibox("run", "--rm", image.ref, "true", check=False), "damaged", "pull or load the image again"
    )
    ocibox("pull", "-q", image.ref)
    assert ocibox("run", "--rm", image.ref, "true").returncode == 0


def test_loading_again_repairs_a_damaged_config(ocibox, stored, layout_files, archive_dir):
    stored["config"].unlink()
    stored["config"].write_text("{}")
    ocibox("load", "-i", str(_write_archive(archive_dir / "again.tar", layout_files)))
    assert json.loads(ocibox("inspect", NAME).stdout)[0]["Os"] == "linux"


def test_a_layer_blob_symlinked_to_a_secret_is_never_saved(ocibox, stored, archive_dir):
    secret = archive_dir / "secret"
    secret.write_text("root:hunter2\n")
    _replace(stored["layer"], symlink_to=str(secret))
    for fmt in ("oci-archive", "docker-archive"):
        out = archive_dir / f"out-{fmt}.tar"
        _one_line(ocibox("save", "--format", fmt, "-o", str(out), NAME, check=False), stored["layer"].name)
        assert not out.exists()
    assert [p for p in archive_dir.iterdir() if p.name.startswith(".out")] == []


def test_a_blob_that_became_a_folder_is_one_line(ocibox, stored):
    stored["manifest"].unlink()
    stored["manifest"].mkdir()
    _one_line(ocibox("inspect", NAME, check=False), stored["manifest"].name)


def test_a_missing_config_is_reported_not_pulled_again(ocibox, stored):
    stored["config"].unlink()
    for args in (["run", "--rm", NAME, "true"], ["inspect", NAME]):
        err = _one_line(ocibox(*args, check=False), "missing", stored["config"].name)
        assert "Pulling" not in err and "Unable to find" not in err


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"config": [1]}, "config must be an object"),
        ({"config": {"Env": [1, 2]}}, "config.Env"),
        ({"rootfs": {"type": "layers", "diff_ids": 5}}, "rootfs.diff_ids"),
        ({"architecture": 5}, "architecture"),
    ],
)
def test_an_image_config_of_the_wrong_shape_is_one_line_everywhere(
    ocibox, layout_files, archive_dir, change, field
):
    # In an archive: refused by load, nothing tagged.
    bad = _write_archive(archive_dir / "odd.tar", _with_config(layout_files, change))
    _one_line(ocibox("load", "-i", str(bad), check=False), str(bad), field)
    assert _tagged(ocibox) == []
    # Already in a store (written by something else), unpacked before it changed: every command,
    # `run`'s quick path for unpacked images too, says so in one line.
    ocibox("load", "-i", str(_write_archive(archive_dir / "busybox.tar", layout_files)))
    ocibox("run", "--rm", NAME, "true")
    odd = _with_config(layout_files, change)
    index_entry = json.loads(odd["index.json"])["manifests"][0]
    for name, data in odd.items():
        if name.startswith("blobs/") and not (ocibox.root / name).exists():
            (ocibox.root / name).write_bytes(data)
    index = json.loads((ocibox.root / "index.json").read_text())
    index["manifests"][0].update(digest=index_entry["digest"], size=index_entry["size"])
    (ocibox.root / "index.json").write_text(json.dumps(index))
    commands = [["inspect", NAME], ["unpack", NAME, str(archive_dir / "b")]]
    if field != "architecture":  # run itself has no use for the architecture of a stored image
        commands.append(["run", "--rm", NAME, "true"])
    for args in commands:
        _one_line(ocibox(*args, check=False), field)
    assert ocibox("prune").returncode == 0


def test_a_lone_string_entrypoint_means_one_argument_as_in_docker(ocibox, layout_files, archive_dir):
    files = _with_config(layout_files, {"config": {"Entrypoint": "/bin/echo", "Cmd": "hello world"}})
    ocibox("load", "-i", str(_write_archive(archive_dir / "strings.tar", files)))
    assert ocibox("run", "--rm", "localhost/strings").stdout == "hello world\n"  # unpacks it
    assert ocibox("run", "--rm", "localhost/strings").stdout == "hello world\n"  # already unpacked


def test_a_full_disk_is_one_line_and_leaves_the_store_as_it_was(ocibox, archive_dir, layout_files):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    small = archive_dir / "small-store"
    small.mkdir()
    env = {"OCIBOX_ROOT": str(small)}
    archive = _write_archive(archive_dir / "busybox.tar", layout_files)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(small)], check=True)
    try:
        _one_line(ocibox("load", "-i", str(archive), env=env, check=False), "no space left on device")
        assert json.loads((small / "index.json").read_text())["manifests"] == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        ocibox("load", "-i", str(archive), env=env)
        index = (small / "index.json").read_bytes()
        with open(small / "filler", "wb") as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 65536)
        _one_line(ocibox("tag", NAME, "other:1", env=env, check=False), "index.json", "no space left")
        assert (small / "index.json").read_bytes() == index
        _one_line(ocibox("run", "--rm", NAME, "true", env=env, check=False), "No space left")
        assert [p.name for p in (small / "tmp").iterdir() if not p.name.endswith(".lock")] == []
        assert [p.name for p in (small / "rootfs").iterdir() if not p.name.endswith(".lock")] == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


# --- hostile archives ----------------------------------------------------------------------------


def test_member_names_that_climb_out_write_nothing_outside(ocibox, layout_files, archive_dir):
    outside = archive_dir / "escaped"

    def evil(tar):
        _add(tar, f"../../../../../..{outside}-dotdot", b"x")
        _add(tar, f"{outside}-absolute", b"x")
        link = tarfile.TarInfo("blobs/sha256/" + "f" * 64)
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)

    archive = _write_archive(archive_dir / "evil.tar", layout_files, evil)
    assert "Loaded image: localhost/evil:latest" in ocibox("load", "-i", str(archive), cwd=archive_dir).stdout
    assert [p.name for p in archive_dir.iterdir() if p.name.startswith("escaped")] == []
    assert not (ocibox.root / "blobs" / "sha256" / ("f" * 64)).exists()


def test_a_blob_given_as_a_link_to_a_host_file_is_not_read(ocibox, layout_files, archive_dir):
    _, config_hex, _ = _digests(layout_files)
    files = {k: v for k, v in layout_files.items() if config_hex not in k}

    def links(tar):
        link = tarfile.TarInfo(f"blobs/sha256/{config_hex}")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)

    archive = _write_archive(archive_dir / "linked.tar", files, links)
    _one_line(ocibox("load", "-i", str(archive), check=False), "has no", config_hex)
    assert _tagged(ocibox) == []


@pytest.mark.parametrize(
    ("digest", "message"),
    [
        ("sha256:../../../etc/passwd", "malformed digest"),
        ("sha512:" + "0" * 128, "malformed digest"),
        ("sha256:" + "0" * 64, "has no"),
        (5, "malformed digest"),
    ],
)
def test_an_index_with_bogus_digests_is_refused(ocibox, layout_files, archive_dir, digest, message):
    files = dict(layout_files)
    index = json.loads(files["index.json"])
    index["manifests"][0]["digest"] = digest
    files["index.json"] = json.dumps(index).encode()
    archive = _write_archive(archive_dir / "bogus.tar", files)
    _one_line(ocibox("load", "-i", str(archive), check=False), str(archive), message)
    assert _tagged(ocibox) == []


def test_an_archive_whose_second_image_is_broken_tags_nothing(ocibox, layout_files, archive_dir):
    files = dict(layout_files)
    index = json.loads(files["index.json"])
    first = index["manifests"][0]
    first["annotations"] = {"io.containerd.image.name": "localhost/first:1"}
    index["manifests"].append(
        {
            **first,
            "digest": "sha256:" + "1" * 64,
            "annotations": {"io.containerd.image.name": "localhost/second:1"},
        }
    )
    files["index.json"] = json.dumps(index).encode()
    archive = _write_archive(archive_dir / "two.tar", files)
    _one_line(ocibox("load", "-i", str(archive), check=False), "1" * 64)
    assert _tagged(ocibox) == []


def _index_over(files: dict[str, bytes], target: dict, platform: str) -> dict:
    """An image index blob added to `files` whose one entry is `target` for `platform`."""
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{**target, "platform": {"os": "linux", "architecture": platform}}],
        }
    ).encode()
    digest = hashlib.sha256(raw).hexdigest()
    files[f"blobs/sha256/{digest}"] = raw
    return {
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": f"sha256:{digest}",
        "size": len(raw),
    }


def test_an_index_of_indexes_loads_and_runs(ocibox, layout_files, archive_dir):
    files = dict(layout_files)
    manifest = json.loads(files["index.json"])["manifests"][0]
    inner = _index_over(files, {k: manifest[k] for k in ("mediaType", "digest", "size")}, "amd64")
    outer = _index_over(files, inner, "amd64")
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [outer]}).encode()
    ocibox("load", "-i", str(_write_archive(archive_dir / "nested.tar", files)))
    assert ocibox("run", "--rm", "localhost/nested", "true").returncode == 0


def test_an_index_for_another_platform_is_one_line(ocibox, layout_files, archive_dir):
    files = dict(layout_files)
    manifest = json.loads(files["index.json"])["manifests"][0]
    files["index.json"] = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                _index_over(files, {k: manifest[k] for k in ("mediaType", "digest", "size")}, "s390x")
            ],
        }
    ).encode()
    archive = _write_archive(archive_dir / "s390x.tar", files)
    _one_line(ocibox("load", "-i", str(archive), check=False), "no image for platform", "linux/s390x")
    assert _tagged(ocibox) == []


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ([{"Config": "../../etc/passwd", "RepoTags": ["x:1"], "Layers": []}], "has no ../../etc/passwd"),
        ([{"Config": "/etc/passwd", "RepoTags": ["x:1"], "Layers": ["/etc/shadow"]}], "has no /etc/passwd"),
        ([{"Config": 5, "RepoTags": "x", "Layers": 3}], "needs a Config"),
        (["abc"], "needs a Config"),
        ([{"Config": "c.json", "RepoTags": ["x:1"], "Layers": []}], "not a JSON object"),
        ([{"Config": "ok.json", "RepoTags": ["good:1", "BAD TAG"], "Layers": []}], "BAD TAG"),
    ],
)
def test_a_hostile_docker_archive_manifest_is_one_line(ocibox, archive_dir, manifest, message):
    files = {
        "manifest.json": json.dumps(manifest).encode(),
        "c.json": b"[1]",
        "ok.json": b'{"rootfs": {"type": "layers", "diff_ids": []}}',
    }
    archive = _write_archive(archive_dir / "docker.tar", files)
    _one_line(ocibox("load", "-i", str(archive), check=False), message)
    assert _tagged(ocibox) == []


@pytest.mark.parametrize("content", [b"", b"root:x:0:0::/root:/bin/sh\n", b"\x1f\x8b\x08\x00garbage"])
def test_a_file_that_is_no_archive_is_one_line(ocibox, archive_dir, content):
    path = archive_dir / "not-an-archive"
    path.write_bytes(content)
    _one_line(ocibox("load", "-i", str(path), check=False), str(path))


def test_load_without_a_file_name_or_from_a_folder_is_one_line(ocibox, archive_dir):
    _one_line(ocibox("load", "-i", "", check=False), "no archive file given")
    _one_line(ocibox("load", "-i", str(archive_dir), check=False), "Is a directory")


# --- save's output -------------------------------------------------------------------------------


def test_save_to_a_folder_or_nowhere_is_refused(ocibox, stored, archive_dir):
    before = sorted(archive_dir.iterdir())
    _one_line(ocibox("save", "-o", str(archive_dir), NAME, check=False), "not a folder")
    _one_line(ocibox("save", "-o", "", NAME, check=False, cwd=archive_dir), "not a folder")
    _one_line(
        ocibox("save", "-o", str(archive_dir / "no" / "x.tar"), NAME, check=False),
        f"cannot write {archive_dir / 'no' / 'x.tar'}",
    )
    assert sorted(archive_dir.iterdir()) == before


def test_save_to_a_device_writes_into_it_and_never_replaces_it(ocibox, stored):
    _one_line(ocibox("save", "-o", "/dev/full", NAME, check=False), "/dev/full", "No space left")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert ocibox("save", "-o", "/dev/null", NAME).returncode == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_save_into_a_pipe_streams_a_readable_archive(ocibox, stored, archive_dir):
    fifo = archive_dir / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["tar", "-t", "-f", str(fifo)], stdout=subprocess.PIPE, text=True)
    ocibox("save", "-o", str(fifo), NAME)
    names = reader.communicate(timeout=60)[0].split()
    assert "index.json" in names and "oci-layout" in names


# --- format strings ------------------------------------------------------------------------------


def test_inspect_formats_it_knows_print_and_others_are_one_line(ocibox, stored):
    assert ocibox("inspect", "-f", "{{.Os}}/{{.Nope}}", NAME).stdout == "linux/<no value>\n"
    for template in ("{{.Id", "{{range .}}{{end}}", "{{index .RepoTags 5}}"):
        _one_line(ocibox("inspect", "-f", template, NAME, check=False), "invalid --format")
    for args in (["images", "--format", "{{.ID}}"], ["save", "--format", "tar", "-o", "x.tar", NAME]):
        done = ocibox(*args, check=False)
        assert done.returncode == 2 and "invalid choice" in done.stderr and "Traceback" not in done.stderr


# --- run's inputs --------------------------------------------------------------------------------


def test_a_binary_env_file_is_one_line(ocibox, stored, archive_dir):
    env_file = archive_dir / "env.bin"
    env_file.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe")
    _one_line(
        ocibox("run", "--rm", "--env-file", str(env_file), NAME, "true", check=False), str(env_file), "UTF-8"
    )


# --- as an unprivileged user ---------------------------------------------------------------------


def test_a_user_with_a_damaged_store_sees_one_line(ocibox_user, layout_files, archive_dir):
    archive = _write_archive(archive_dir / "busybox.tar", layout_files)
    ocibox_user("load", "-i", str(archive))
    _, config_hex, _ = _digests(layout_files)
    blob = ocibox_user.root / "blobs" / "sha256" / config_hex
    blob.write_bytes(b"{}")  # as root: the user's file keeps its owner
    _one_line(ocibox_user("run", "--rm", NAME, "true", check=False), "damaged")
    (ocibox_user.root / "index.json").write_text("[]")
    _one_line(ocibox_user("images", check=False), "index.json", "damaged")


def test_a_user_saving_where_they_may_not_write_is_told_which_file(ocibox_user, layout_files, archive_dir):
    ocibox_user("load", "-i", str(_write_archive(archive_dir / "busybox.tar", layout_files)))
    target = archive_dir / "root-only"
    target.mkdir(mode=0o755)
    _one_line(
        ocibox_user("save", "-o", str(target / "x.tar"), NAME, check=False),
        f"cannot write {target / 'x.tar'}",
        "Permission denied",
    )


def test_a_user_whose_layer_blob_they_cannot_read_is_told_which_file(ocibox_user, layout_files, archive_dir):
    ocibox_user("load", "-i", str(_write_archive(archive_dir / "busybox.tar", layout_files)))
    blob = ocibox_user.root / "blobs" / "sha256" / _digests(layout_files)[2][0]
    os.chown(blob, 0, 0)
    blob.chmod(0o600)
    _one_line(ocibox_user("run", "--rm", NAME, "true", check=False), "Permission denied", str(blob))


# --- credentials files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"auths": [1]}', "'auths' must be an object"),
        ('{"auths": {"HOST": {"auth": 5}}}', "malformed 'auth' entry"),
        ('{"auths": {"HOST": {"auth": "!!not base64"}}}', "malformed 'auth' entry"),
        ('{"credHelpers": {"HOST": "../../bin/sh"}}', "must name helpers"),
        ('{"credsStore": 5}', "must name helpers"),
    ],
)
def test_a_damaged_credentials_file_is_named_in_one_line(
    ocibox, auth_registry, archive_dir, content, message
):
    auth_file = archive_dir / "auth.json"
    auth_file.write_text(content.replace("HOST", auth_registry.host))
    env = {"REGISTRY_AUTH_FILE": str(auth_file)}
    _ends_with_one_line(
        ocibox("pull", auth_registry.seeded["busybox"], env=env, check=False), str(auth_file), message
    )
    if "entry" in message:  # one bad entry: logout is how the user gets rid of it
        assert ocibox("logout", auth_registry.host, env=env).returncode == 0
        assert json.loads(auth_file.read_text())["auths"] == {}
    else:
        _one_line(ocibox("logout", auth_registry.host, env=env, check=False), str(auth_file))
        assert auth_file.read_text() == content.replace("HOST", auth_registry.host)
    assert _tagged(ocibox) == []


@pytest.mark.parametrize("config", ["[1]", '{"process": 5}', '{"root": null}', '{"root": {"path": 5}}'])
def test_a_bundle_whose_config_is_not_a_runtime_config_is_one_line(ocibox, stored, archive_dir, config):
    bundle = archive_dir / "bundle"
    ocibox("unpack", NAME, str(bundle))
    (bundle / "config.json").write_text(config)
    _one_line(ocibox("run", "--rm", str(bundle), "true", check=False), str(bundle / "config.json"))


def test_a_volume_over_the_root_or_dev_is_refused_and_the_host_folder_stays_empty(
    ocibox, stored, archive_dir
):
    host = archive_dir / "vol"
    host.mkdir()
    for dest in ("/", "/dev", "/dev/", "//"):
        _one_line(ocibox("run", "--rm", "-v", f"{host}:{dest}", NAME, "true", check=False), "invalid volume")
    assert list(host.iterdir()) == []
    assert ocibox("run", "--rm", "-v", f"{host}:/dev/shm", NAME, "true").returncode == 0


def test_a_run_refused_before_it_starts_leaves_no_container_behind(ocibox, stored):
    for args in (
        ["-v", "/tmp:/dev"],
        ["-e", "=x"],
        ["-u", "nosuchuser"],
        ["--ulimit", "bogus"],
        ["-m", "lots"],
    ):
        _one_line(ocibox("run", *args, NAME, "true", check=False))
    assert list((ocibox.root / "containers").iterdir()) == []
    ocibox("run", NAME, "true")  # one that ran is kept, as docker keeps it
    assert len(list((ocibox.root / "containers").iterdir())) == 1


@pytest.mark.parametrize("user", ["4294967296", "4294967296:4294967296", "0:2147483648", "99999999999"])
def test_a_user_id_past_the_32_bit_range_is_refused_not_wrapped_to_root(ocibox, stored, user):
    _one_line(ocibox("run", "--rm", "-u", user, NAME, "id", check=False), "range 0-2147483647")


def test_a_tmpfs_over_the_root_is_refused(ocibox, stored):
    _one_line(ocibox("run", "--rm", "--tmpfs", "/", NAME, "true", check=False), "invalid --tmpfs")


def test_a_store_root_that_is_a_file_is_one_line(ocibox, archive_dir):
    not_a_folder = archive_dir / "store-file"
    not_a_folder.write_text("x")
    for args in (["images"], ["inspect", NAME], ["prune"]):
        _one_line(
            ocibox(*args, env={"OCIBOX_ROOT": str(not_a_folder)}, check=False), "cannot create the store"
        )
    assert not_a_folder.read_text() == "x"


def test_a_store_the_user_may_only_read_lists_but_refuses_writes(ocibox, ocibox_user, stored):
    env = {"OCIBOX_ROOT": str(ocibox.root)}  # root's store: readable, not writable, by the user
    index = (ocibox.root / "index.json").read_bytes()
    assert "localhost/busybox" in ocibox_user("images", env=env).stdout
    for args in (["tag", NAME, "other:1"], ["rmi", NAME], ["prune"], ["run", "--rm", NAME, "true"]):
        _one_line(ocibox_user(*args, env=env, check=False), "Permission denied")
    assert (ocibox.root / "index.json").read_bytes() == index
