"""`ocibox build --from-binary PROG`: images from a binary with no Docker, FROM scratch or onto a base.

A user builds an image from Debian's busybox-static, gets an OCI archive that skopeo, podman and
the OCI schemas accept, builds it again and gets the same bytes, puts it in the store with
--tag, names it again with `ocibox tag`, and builds onto it with --base.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from ocibox.elf import read_elf

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: statically linked
DYNAMIC = Path("/bin/true")  # dynamically linked, interpreter /lib64/ld-linux-x86-64.so.2
ARM64_DEBS = Path("/var/cache/ocibox-tests/debs")
PODMAN_RUN = [
    "podman",
    "run",
    "--rm",
    "--runtime",
    "runc",
    "--cgroup-manager",
    "cgroupfs",
    "--ulimit",
    "nofile=20000:20000",
    # podman raises RLIMIT_NPROC past this machine's hard limit (no CAP_SYS_RESOURCE): keep it
    "--ulimit",
    "nproc=4096:4096",
]


# --- reading what ocibox wrote -------------------------------------------------------------------


class OciArchive:
    """An oci-archive file read back: index, manifest, config and each layer's entries."""

    def __init__(self, path: Path):
        with tarfile.open(path) as tar:
            self.members = tar.getmembers()
            self.files = {m.name: tar.extractfile(m).read() for m in self.members if m.isfile()}
        self.layout = json.loads(self.files["oci-layout"])
        self.index = json.loads(self.files["index.json"])
        [self.manifest_descriptor] = self.index["manifests"]
        self.manifest_raw = self.blob(self.manifest_descriptor["digest"])
        self.manifest = json.loads(self.manifest_raw)
        self.config = json.loads(self.blob(self.manifest["config"]["digest"]))

    def blob(self, digest: str) -> bytes:
        return self.files["blobs/sha256/" + digest.split(":")[1]]

    def layer(self, i: int = -1) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
        data = gzip.decompress(self.blob(self.manifest["layers"][i]["digest"]))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return {
                m.name.rstrip("/"): (m, tar.extractfile(m).read() if m.isfile() else None)
                for m in tar.getmembers()
            }


def skopeo_inspect(transport: str, path: Path, *flags: str) -> dict:
    out = subprocess.run(
        ["skopeo", "inspect", *flags, f"{transport}:{path}"], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def assert_one_clear_line(result, *words: str) -> None:
    assert result.returncode == 125, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocibox: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


@pytest.fixture
def podman_image():
    """A unique podman image name, removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("podman"):
        pytest.skip("podman load/run is checked as root")
    name = f"localhost/ocibox-build-test-{uuid.uuid4().hex[:10]}:1"
    yield name
    subprocess.run(["podman", "rmi", "-f", name], capture_output=True)


def arm64_busybox(workdir: Path) -> Path:
    """/bin/busybox of Debian's busybox-static:arm64 (setup.sh downloads the .deb)."""
    debs = sorted(ARM64_DEBS.glob("busybox-static_*_arm64.deb"))
    if not debs:
        pytest.skip("no busybox-static arm64 .deb in /var/cache/ocibox-tests/debs (run scripts/setup.sh)")
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(workdir / "arm64")], check=True)
    return workdir / "arm64" / "bin" / "busybox"


# --- FROM scratch --------------------------------------------------------------------------------


def test_a_static_binary_becomes_a_from_scratch_oci_archive(ocibox, tmp_path, oci_schema):
    out = tmp_path / "busybox.tar"
    result = ocibox("build", "--from-binary", BUSYBOX, "-o", out)
    assert result.stderr.strip() == f"Wrote {out} (oci-archive)", "a static program gets no warning"
    archive = OciArchive(out)
    assert result.stdout.strip() == archive.manifest_descriptor["digest"]

    inspected = skopeo_inspect("oci-archive", out)
    assert (inspected["Os"], inspected["Architecture"]) == ("linux", "amd64")
    assert inspected["Digest"] == archive.manifest_descriptor["digest"]
    assert archive.config["config"] == {"Entrypoint": ["/busybox"]}
    assert archive.config["created"] == "1970-01-01T00:00:00Z"

    for document, kind in [
        (archive.layout, "layout"),
        (archive.index, "index"),
        (archive.manifest, "manifest"),
        (archive.config, "config"),
    ]:
        oci_schema.validate(document, kind)
    assert archive.manifest["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"

    [(name, (entry, content))] = archive.layer().items()
    assert name == "busybox"
    assert (entry.mode, entry.uid, entry.gid, entry.uname, entry.gname, entry.mtime) == (
        0o755,
        0,
        0,
        "",
        "",
        0,
    )
    assert content == BUSYBOX.read_bytes()
    assert not (ocibox.root / "index.json").exists(), "an archive-only build leaves the store alone"
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask, "an ordinary file, not mkstemp's 0600"


def test_podman_loads_and_runs_the_oci_archive(ocibox, tmp_path, podman_image):
    out = tmp_path / "hello.tar"
    ocibox(
        "build",
        "--from-binary",
        BUSYBOX,
        "-o",
        out,
        "-t",
        podman_image,
        "--entrypoint",
        "/busybox",
        "--cmd",
        "echo hello from scratch",
    )
    subprocess.run(["podman", "load", "-i", out], check=True, capture_output=True)
    run = subprocess.run([*PODMAN_RUN, podman_image], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "hello from scratch\n"


def test_a_docker_archive_is_what_docker_load_and_podman_load_read(ocibox, tmp_path, podman_image):
    out = tmp_path / "hello-docker.tar"
    ocibox(
        "build",
        "--from-binary",
        BUSYBOX,
        "--format",
        "docker-archive",
        "-o",
        out,
        "-t",
        podman_image,
        "--entrypoint",
        '["/busybox", "echo"]',
        "--cmd",
        '["from", "a docker-archive"]',
    )
    with tarfile.open(out) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        names = tar.getnames()
    [entry] = manifest
    assert entry["RepoTags"] == [podman_image]
    assert entry["Config"] in names and all(layer in names for layer in entry["Layers"])
    inspected = skopeo_inspect("docker-archive", out, "--config")
    assert inspected["config"]["Entrypoint"] == ["/busybox", "echo"]
    subprocess.run(["podman", "load", "-i", out], check=True, capture_output=True)
    run = subprocess.run([*PODMAN_RUN, podman_image], capture_output=True, text=True)
    assert (run.returncode, run.stdout) == (0, "from a docker-archive\n"), run.stderr


def test_a_dynamically_linked_program_gets_a_warning_naming_the_problem(ocibox, tmp_path):
    out = tmp_path / "true.tar"
    result = ocibox("build", "--from-binary", DYNAMIC, "-o", out)
    warning = result.stderr.splitlines()[0]
    assert warning.startswith("ocibox: warning: /bin/true is dynamically linked")
    for caveat in ("/lib64/ld-linux-x86-64.so.2", "--base", "/etc/passwd", "time-zone", "CA certificates"):
        assert caveat in warning
    assert out.is_file(), "it is a warning: the image is still written"


def test_certs_and_passwd_come_from_the_host_on_request(ocibox, tmp_path):
    out = tmp_path / "full.tar"
    ocibox("build", "--from-binary", BUSYBOX, "-o", out, "--add-certs", "--add-passwd", "--user", "nobody")
    archive = OciArchive(out)
    layer = archive.layer()
    assert (
        layer["etc/ssl/certs/ca-certificates.crt"][1]
        == Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()
    )
    passwd = layer["etc/passwd"][1].decode()
    assert passwd.startswith("root:x:0:0:") and "\nnobody:x:65534:65534:" in passwd
    assert layer["etc/group"][1].decode().splitlines() == ["root:x:0:", "nobody:x:65534:"]
    assert [name for name in layer] == [
        "busybox",
        "etc",
        "etc/group",
        "etc/passwd",
        "etc/ssl",
        "etc/ssl/certs",
        "etc/ssl/certs/ca-certificates.crt",
    ]
    assert archive.config["config"]["User"] == "nobody"


def test_config_options_land_in_the_image_config(ocibox, tmp_path, oci_schema):
    out = tmp_path / "web.tar"
    ocibox(
        "build",
        "--from-binary",
        BUSYBOX,
        "-o",
        out,
        "--entrypoint",
        "/busybox httpd -f",
        "--cmd",
        "-p 8080",
        "--env",
        "A=1",
        "--env",
        "B=x=y",
        "--workdir",
        "/srv",
        "--user",
        "1000:1000",
        "--label",
        "org.example=yes",
        "--expose",
        "8080",
        "--expose",
        "53/udp",
        "--expose",
        "9000-9001",
    )
    config = OciArchive(out).config
    oci_schema.validate(config, "config")
    assert config["config"] == {
        "Entrypoint": ["/busybox", "httpd", "-f"],
        "Cmd": ["-p", "8080"],
        "Env": ["A=1", "B=x=y"],
        "WorkingDir": "/srv",
        "User": "1000:1000",
        "Labels": {"org.example": "yes"},
        "ExposedPorts": {"8080/tcp": {}, "53/udp": {}, "9000/tcp": {}, "9001/tcp": {}},
    }


# --- reproducible --------------------------------------------------------------------------------


def test_the_same_inputs_give_the_same_bytes_and_source_date_epoch_sets_created(ocibox, tmp_path):
    site = tmp_path / "site"
    (site / "sub").mkdir(parents=True)
    (site / "sub" / "page.html").write_text("<p>hi</p>\n")
    args = ["build", "--from-binary", BUSYBOX, "--add", f"{site}:/srv", "--label", "a=b"]
    first, second = tmp_path / "1.tar", tmp_path / "2.tar"
    digest1 = ocibox(*args, "-o", first).stdout
    os.utime(site / "sub" / "page.html", (1, 1))  # host mtimes don't matter
    digest2 = ocibox(*args, "-o", second).stdout
    assert first.read_bytes() == second.read_bytes()
    assert digest1 == digest2

    docker1, docker2 = tmp_path / "d1.tar", tmp_path / "d2.tar"
    ocibox(*args, "--format", "docker-archive", "-o", docker1)
    ocibox(*args, "--format", "docker-archive", "-o", docker2)
    assert docker1.read_bytes() == docker2.read_bytes()

    dated = tmp_path / "dated.tar"
    digest3 = ocibox(*args, "-o", dated, env={"SOURCE_DATE_EPOCH": "1700000000"}).stdout
    assert digest3 != digest1
    archive = OciArchive(dated)
    assert archive.config["created"] == "2023-11-14T22:13:20Z"
    assert {h["created"] for h in archive.config["history"]} == {"2023-11-14T22:13:20Z"}
    assert {entry.mtime for entry, _ in archive.layer().values()} == {1700000000}
    assert OciArchive(first).config["created"] == "1970-01-01T00:00:00Z"

    layer = gzip.open(io.BytesIO(OciArchive(first).blob(OciArchive(first).manifest["layers"][0]["digest"])))
    with tarfile.open(fileobj=layer) as tar:
        names = tar.getnames()
    assert names == ["busybox", "srv", "srv/sub", "srv/sub/page.html"], "sorted, parents first"
    raw = OciArchive(first).blob(OciArchive(first).manifest["layers"][0]["digest"])
    assert raw[4:8] == b"\0\0\0\0" and not raw[3] & 0x08, "gzip: mtime 0, no file name"


# --- the store, ocibox load, ocibox tag -----------------------------------------------------------


def test_tag_puts_the_image_in_the_store_and_load_round_trips_the_archive(ocibox, tmp_path):
    out = tmp_path / "bb.tar"
    digest = ocibox(
        "build", "--from-binary", BUSYBOX, "-t", "example.com/tools/busybox:1.0", "-o", out
    ).stdout.strip()
    images = json.loads(ocibox("images", "--format", "json").stdout)
    assert [(i["Reference"], i["Digest"]) for i in images] == [("example.com/tools/busybox:1.0", digest)]

    saved = tmp_path / "saved.tar"
    ocibox("save", "example.com/tools/busybox:1.0", "-o", saved)
    assert OciArchive(saved).manifest_raw == OciArchive(out).manifest_raw

    ocibox("rmi", "example.com/tools/busybox:1.0")
    loaded = ocibox("load", "-i", out).stdout
    assert "Loaded image: example.com/tools/busybox:1.0" in loaded
    inspected = json.loads(ocibox("inspect", "example.com/tools/busybox:1.0").stdout)[0]
    assert inspected["ManifestDigest"] == digest
    assert inspected["Config"]["config"]["Entrypoint"] == ["/busybox"]


def test_an_untagged_archive_loads_under_its_file_name(ocibox, tmp_path):
    out = tmp_path / "plain.tar"
    digest = ocibox("build", "--from-binary", BUSYBOX, "-o", out).stdout.strip()
    assert "Loaded image: localhost/plain:latest" in ocibox("load", "-i", out).stdout
    assert json.loads(ocibox("inspect", "localhost/plain:latest").stdout)[0]["ManifestDigest"] == digest


def test_ocibox_tag_names_a_stored_image_again(ocibox):
    digest = ocibox("build", "--from-binary", BUSYBOX, "-t", "busybox-built").stdout.strip()
    assert ocibox("tag", "busybox-built", "localhost:5000/team/bb:v1").stdout == ""
    rows = json.loads(ocibox("images", "--format", "json").stdout)
    assert sorted((r["Reference"], r["Digest"]) for r in rows) == [
        ("docker.io/library/busybox-built:latest", digest),
        ("localhost:5000/team/bb:v1", digest),
    ]
    image_id = rows[0]["ID"]
    ocibox("tag", image_id, "by-id:2")
    assert json.loads(ocibox("inspect", "by-id:2").stdout)[0]["ManifestDigest"] == digest

    assert_one_clear_line(ocibox("tag", "no-such-image", "x:1", check=False), "no-such-image")
    assert_one_clear_line(ocibox("tag", "busybox-built", "x@sha256:" + "a" * 64, check=False), "digest")


# --- onto a base image ---------------------------------------------------------------------------


@pytest.fixture
def busybox_base(ocibox, tmp_path):
    """A busybox image in the store, built with ocibox itself: /bin/sh & co. link to /busybox."""
    links = tmp_path / "links" / "bin"
    links.mkdir(parents=True)
    for applet in ("sh", "ls", "cat", "id", "readlink"):
        (links / applet).symlink_to("/busybox")
    ocibox(
        "build",
        "--from-binary",
        BUSYBOX,
        "--add",
        f"{links}:/bin",
        "--add-passwd",
        "-t",
        "localhost/bb-base:1",
        "--env",
        "PATH=/bin",
        "--workdir",
        "/home",
        "--label",
        "from=base",
        "--cmd",
        "sh",
    )
    return "localhost/bb-base:1"


def test_base_gets_one_more_layer_and_keeps_its_config(
    ocibox, tmp_path, busybox_base, podman_image, oci_schema
):
    script = tmp_path / "hello.sh"
    script.write_text(
        '#!/bin/sh\necho "in $(pwd) as $(id -u)"; ls /site/sub; readlink /site/up; cat /site/sub/f\n'
    )
    script.chmod(0o755)
    site = tmp_path / "site"
    (site / "sub").mkdir(parents=True)
    (site / "sub" / "f").write_text("data\n")
    (site / "sub" / "secret").write_text("private\n")
    (site / "sub" / "secret").chmod(0o600)
    (site / "up").symlink_to("../../etc")  # kept as a link: never followed
    out = tmp_path / "app.tar"

    ocibox(
        "build",
        "--from-binary",
        script,
        "--base",
        busybox_base,
        "--add",
        f"{site}:/site",
        "-t",
        podman_image,
        "-o",
        out,
        "--env",
        "GREETING=hi",
    )
    base = json.loads(ocibox("inspect", busybox_base).stdout)[0]
    archive = OciArchive(out)
    oci_schema.validate(archive.manifest, "manifest")
    oci_schema.validate(archive.config, "config")

    assert archive.manifest["layers"][:-1] == base["Manifest"]["layers"]
    assert len(archive.manifest["layers"]) == 2
    assert archive.manifest["annotations"] == {
        "org.opencontainers.image.base.digest": base["ManifestDigest"],
        "org.opencontainers.image.base.name": busybox_base,
    }
    config = archive.config
    assert config["rootfs"]["diff_ids"][:-1] == base["Config"]["rootfs"]["diff_ids"]
    assert config["history"][:-1] == base["Config"]["history"] and len(config["history"]) == 2
    assert config["config"] == {
        "Env": ["PATH=/bin", "GREETING=hi"],
        "Entrypoint": ["/hello.sh"],
        "WorkingDir": "/home",
        "Labels": {"from": "base"},
    }, "the base's Cmd goes"
    assert config["architecture"] == "amd64", "a script takes the base's platform"

    layer = archive.layer()
    assert list(layer) == ["hello.sh", "site", "site/sub", "site/sub/f", "site/sub/secret", "site/up"]
    assert layer["site/up"][0].issym() and layer["site/up"][0].linkname == "../../etc"
    assert layer["site/sub/secret"][0].mode == 0o600 and layer["hello.sh"][0].mode == 0o755

    subprocess.run(["podman", "load", "-i", out], check=True, capture_output=True)
    run = subprocess.run([*PODMAN_RUN, podman_image], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "in /home as 0\nf\nsecret\n../../etc\ndata\n"


def test_over_a_base_no_parent_folder_is_rewritten(ocibox, tmp_path, busybox_base):
    out = tmp_path / "deep.tar"
    ocibox(
        "build",
        "--from-binary",
        BUSYBOX,
        "--base",
        busybox_base,
        "--add",
        f"{BUSYBOX}:/usr/local/bin/bb",
        "-o",
        out,
    )
    assert list(OciArchive(out).layer()) == ["busybox", "usr/local/bin/bb"]


@pytest.mark.parametrize("name", ["busybox", "busybox-v2s2", "multiarch"])
def test_a_missing_base_is_pulled_first_and_keeps_its_manifest_type(
    ocibox, tmp_path, images, podman_image, name
):
    base = images[name]
    out = tmp_path / "pulled.tar"
    result = ocibox(
        "build",
        "--from-binary",
        BUSYBOX,
        "--base",
        base.ref,
        "-o",
        out,
        "-t",
        podman_image,
        "--cmd",
        "sh -c 'echo $(id -un) sees $(ls /home)'",
    )
    assert "Pulling base image" in result.stderr
    archive = OciArchive(out)
    amd64 = base.manifests["linux/amd64"] if base.is_index else base.manifest
    assert archive.manifest["mediaType"] == amd64.media_type
    assert [layer["digest"] for layer in archive.manifest["layers"][:-1]] == [
        layer.digest for layer in amd64.layers
    ]
    docker = amd64.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert archive.manifest["config"]["mediaType"] == json.loads(amd64.raw)["config"]["mediaType"]
    assert archive.manifest["layers"][-1]["mediaType"] == (
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
        if docker
        else "application/vnd.oci.image.layer.v1.tar+gzip"
    )
    assert "annotations" not in archive.manifest or not docker
    assert skopeo_inspect("oci-archive", out)["Architecture"] == "amd64"
    config = json.loads(ocibox("inspect", podman_image).stdout)[0]["Config"]
    assert config["config"]["Env"] == amd64.config["config"]["Env"], "the base's config stays"
    assert config["config"]["Entrypoint"] == ["/busybox"]
    assert config["config"]["Cmd"] == ["sh", "-c", "echo $(id -un) sees $(ls /home)"]
    assert config["rootfs"]["diff_ids"][:-1] == amd64.config["rootfs"]["diff_ids"]
    subprocess.run(["podman", "load", "-i", out], check=True, capture_output=True)
    run = subprocess.run([*PODMAN_RUN, podman_image], capture_output=True, text=True)
    assert (run.returncode, run.stdout) == (0, "root sees app\n"), run.stderr


def test_the_program_must_match_the_base_platform(ocibox, tmp_path, busybox_base):
    result = ocibox(
        "build",
        "--from-binary",
        arm64_busybox(tmp_path),
        "--base",
        busybox_base,
        "-o",
        tmp_path / "x.tar",
        check=False,
    )
    assert_one_clear_line(result, "linux/amd64", "arm64")
    assert not (tmp_path / "x.tar").exists()


# --- architecture from the ELF header ------------------------------------------------------------


def test_an_arm64_binary_makes_an_arm64_image(ocibox, tmp_path):
    out = tmp_path / "arm.tar"
    ocibox("build", "--from-binary", arm64_busybox(tmp_path), "-o", out)
    inspected = skopeo_inspect("oci-archive", out)
    assert (inspected["Os"], inspected["Architecture"]) == ("linux", "arm64")
    assert OciArchive(out).config["variant"] == "v8"


def elf_header(
    machine: int, is_64: bool = True, little: bool = True, interpreter: bytes | None = None
) -> bytes:
    """A minimal ELF file: header and, for an interpreter, one PT_INTERP program header."""
    order = "<" if little else ">"
    ident = b"\x7fELF" + bytes([2 if is_64 else 1, 1 if little else 2, 1]) + b"\0" * 9
    phnum = 1 if interpreter else 0
    if is_64:
        header = ident + struct.pack(
            order + "HHIQQQIHHHHHH", 2, machine, 1, 0, 64 if phnum else 0, 0, 0, 64, 56, phnum, 0, 0, 0
        )
        if interpreter:
            header += struct.pack(
                order + "IIQQQQQQ", 3, 4, 64 + 56, 0, 0, len(interpreter), len(interpreter), 1
            )
    else:
        header = ident + struct.pack(
            order + "HHIIIIIHHHHHH", 2, machine, 1, 0, 52 if phnum else 0, 0, 0, 52, 32, phnum, 0, 0, 0
        )
        if interpreter:
            header += struct.pack(
                order + "IIIIIIII", 3, 52 + 32, 0, 0, len(interpreter), len(interpreter), 4, 1
            )
    return header + (interpreter or b"")


@pytest.mark.parametrize(
    ("machine", "is_64", "little", "arch"),
    [
        (62, True, True, "amd64"),
        (183, True, True, "arm64"),
        (40, False, True, "arm"),
        (3, False, True, "386"),
        (21, True, True, "ppc64le"),
        (22, True, False, "s390x"),
        (243, True, True, "riscv64"),
    ],
)
def test_the_elf_machine_names_the_architecture(tmp_path, machine, is_64, little, arch):
    path = tmp_path / "prog"
    path.write_bytes(elf_header(machine, is_64, little))
    info = read_elf(path)
    assert info.architecture == arch and not info.dynamic
    path.write_bytes(elf_header(machine, is_64, little, interpreter=b"/lib/ld.so.1\0"))
    assert read_elf(path).interpreter == "/lib/ld.so.1"


def test_real_binaries_say_whether_they_are_static(tmp_path):
    assert read_elf(BUSYBOX).interpreter is None
    assert read_elf(DYNAMIC).interpreter == "/lib64/ld-linux-x86-64.so.2"
    assert read_elf(Path("/etc/passwd")) is None


def test_a_crafted_riscv64_program_builds_a_riscv64_image_and_arch_overrides(ocibox, tmp_path):
    prog = tmp_path / "prog"
    prog.write_bytes(elf_header(243))
    ocibox("build", "--from-binary", prog, "-o", tmp_path / "rv.tar")
    assert OciArchive(tmp_path / "rv.tar").config["architecture"] == "riscv64"
    result = ocibox("build", "--from-binary", prog, "--arch", "arm/v7", "-o", tmp_path / "arm.tar")
    assert "riscv64 program, but the image says arm" in result.stderr
    config = OciArchive(tmp_path / "arm.tar").config
    assert (config["architecture"], config["variant"]) == ("arm", "v7")


def test_a_script_needs_arch_without_a_base(ocibox, tmp_path):
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    out = tmp_path / "script.tar"
    assert_one_clear_line(
        ocibox("build", "--from-binary", script, "-o", out, check=False), "not an ELF", "--arch"
    )
    assert not out.exists()
    ocibox("build", "--from-binary", script, "--arch", "arm64", "-o", out)
    assert OciArchive(out).config["architecture"] == "arm64"


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--from-binary", "/no/such/prog"], ["no such file", "/no/such/prog"]),
        (["--from-binary", "/usr/bin"], ["folder"]),
        (["--from-binary", BUSYBOX, "--add", "no-colon"], ["SRC:DEST"]),
        (["--from-binary", BUSYBOX, "--add", ":/x"], ["SRC:DEST"]),
        (["--from-binary", BUSYBOX, "--add", "/no/such/dir:/x"], ["no such file", "/no/such/dir"]),
        (["--from-binary", BUSYBOX, "--add", f"{BUSYBOX}:/busybox"], ["/busybox", "both"]),
        (["--from-binary", BUSYBOX, "--add", f"{BUSYBOX}:/busybox/inside"], ["not a folder"]),
        (["--from-binary", BUSYBOX, "--add", f"{BUSYBOX}:/../escape"], [".."]),
        (["--from-binary", BUSYBOX, "--env", "NOVALUE"], ["KEY=VALUE"]),
        (["--from-binary", BUSYBOX, "--expose", "http"], ["--expose"]),
        (["--from-binary", BUSYBOX, "--entrypoint", "[1, 2]"], ["JSON array of strings"]),
        (["--from-binary", BUSYBOX, "--cmd", "'unclosed"], ["--cmd"]),
        (["--from-binary", BUSYBOX, "--tag", "Bad:Name:x"], ["invalid reference"]),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(ocibox, tmp_path, args, words):
    out = tmp_path / "out" / "image.tar"
    out.parent.mkdir()
    result = ocibox("build", *args, "-o", out, check=False)
    assert_one_clear_line(result, *words)
    assert list(out.parent.iterdir()) == [], "no archive, no temp file"


def test_bad_source_date_epoch_and_missing_output_folder(ocibox, tmp_path):
    result = ocibox(
        "build",
        "--from-binary",
        BUSYBOX,
        "-o",
        tmp_path / "x.tar",
        check=False,
        env={"SOURCE_DATE_EPOCH": "yesterday"},
    )
    assert_one_clear_line(result, "SOURCE_DATE_EPOCH")
    assert_one_clear_line(
        ocibox("build", "--from-binary", BUSYBOX, "-o", tmp_path / "nope" / "x.tar", check=False),
        "no such folder",
    )
    result = ocibox(
        "build",
        "--from-binary",
        BUSYBOX,
        "--base",
        "localhost/not-there:1",
        "-o",
        tmp_path / "x.tar",
        check=False,
    )
    assert result.returncode == 125 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "Pulling base image localhost/not-there:1",
        "ocibox: base image localhost/not-there:1 is not in the store and pulling it failed: "
        "can't reach registry localhost: connection refused",
    ]
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_program_is_refused(ocibox_user, ocibox, tmp_path):
    secret = ocibox.base / "secret-prog"
    shutil.copy(BUSYBOX, secret)
    secret.chmod(0o700)
    out = ocibox_user.home / "x.tar"
    result = ocibox_user("build", "--from-binary", secret, "-o", out, check=False)
    assert_one_clear_line(result, "cannot read", str(secret))
    assert not out.exists()


def test_without_o_or_tag_the_archive_goes_beside_the_program_as_zeroimage_does(ocibox, tmp_path):
    prog = tmp_path / "app"
    shutil.copy(BUSYBOX, prog)
    ocibox("build", "--from-binary", prog)
    assert OciArchive(tmp_path / "app.tar").config["config"]["Entrypoint"] == ["/app"]


def test_add_places_files_like_copy_does(ocibox, tmp_path):
    conf = tmp_path / "app.conf"
    conf.write_text("x=1\n")
    conf.chmod(0o640)
    linked = tmp_path / "linked-folder"
    (tmp_path / "real-folder").mkdir()
    (tmp_path / "real-folder" / "a").write_text("a\n")
    os.link(tmp_path / "real-folder" / "a", tmp_path / "real-folder" / "b")
    linked.symlink_to(tmp_path / "real-folder")
    out = tmp_path / "copy.tar"
    ocibox(
        "build",
        "--from-binary",
        BUSYBOX,
        "-o",
        out,
        "--add",
        f"{conf}:/etc/app/",
        "--add",
        f"{conf}:/etc/renamed.conf",
        "--add",
        f"{linked}:/data",
    )
    layer = OciArchive(out).layer()
    assert layer["etc/app/app.conf"][0].mode == 0o640 and layer["etc/app/app.conf"][1] == b"x=1\n"
    assert layer["etc/renamed.conf"][1] == b"x=1\n"
    assert layer["data"][0].isdir() and layer["data/a"][1] == b"a\n", (
        "a symlink named as SRC is what it names"
    )
    assert layer["etc"][0].mode == 0o755 and layer["etc"][0].isdir()
    assert layer["data/b"][0].islnk() and layer["data/b"][0].linkname == "data/a", (
        "hard links stay hard links"
    )


def test_special_files_are_refused(ocibox, tmp_path):
    folder = tmp_path / "with-fifo"
    folder.mkdir()
    os.mkfifo(folder / "pipe")
    out = tmp_path / "x.tar"
    result = ocibox("build", "--from-binary", BUSYBOX, "--add", f"{folder}:/x", "-o", out, check=False)
    assert_one_clear_line(result, str(folder / "pipe"), "pipe")
    assert not out.exists()


def test_an_unprivileged_user_builds_into_their_own_store(ocibox_user):
    digest = ocibox_user("build", "--from-binary", BUSYBOX, "-t", "mine:1").stdout.strip()
    [row] = json.loads(ocibox_user("images", "--format", "json").stdout)
    assert (row["Reference"], row["Digest"]) == ("docker.io/library/mine:1", digest)
    out = ocibox_user.home / "mine.tar"
    ocibox_user("save", "mine:1", "-o", out)
    assert skopeo_inspect("oci-archive", out)["Digest"] == digest


def test_umoci_unpacks_an_image_built_onto_a_base(ocibox, tmp_path, busybox_base):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<p>hi</p>\n")
    os.link(site / "index.html", site / "same.html")
    out = tmp_path / "web.tar"
    ocibox(
        "build",
        "--from-binary",
        BUSYBOX,
        "--base",
        busybox_base,
        "--add",
        f"{site}:/srv/www",
        "-t",
        "web:1",
        "-o",
        out,
    )
    layout = tmp_path / "layout"
    layout.mkdir()
    with tarfile.open(out) as tar:
        tar.extractall(layout)  # our own archive: plain files only
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:1", str(bundle)],
        check=True,
        capture_output=True,
    )
    rootfs = bundle / "rootfs"
    assert (rootfs / "bin" / "sh").readlink() == Path("/busybox")
    assert (rootfs / "srv" / "www" / "index.html").read_text() == "<p>hi</p>\n"
    assert (rootfs / "srv" / "www" / "same.html").stat().st_ino == (
        rootfs / "srv" / "www" / "index.html"
    ).stat().st_ino
    assert "nobody:x:65534" in (rootfs / "etc" / "passwd").read_text()
    assert json.loads((bundle / "config.json").read_text())["process"]["args"] == ["/busybox"]
