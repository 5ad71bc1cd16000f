"""A user moves images between ocibox, skopeo, podman and docker as archive files."""

import json
import subprocess
import tarfile

import pytest

PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]


def _oci_archive(layout, tmp_path, name="localhost/busybox:1"):
    """An oci-archive written by skopeo from a test layout."""
    out = tmp_path / "busybox-oci.tar"
    subprocess.run(["skopeo", "copy", "-q", f"oci:{layout}:latest", f"oci-archive:{out}:{name}"], check=True)
    return out


def test_a_user_loads_a_skopeo_oci_archive_and_sees_it_listed(ocibox, busybox_layouts, tmp_path):
    archive = _oci_archive(busybox_layouts["busybox"], tmp_path)
    done = ocibox("load", "-i", str(archive))
    assert done.stdout.strip() == "Loaded image: localhost/busybox:1"
    listed = json.loads(ocibox("images", "--format", "json").stdout)
    assert [(i["Repository"], i["Tag"]) for i in listed] == [("localhost/busybox", "1")]
    table = ocibox("images").stdout.splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert table[1].startswith("localhost/busybox")
    inspected = json.loads(ocibox("inspect", "localhost/busybox:1").stdout)[0]
    assert inspected["Config"]["config"]["Cmd"] == ["sh"]
    assert inspected["Os"] == "linux" and inspected["Architecture"] == "amd64"
    assert (
        ocibox("inspect", "-f", "{{json .Config.config.Cmd}}", "localhost/busybox:1").stdout.strip()
        == '["sh"]'
    )
    # By image ID, as docker accepts it.
    assert ocibox("inspect", listed[0]["ID"]).returncode == 0


def test_saved_archives_are_read_by_skopeo_and_podman(ocibox, busybox_layouts, tmp_path, oci_schema):
    ocibox("load", "-i", str(_oci_archive(busybox_layouts["busybox"], tmp_path)))
    oci = tmp_path / "out-oci.tar"
    docker = tmp_path / "out-docker.tar"
    ocibox("save", "localhost/busybox:1", "-o", str(oci))
    ocibox("save", "localhost/busybox:1", "-o", str(docker), "--format", "docker-archive")

    with tarfile.open(oci) as tar:
        index = json.load(tar.extractfile("index.json"))
        oci_schema.validate(index, "index")
        manifest_name = "blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]
        oci_schema.validate(json.load(tar.extractfile(manifest_name)), "manifest")
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == "localhost/busybox:1"

    for spec in (f"oci-archive:{oci}", f"docker-archive:{docker}"):
        out = subprocess.run(["skopeo", "inspect", spec], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["Architecture"] == "amd64"

    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        pytest.skip("podman load as root only")
    for archive in (docker, oci):
        subprocess.run([*PODMAN, "rmi", "-f", "localhost/busybox:1"], capture_output=True)
        loaded = subprocess.run([*PODMAN, "load", "-i", str(archive)], capture_output=True, text=True)
        assert loaded.returncode == 0, loaded.stderr
        ran = subprocess.run(
            [
                *PODMAN,
                "run",
                "--rm",
                "--ulimit",
                "nofile=20000:20000",
                "--ulimit",
                "nproc=4096:4096",
                "--network",
                "none",
                "localhost/busybox:1",
                "echo",
                "hello from podman",
            ],
            capture_output=True,
            text=True,
        )
        assert ran.stdout.strip() == "hello from podman", ran.stderr
    subprocess.run([*PODMAN, "rmi", "-f", "localhost/busybox:1"], capture_output=True)


def test_a_docker_archive_round_trips_with_the_same_image_id(ocibox, busybox_layouts, tmp_path):
    ocibox("load", "-i", str(_oci_archive(busybox_layouts["busybox"], tmp_path)))
    image_id = json.loads(ocibox("images", "--format", "json").stdout)[0]["ID"]
    docker = tmp_path / "d.tar"
    ocibox("save", "localhost/busybox:1", "-o", str(docker), "--format", "docker-archive")
    ocibox("rmi", "localhost/busybox:1")
    assert json.loads(ocibox("images", "--format", "json").stdout) == []
    assert ocibox("load", "-i", str(docker)).stdout.strip() == "Loaded image: localhost/busybox:1"
    assert json.loads(ocibox("images", "--format", "json").stdout)[0]["ID"] == image_id


def test_a_multi_arch_archive_loads_the_host_platform(ocibox, busybox_layouts, tmp_path):
    archive = tmp_path / "multi.tar"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            "--all",
            f"oci:{busybox_layouts['multiarch']}:latest",
            f"oci-archive:{archive}:localhost/multi:1",
        ],
        check=True,
    )
    ocibox("load", "-i", str(archive))
    inspected = json.loads(ocibox("inspect", "localhost/multi:1").stdout)[0]
    assert inspected["Architecture"] == "amd64"


def test_removing_and_pruning_frees_the_blobs(ocibox, busybox_layouts, tmp_path):
    ocibox("load", "-i", str(_oci_archive(busybox_layouts["busybox"], tmp_path)))
    blobs = ocibox.root / "blobs" / "sha256"
    assert len(list(blobs.iterdir())) == 4
    assert ocibox("prune").returncode == 0
    assert len(list(blobs.iterdir())) == 4, "prune keeps what a tag needs"
    assert "Untagged: localhost/busybox:1" in ocibox("prune", "--older-than", "0s").stdout
    assert list(blobs.iterdir()) == []


def test_prune_older_than_keeps_recently_used_images(ocibox, busybox_layouts, tmp_path):
    ocibox("load", "-i", str(_oci_archive(busybox_layouts["busybox"], tmp_path)))
    ocibox("prune", "--older-than", "30d")
    assert len(json.loads(ocibox("images", "--format", "json").stdout)) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["load", "-i", "/nonexistent.tar"], "no such file"),
        (["inspect", "localhost/nothing:1"], "not in the store"),
        (["rmi", "localhost/nothing:1"], "not in the store"),
        (["inspect", "Bad/Name"], "lowercase"),
        (["prune", "--older-than", "soon"], "invalid duration"),
        (["save", "localhost/nothing:1", "-o", "x.tar"], "not in the store"),
    ],
)
def test_bad_input_is_one_clear_line(ocibox, args, message, tmp_path):
    done = ocibox(*args, check=False, cwd=tmp_path)
    assert done.returncode == 125
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.tar").exists()


def test_a_damaged_archive_is_refused_and_the_store_stays_clean(ocibox, busybox_layouts, tmp_path):
    good = _oci_archive(busybox_layouts["busybox"], tmp_path)
    bad = tmp_path / "bad.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.isfile() and member.size > 100000:
                data = data[:-10] + b"0123456789"  # a layer whose bytes no longer match its digest
            dst.addfile(member, __import__("io").BytesIO(data) if data is not None else None)
    done = ocibox("load", "-i", str(bad), check=False)
    assert done.returncode == 125 and "does not match its digest" in done.stderr
    assert json.loads(ocibox("images", "--format", "json").stdout) == []
    leftovers = [p for p in (ocibox.root / "tmp").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_an_unprivileged_user_has_a_store_of_their_own(ocibox_user, busybox_layouts, test_workdir):
    folder = test_workdir / "archive-for-user"
    folder.mkdir()
    archive = _oci_archive(busybox_layouts["busybox"], folder)
    archive.chmod(0o644)
    done = ocibox_user("load", "-i", str(archive))
    assert "Loaded image" in done.stdout
    assert ocibox_user.root.stat().st_uid != 0
    denied = ocibox_user("images", env={"OCIBOX_ROOT": "/root/ocibox-store"}, check=False)
    assert denied.returncode == 125 and "cannot create the store" in denied.stderr
