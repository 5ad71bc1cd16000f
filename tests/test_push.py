"""`ocibox push`: a user uploads an image from the store to a registry and pulls it back unchanged.

Against the real docker-registry fixtures (open, htpasswd, token). Requests are counted at the
fault-injecting proxy in front of the open registry (tests/support/proxy.py); what arrived is read
back with skopeo and with `ocibox pull` into a fresh store.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from support.layout import Entry, Layout
from test_registry import proxied_tls_registry, tls_registry  # noqa: F401 - fixtures, shared

CHUNK = 8 << 20  # ocibox's default: bigger blobs go up in PATCH chunks


# --- helpers -----------------------------------------------------------------------------------


def unique(name: str) -> str:
    """A repository name no other test (or earlier run) has used on the session registries."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def remote_manifest(ref: str, creds: str | None = None) -> tuple[str, dict]:
    """(digest, document) of the manifest or index `ref` names, as skopeo reads it."""
    auth = ["--creds", creds] if creds else []
    raw = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", *auth, f"docker://{ref}"],
        check=True,
        capture_output=True,
    ).stdout
    return "sha256:" + hashlib.sha256(raw).hexdigest(), json.loads(raw)


def pull_into_fresh_store(ocibox, ref: str, *args: str) -> str:
    """Pull `ref` into a new empty store; the manifest digest it stored."""
    root = Path(ocibox.home) / unique("fresh-store")
    ocibox("pull", "-q", *args, ref, env={"OCIBOX_ROOT": str(root)})
    index = json.loads((root / "index.json").read_text())
    (entry,) = index["manifests"]
    return entry["digest"]


def pushed_digest(result) -> str:
    """`ocibox push` prints REGISTRY/REPOSITORY@DIGEST on stdout."""
    line = result.stdout.strip().splitlines()[-1]
    assert "@sha256:" in line, result.stdout
    return line.rsplit("@", 1)[1]


def assert_one_error(result, *fragments: str) -> None:
    assert result.returncode == 125, result
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("ocibox: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def blob_uploads(proxy) -> list:
    """Requests that carry blob bytes (or open an upload session) at the proxy."""
    return [r for r in proxy.requests if "/blobs/uploads/" in r.path and "mount=" not in r.path]


def big_image_archive(workdir: Path, size: int) -> Path:
    """An oci-archive of one image whose only layer is `size` bytes of random data, uncompressed."""
    layout = Layout(workdir / "big-layout")
    layer = layout.add_entries_layer([Entry("big.bin", data=os.urandom(size))], compression=None)
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/big.bin"]}}
    layout.add_image([layer], config, "big")
    archive = workdir / "big.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(layout.path.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(layout.path)), recursive=False)
    return archive


# --- round trips -------------------------------------------------------------------------------


def test_push_to_another_repository_pulls_back_with_the_same_digest(ocibox, images, fault_proxy):
    image = images["busybox"]
    source = fault_proxy.ref("busybox")
    ocibox("pull", "-q", source)
    dest = fault_proxy.ref(unique("copies/busybox"), "1")

    result = ocibox("push", source, dest)

    assert pushed_digest(result) == image.digest
    assert "The push refers to repository" in result.stderr
    assert remote_manifest(dest)[0] == image.digest
    assert pull_into_fresh_store(ocibox, dest) == image.digest


def test_blobs_come_over_by_cross_repository_mount(ocibox, images, fault_proxy):
    image = images["busybox"]
    source = fault_proxy.ref("busybox")
    ocibox("pull", "-q", source)
    fault_proxy.reset()
    dest = fault_proxy.ref(unique("mounted/busybox"), "1")

    result = ocibox("push", source, dest)

    mounts = [r for r in fault_proxy.requests if "mount=" in r.path]
    assert len(mounts) == 1 + len(image.layers)  # the config and every layer
    assert all(r.status == 201 and "from=busybox" in r.path for r in mounts)
    assert blob_uploads(fault_proxy) == []
    assert "Mounted from busybox" in result.stderr
    assert remote_manifest(dest)[0] == image.digest


def test_a_refused_mount_turns_into_an_upload(ocibox, fault_proxy):
    # Built here and named on the registry, but never pushed there: the mount can't work.
    local = fault_proxy.ref(unique("never-pushed"), "1")
    ocibox("build", "--from-binary", "/bin/busybox", "--tag", local)
    dest = fault_proxy.ref(unique("from-local"), "1")
    fault_proxy.reset()

    result = ocibox("push", local, dest)

    mounts = [r for r in fault_proxy.requests if "mount=" in r.path]
    assert len(mounts) == 2 and all(r.status == 202 for r in mounts)
    # The registry opened an upload session instead; ocibox used it (no second POST).
    assert not [r for r in fault_proxy.requests if r.method == "POST" and "mount=" not in r.path]
    puts = [r for r in fault_proxy.requests if r.method == "PUT" and "/blobs/uploads/" in r.path]
    assert len(puts) == 2 and all(r.status == 201 for r in puts)
    assert remote_manifest(dest)[0] == pushed_digest(result)


def test_a_second_push_uploads_no_blob(ocibox, images, fault_proxy):
    source = fault_proxy.ref("busybox")
    ocibox("pull", "-q", source)
    dest = fault_proxy.ref(unique("twice/busybox"), "1")
    ocibox("push", source, dest)
    fault_proxy.reset()

    result = ocibox("push", source, dest)

    assert blob_uploads(fault_proxy) == []
    assert not [r for r in fault_proxy.requests if "mount=" in r.path]
    heads = [r for r in fault_proxy.requests if r.method == "HEAD" and "/blobs/" in r.path]
    assert heads and all(r.status == 200 for r in heads)
    assert "Layer already exists" in result.stderr
    assert pushed_digest(result) == images["busybox"].digest


def test_push_without_dest_goes_where_the_image_is_named(ocibox, images, registry):
    ocibox("pull", "-q", images["busybox"].ref)
    name = registry.ref(unique("retagged"), "v1")
    ocibox("tag", images["busybox"].ref, name)

    result = ocibox("push", "-q", name)

    assert result.stderr == ""
    assert pushed_digest(result) == images["busybox"].digest
    assert remote_manifest(name)[0] == images["busybox"].digest


def test_a_docker_v2s2_image_keeps_its_manifest_bytes(ocibox, images, registry):
    image = images["busybox-v2s2"]
    ocibox("pull", "-q", image.ref)
    dest = registry.ref(unique("v2s2"), "1")

    ocibox("push", image.ref, dest)

    digest, manifest = remote_manifest(dest)
    assert digest == image.digest
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"


def test_push_by_digest_without_a_tag(ocibox, images, registry):
    image = images["busybox"]
    ocibox("pull", "-q", image.ref)
    repo = registry.ref(unique("by-digest"), "x").rsplit(":", 1)[0]

    result = ocibox("push", image.ref, f"{repo}@{image.digest}")

    assert result.stdout.strip() == f"{repo}@{image.digest}"
    assert remote_manifest(f"{repo}@{image.digest}")[0] == image.digest
    wrong = "sha256:" + "0" * 64
    refused = ocibox("push", image.ref, f"{repo}@{wrong}", check=False)
    assert_one_error(refused, image.digest)


# --- uploads: monolithic and chunked -----------------------------------------------------------


def test_a_big_layer_goes_up_in_chunks_and_comes_back_intact(ocibox, fault_proxy, tmp_path):
    size = 20 << 20
    archive = big_image_archive(tmp_path, size)
    (name,) = [line.split(": ", 1)[1] for line in ocibox("load", "-i", str(archive)).stdout.splitlines()]
    local = json.loads(ocibox("inspect", name).stdout)[0]
    (layer,) = local["Manifest"]["layers"]
    dest = fault_proxy.ref(unique("big"), "1")
    fault_proxy.reset()

    result = ocibox("push", name, dest)

    patches = [r for r in fault_proxy.requests if r.method == "PATCH"]
    assert len(patches) == -(-layer["size"] // CHUNK)  # three: 8 MiB, 8 MiB, the rest
    assert all(r.status == 202 for r in patches)
    # The small config went up in one PUT with its digest.
    puts = [r for r in fault_proxy.requests if r.method == "PUT" and "/blobs/uploads/" in r.path]
    assert len(puts) == 2 and all(r.status == 201 for r in puts)
    assert pushed_digest(result) == local["ManifestDigest"]
    assert remote_manifest(dest)[0] == local["ManifestDigest"]
    root = Path(ocibox.home) / "back"
    ocibox("pull", "-q", dest, env={"OCIBOX_ROOT": str(root)})
    back = root / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
    assert back.stat().st_size == layer["size"]
    assert "sha256:" + hashlib.sha256(back.read_bytes()).hexdigest() == layer["digest"]


def test_chunk_size_is_a_flag(ocibox, images, fault_proxy):
    image = images["busybox-uncompressed"]  # one layer of about 2 MB
    ocibox("pull", "-q", image.ref)
    dest = fault_proxy.ref(unique("small-chunks"), "1")
    fault_proxy.reset()

    ocibox("push", "--chunk-size", "512K", image.ref, dest)

    patches = [r for r in fault_proxy.requests if r.method == "PATCH"]
    layer_size = image.layers[0].size
    assert len(patches) == -(-layer_size // (512 << 10))
    assert pull_into_fresh_store(ocibox, dest) == image.digest


def test_a_registry_hiccup_during_an_upload_is_retried(ocibox, fault_proxy, images):
    image = images["busybox"]
    ocibox("pull", "-q", image.ref)  # named on the registry itself: no mount through the proxy
    dest = fault_proxy.ref(unique("hiccup"), "1")
    fault_proxy.fail(status=503, times=1, path="/blobs/uploads/.+", method="PUT")

    result = ocibox("push", image.ref, dest)

    assert [r for r in fault_proxy.requests if r.fault]
    assert pushed_digest(result) == image.digest
    assert remote_manifest(dest)[0] == image.digest


def test_a_dropped_chunk_starts_the_upload_over(ocibox, fault_proxy, images):
    image = images["busybox-uncompressed"]
    ocibox("pull", "-q", image.ref)
    dest = fault_proxy.ref(unique("chunk-hiccup"), "1")
    fault_proxy.fail(status=502, times=1, path="/blobs/uploads/.+", method="PATCH")

    result = ocibox("push", "--chunk-size", "512K", image.ref, dest)

    failed = [r for r in fault_proxy.requests if r.fault]
    assert len(failed) == 1 and failed[0].method == "PATCH"
    starts = [r for r in fault_proxy.requests if r.method == "POST" and "mount=" not in r.path]
    assert len(starts) == 1 + len(image.layers) + 1  # the config, each layer, one layer again
    assert pushed_digest(result) == image.digest
    assert pull_into_fresh_store(ocibox, dest) == image.digest


# --- build --push --------------------------------------------------------------------------------


def test_build_push_sends_the_built_image_to_its_tag(ocibox, registry):
    dest = registry.ref(unique("built"), "1")

    result = ocibox("build", "--from-binary", "/bin/busybox", "--tag", dest, "--push")

    digest = result.stdout.strip().splitlines()[-1]
    assert remote_manifest(dest)[0] == digest
    config = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", "--config", f"docker://{dest}"],
            check=True,
            capture_output=True,
        ).stdout
    )
    assert config["config"]["Entrypoint"] == ["/busybox"]


def test_build_push_needs_a_tag(ocibox, tmp_path):
    result = ocibox("build", "--from-binary", "/bin/busybox", "--push", check=False, cwd=tmp_path)
    assert_one_error(result, "--push", "--tag")


# --- multi-platform --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["multiarch", "multiarch-v2s2"])
def test_a_multi_platform_index_is_pushed_whole_when_the_store_has_every_platform(
    ocibox, images, registry, name
):
    image = images[name]
    ocibox("pull", "-q", "--platform", "linux/amd64", image.ref)
    ocibox("tag", image.ref, "keep/amd64:1")  # the amd64 manifest stays named
    ocibox("pull", "-q", "--platform", "linux/arm64/v8", image.ref)
    dest = registry.ref(unique("multi"), "1")

    result = ocibox("push", image.ref, dest)

    assert "alone" not in result.stderr
    assert "Pushing multi-platform index" in result.stderr
    assert pushed_digest(result) == image.digest
    digest, index = remote_manifest(dest)
    assert digest == image.digest
    assert len(index["manifests"]) == 2
    by_digest = f"{dest.rsplit(':', 1)[0]}@{image.digest}"
    for platform in ("linux/amd64", "linux/arm64/v8"):
        wanted = image.manifests[platform].digest
        assert pull_into_fresh_store(ocibox, by_digest, "--platform", platform) == wanted


def test_an_index_copied_into_the_store_with_skopeo_all_is_pushed_whole(ocibox, images, registry):
    image = images["multiarch"]
    name = registry.ref(unique("skopeo-all"), "1")
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            "--all",
            "--src-tls-verify=false",
            f"docker://{image.ref}",
            f"oci:{ocibox.root}:{name}",
        ],
        check=True,
    )
    dest = registry.ref(unique("from-skopeo"), "1")

    result = ocibox("push", name, dest)

    assert pushed_digest(result) == image.digest
    assert remote_manifest(dest)[0] == image.digest


def test_one_platform_of_an_index_is_pushed_alone_and_says_so(ocibox, images, registry):
    image = images["multiarch"]
    ocibox("pull", "-q", "--platform", "linux/amd64", image.ref)
    dest = registry.ref(unique("one-platform"), "1")

    result = ocibox("push", image.ref, dest)

    assert "pushing its manifest alone" in result.stderr
    amd64 = image.manifests["linux/amd64"].digest
    assert pushed_digest(result) == amd64
    assert remote_manifest(dest)[0] == amd64


# --- authentication ------------------------------------------------------------------------------


def test_push_to_a_basic_auth_registry_needs_login(ocibox, images, auth_registry):
    reg = auth_registry
    ocibox("pull", "-q", images["busybox"].ref)
    dest = reg.ref(unique("pushed"), "1")

    refused = ocibox("push", images["busybox"].ref, dest, check=False)
    assert_one_error(refused, "ocibox login", reg.host)

    ocibox("login", "-u", reg.username, "--password-stdin", reg.host, input=reg.password)
    result = ocibox("push", images["busybox"].ref, dest)

    assert pushed_digest(result) == images["busybox"].digest
    assert remote_manifest(dest, reg.creds)[0] == images["busybox"].digest


def test_push_to_a_token_registry_asks_for_push_scope_and_mounts(ocibox, token_registry):
    reg = token_registry
    source = reg.seeded["public/busybox"]
    ocibox("pull", "-q", source)  # anonymous: public/* may be pulled by anyone
    repo = unique("team/app")
    dest = reg.ref(repo, "1")

    refused = ocibox("push", source, dest, check=False)
    assert_one_error(refused, "ocibox login", reg.host)

    ocibox("login", "-u", reg.username, "--password-stdin", reg.host, input=reg.password)
    reg.token_server.requests.clear()
    result = ocibox("push", source, dest)

    scopes = [s for r in reg.token_server.requests for s in r.scopes]
    assert f"repository:{repo}:pull,push" in scopes
    assert "repository:public/busybox:pull" in scopes  # asked with the mount
    assert "Mounted from public/busybox" in result.stderr
    digest = pushed_digest(result)
    assert remote_manifest(dest, f"{reg.username}:{reg.password}")[0] == digest


# --- TLS ----------------------------------------------------------------------------------------


def test_push_over_tls_is_verified_unless_the_registry_is_named_insecure(
    ocibox,
    images,
    proxied_tls_registry,  # noqa: F811 - the fixture imported above
):
    name, ca, _, env = proxied_tls_registry
    ocibox("pull", "-q", images["busybox"].ref)
    dest = f"{name}/{unique('pushed')}:1"

    refused = ocibox("push", images["busybox"].ref, dest, env=env, check=False)
    assert_one_error(refused, f"can't reach registry {name}", "not trusted")

    ocibox("push", "-q", "--insecure", images["busybox"].ref, dest, env=env)
    verified = ocibox("push", images["busybox"].ref, dest, env={**env, "SSL_CERT_FILE": str(ca)})

    assert pushed_digest(verified) == images["busybox"].digest
    assert "Layer already exists" in verified.stderr
    root = Path(ocibox.home) / "back"
    ocibox("pull", "-q", dest, env={**env, "SSL_CERT_FILE": str(ca), "OCIBOX_ROOT": str(root)})
    (entry,) = json.loads((root / "index.json").read_text())["manifests"]
    assert entry["digest"] == images["busybox"].digest


# --- errors ----------------------------------------------------------------------------------------


def test_pushing_an_image_the_store_lacks_is_one_line(ocibox, registry):
    result = ocibox("push", registry.ref("nothing-here"), check=False)
    assert_one_error(result, "not in the store")


def test_pushing_to_a_registry_that_is_down_is_one_line(ocibox, images):
    ocibox("pull", "-q", images["busybox"].ref)
    result = ocibox("push", images["busybox"].ref, "127.0.0.1:1/x:1", check=False)
    assert_one_error(result, "can't reach registry 127.0.0.1:1")


def test_a_refused_blob_upload_is_one_line(ocibox, images, fault_proxy):
    ocibox("pull", "-q", images["busybox"].ref)
    fault_proxy.fail(status=400, times=None, path="/blobs/uploads/.+", method="PUT")

    result = ocibox("push", images["busybox"].ref, fault_proxy.ref(unique("refused"), "1"), check=False)

    assert_one_error(result, "uploading blob", "400")


def test_a_bad_destination_is_one_line(ocibox, images):
    ocibox("pull", "-q", images["busybox"].ref)
    result = ocibox("push", images["busybox"].ref, "Not A Reference", check=False)
    assert_one_error(result)


def test_ctrl_c_during_a_push_stops_it_cleanly(ocibox, images, fault_proxy):
    import signal
    import time

    ocibox("pull", "-q", images["busybox"].ref)
    fault_proxy.fail(503, times=None, path="/blobs/uploads/")  # the push waits between retries
    ctx = ocibox.context()
    proc = subprocess.Popen(
        [*ctx.command, "push", images["busybox"].ref, fault_proxy.ref(unique("interrupted"), "1")],
        env=ctx.env,
        cwd=ctx.home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not [r for r in fault_proxy.requests if r.fault] and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "ocibox: interrupted"
    assert "Traceback" not in err


# --- rootless ----------------------------------------------------------------------------------------


def test_an_unprivileged_user_pushes_and_pulls_back(ocibox_user, images, registry):
    image = images["busybox"]
    ocibox_user("pull", "-q", image.ref)
    dest = registry.ref(unique("user"), "1")

    result = ocibox_user("push", image.ref, dest)

    assert pushed_digest(result) == image.digest
    assert remote_manifest(dest)[0] == image.digest
    built = registry.ref(unique("user-built"), "1")
    out = ocibox_user("build", "--from-binary", "/bin/busybox", "--tag", built, "--push", "-q")
    assert remote_manifest(built)[0] == out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_python_image_round_trips(ocibox, images, registry):
    image = images["python"]
    ocibox("pull", "-q", image.ref)
    dest = registry.ref(unique("python"), "1")

    ocibox("push", image.ref, dest)

    assert remote_manifest(dest)[0] == image.digest
