"""The test fixtures themselves: real registries, real images, the CLI runner, the fault proxy."""

from __future__ import annotations

import gzip
import hashlib
import http.client as http_client
import io
import json
import subprocess
import sys
import tarfile
import urllib.request

import jsonschema
import pytest
import zstandard

from support.layout import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_LAYER, OCI_LAYER_ZSTD, OCI_MANIFEST
from support.registry import fetch_token, http
from support.users import REPO, CommandFailed, user_ids


def skopeo_inspect(ref: str, *flags: str) -> dict:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", *flags, f"docker://{ref}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def test_a_registry_listens_on_localhost(registry):
    assert registry.host.startswith("127.0.0.1:")
    with urllib.request.urlopen(registry.url + "/v2/") as resp:
        assert resp.status == 200
        assert resp.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


def test_busybox_is_a_two_layer_oci_image(images):
    img = images["busybox"]
    assert img.media_type == OCI_MANIFEST
    assert img.platforms == ["linux/amd64"]
    assert len(img.layers) == 2
    assert img.config["config"]["Cmd"] == ["sh"]
    info = skopeo_inspect(img.ref)
    assert info["Digest"] == img.digest
    assert info["Layers"] == [layer.digest for layer in img.layers]


@pytest.mark.parametrize(
    ("name", "media_type", "layer_type"),
    [
        ("busybox-v2s2", DOCKER_MANIFEST, "application/vnd.docker.image.rootfs.diff.tar.gzip"),
        ("busybox-zstd", OCI_MANIFEST, OCI_LAYER_ZSTD),
        ("busybox-uncompressed", OCI_MANIFEST, OCI_LAYER),
    ],
)
def test_busybox_variants_have_their_media_types(images, name, media_type, layer_type):
    img = images[name]
    assert img.media_type == media_type
    assert {layer.media_type for layer in img.layers} == {layer_type}
    raw = skopeo_inspect(img.ref, "--raw")
    assert raw["mediaType"] == media_type


def test_same_busybox_content_in_every_variant(images):
    diff_ids = {
        name: [la.diff_id for la in images[name].layers]
        for name in ("busybox", "busybox-v2s2", "busybox-zstd", "busybox-uncompressed")
    }
    assert len({tuple(v) for v in diff_ids.values()}) == 1


def test_uncompressed_layers_are_their_own_diff_ids(images):
    for layer in images["busybox-uncompressed"].layers:
        assert layer.digest == layer.diff_id


@pytest.mark.parametrize(("name", "media_type"), [("multiarch", OCI_INDEX), ("multiarch-v2s2", DOCKER_LIST)])
def test_multiarch_lists_amd64_and_arm64(images, name, media_type):
    img = images[name]
    assert img.is_index
    assert img.media_type == media_type
    assert img.platforms == ["linux/amd64", "linux/arm64/v8"]
    arm = img.manifests["linux/arm64/v8"]
    assert arm.config["architecture"] == "arm64"
    raw = skopeo_inspect(img.ref, "--raw")
    assert [m["digest"] for m in raw["manifests"]] == [m.digest for m in img.manifests.values()]


@pytest.mark.parametrize("name", ["busybox", "busybox-zstd", "busybox-uncompressed", "multiarch"])
def test_busybox_layers_list_each_path_once(images, registry, name):
    for manifest in images[name].manifests.values():
        for layer in manifest.layers:
            status, _, body = registry.request(f"/v2/{images[name].repository}/blobs/{layer.digest}")
            assert status == 200
            if layer.media_type.endswith("+zstd"):
                body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                names = tar.getnames()
            assert len(names) == len(set(names))
            assert sha256(tarfile_bytes(body)) == layer.diff_id


def tarfile_bytes(body: bytes) -> bytes:
    """The uncompressed tar stream of a layer (gzip detected by its magic)."""
    return gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body


def test_busybox_layers_are_deterministic(busybox_layouts, tmp_path):
    from support.busybox import build_busybox_layouts

    again = build_busybox_layouts(tmp_path)
    for name, path in busybox_layouts.items():
        assert (again[name] / "index.json").read_bytes() == (path / "index.json").read_bytes()


def test_auth_registry_refuses_anonymous_and_accepts_credentials(auth_registry):
    status, headers, _ = auth_registry.request("/v2/", auth=False)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Basic ")
    status, _, _ = auth_registry.request("/v2/")
    assert status == 200
    info = skopeo_inspect(auth_registry.seeded["busybox"], "--creds", auth_registry.creds)
    assert len(info["Layers"]) == 2
    bad = subprocess.run(
        [
            "skopeo",
            "inspect",
            "--tls-verify=false",
            "--creds",
            "ocibox:wrong",
            f"docker://{auth_registry.seeded['busybox']}",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0


def test_token_registry_gives_anonymous_pull_on_public_only(token_registry):
    status, headers, _ = http(f"{token_registry.url}/v2/public/busybox/manifests/latest")
    assert status == 401
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and token_registry.token_server.realm in challenge
    token = fetch_token(challenge)
    accept = {"Accept": OCI_MANIFEST}
    status, _, _ = http(
        f"{token_registry.url}/v2/public/busybox/manifests/latest",
        headers={"Authorization": f"Bearer {token}", **accept},
    )
    assert status == 200

    status, headers, _ = http(f"{token_registry.url}/v2/private/busybox/manifests/latest", headers=accept)
    anonymous = fetch_token(headers["WWW-Authenticate"])
    status, _, _ = http(
        f"{token_registry.url}/v2/private/busybox/manifests/latest",
        headers={"Authorization": f"Bearer {anonymous}", **accept},
    )
    assert status == 401
    user = fetch_token(headers["WWW-Authenticate"], token_registry.username, token_registry.password)
    status, _, _ = http(
        f"{token_registry.url}/v2/private/busybox/manifests/latest",
        headers={"Authorization": f"Bearer {user}", **accept},
    )
    assert status == 200


def test_token_server_refuses_wrong_password(token_registry):
    _, headers, _ = http(f"{token_registry.url}/v2/private/busybox/manifests/latest")
    with pytest.raises(RuntimeError, match="401"):
        fetch_token(headers["WWW-Authenticate"], token_registry.username, "wrong")
    assert token_registry.token_server.requests[-1].status == 401


def test_skopeo_pulls_through_token_auth(token_registry, tmp_path):
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            "--src-tls-verify=false",
            f"docker://{token_registry.seeded['public/busybox']}",
            f"oci:{tmp_path}/out:latest",
        ],
        check=True,
    )
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            "--src-tls-verify=false",
            "--src-creds",
            token_registry.creds,
            f"docker://{token_registry.seeded['private/busybox']}",
            f"oci:{tmp_path}/out:private",
        ],
        check=True,
    )
    assert "private" in (tmp_path / "out" / "index.json").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["debian", "python"])
def test_debian_images_are_cached_and_pushed(images, name):
    img = images[name]
    assert img.media_type == OCI_MANIFEST
    assert len(img.layers) == {"debian": 2, "python": 4}[name]
    assert {layer.media_type for layer in img.layers} == {"application/vnd.oci.image.layer.v1.tar+gzip"}
    assert img.facts["deleted"] == ["/etc/issue.net", "/usr/share/doc/base-files"]
    assert img.layers[:2] == images["debian"].layers[:2]
    assert skopeo_inspect(img.ref)["Digest"] == img.digest


@pytest.mark.slow
def test_the_whiteout_layer_deletes_a_file_and_a_folder(images, registry):
    layer = images["debian"].layers[1]
    status, _, body = registry.request(f"/v2/debian/blobs/{layer.digest}")
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = tar.getnames()
    assert "etc/.wh.issue.net" in names
    assert "usr/share/doc/.wh.base-files" in names
    assert "etc/ocibox-test-image" in names


def test_ocibox_runs_as_root_with_a_private_store(ocibox):
    result = ocibox("--version")
    assert result.stdout.startswith("ocibox ")
    assert ocibox.env["OCIBOX_ROOT"] == str(ocibox.root)
    assert ocibox.env["HOME"] == str(ocibox.home)
    assert "OCIBOX_INSECURE_REGISTRIES" not in ocibox.env
    assert ocibox.root.is_dir()


def test_ocibox_check_shows_the_output_of_a_failed_command(ocibox):
    with pytest.raises(CommandFailed, match="no-such-command"):
        ocibox("no-such-command")
    assert ocibox("no-such-command", check=False).returncode != 0


@pytest.mark.rootless
def test_ocibox_runs_as_the_test_user(ocibox, ocibox_user, as_user):
    uid, _ = user_ids()
    assert ocibox_user("--version").stdout.startswith("ocibox ")
    assert ocibox("--version", user="ocibox-test").stdout.startswith("ocibox ")
    assert ocibox_user.root.stat().st_uid == uid
    assert ocibox_user.home.stat().st_uid == uid
    assert ocibox_user.root != ocibox.root
    env = dict(ocibox_user.env)
    who = as_user(["sh", "-c", 'id -u; echo "$HOME"; test -w "$OCIBOX_ROOT" && echo writable'], env=env)
    assert who.stdout.split() == [str(uid), str(ocibox_user.home), "writable"]
    code = as_user(["/usr/bin/python3", "-c", "import ocibox; print(ocibox.__file__)"], env=env)
    assert code.stdout.startswith(env["PYTHONPATH"])


def blob_url(proxy, img, index: int = 0) -> str:
    return f"{proxy.url}/v2/{img.repository}/blobs/{img.layers[index].digest}"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_the_proxy_passes_requests_through(fault_proxy, images):
    img = images["busybox"]
    status, _, body = http(blob_url(fault_proxy, img))
    assert status == 200 and sha256(body) == img.layers[0].digest
    assert fault_proxy.blob_gets(img.layers[0].digest)[0].fault == ""


def test_the_proxy_corrupts_a_blob_once(fault_proxy, images):
    img = images["busybox"]
    fault_proxy.corrupt_blob(img.layers[0].digest)
    status, _, body = http(blob_url(fault_proxy, img))
    assert status == 200
    assert len(body) == img.layers[0].size and sha256(body) != img.layers[0].digest
    _, _, body = http(blob_url(fault_proxy, img))
    assert sha256(body) == img.layers[0].digest


def test_the_proxy_cuts_a_blob_mid_way(fault_proxy, images):
    img = images["busybox"]
    fault_proxy.cut_blob(after=1000)
    with pytest.raises(http_client.IncompleteRead) as cut:
        urllib.request.urlopen(blob_url(fault_proxy, img)).read()
    assert len(cut.value.partial) == 1000
    assert fault_proxy.blob_gets()[-1].fault == "cut"


def test_the_proxy_answers_429_with_retry_after_then_recovers(fault_proxy, images):
    img = images["busybox"]
    fault_proxy.fail(429, times=2, retry_after=1)
    for _ in range(2):
        status, headers, _ = http(blob_url(fault_proxy, img))
        assert status == 429 and headers["Retry-After"] == "1"
    status, _, _ = http(blob_url(fault_proxy, img))
    assert status == 200


def test_the_proxy_fails_manifests_with_500(fault_proxy, images):
    img = images["busybox"]
    fault_proxy.fail(500, times=None, path="/manifests/")
    status, _, _ = http(f"{fault_proxy.url}/v2/{img.repository}/manifests/latest")
    assert status == 500
    assert http(blob_url(fault_proxy, img))[0] == 200


def test_the_proxy_can_refuse_range_requests(fault_proxy, images):
    img = images["busybox"]
    status, headers, body = http(blob_url(fault_proxy, img), headers={"Range": "bytes=10-19"})
    assert status == 206 and len(body) == 10
    fault_proxy.refuse_range()
    status, headers, body = http(blob_url(fault_proxy, img), headers={"Range": "bytes=10-19"})
    assert status == 200 and len(body) == img.layers[0].size
    assert "Accept-Ranges" not in headers


def test_skopeo_notices_a_corrupt_blob_from_the_proxy(fault_proxy, images, tmp_path):
    img = images["busybox"]
    fault_proxy.corrupt_blob(img.layers[0].digest)
    cmd = ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{fault_proxy.ref(img.repository)}"]
    bad = subprocess.run([*cmd, f"oci:{tmp_path}/bad:latest"], capture_output=True, text=True)
    assert bad.returncode != 0 and "digest" in bad.stderr.lower()
    subprocess.run([*cmd, f"oci:{tmp_path}/good:latest"], check=True)


def test_pushes_go_through_the_proxy(fault_proxy, busybox_layouts, registry):
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            "--dest-tls-verify=false",
            f"oci:{busybox_layouts['busybox']}:latest",
            f"docker://{fault_proxy.ref('through-proxy')}",
        ],
        check=True,
    )
    assert registry.request("/v2/through-proxy/manifests/latest", method="HEAD")[0] == 200


def test_skopeo_written_documents_match_the_oci_schemas(oci_schema, images, tmp_path):
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            "--all",
            "--src-tls-verify=false",
            f"docker://{images['multiarch']}",
            f"oci:{tmp_path}/out:latest",
        ],
        check=True,
    )
    layout = tmp_path / "out"
    index = json.loads((layout / "index.json").read_text())
    oci_schema.validate(index, "index")
    oci_schema.validate(json.loads((layout / "oci-layout").read_text()), "layout")
    oci_schema.validate(index["manifests"][0], "descriptor")
    blobs = layout / "blobs" / "sha256"
    top = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_text())
    oci_schema.validate(top, "index")
    manifest = json.loads((blobs / top["manifests"][1]["digest"].split(":")[1]).read_text())
    oci_schema.validate(manifest, "manifest")
    oci_schema.validate(
        json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text()), "config"
    )


def test_the_schemas_reject_a_broken_manifest(oci_schema, images):
    manifest = json.loads(images["busybox"].manifest.raw)
    oci_schema.validate(manifest, "manifest")
    manifest["config"]["digest"] = "not a digest"
    with pytest.raises(jsonschema.ValidationError):
        oci_schema.validate(manifest, "manifest")
    del manifest["layers"]
    with pytest.raises(jsonschema.ValidationError):
        oci_schema.validate(manifest, "manifest")


def test_runc_spec_matches_the_runtime_schema(oci_schema, tmp_path):
    subprocess.run(["runc", "spec", "--rootless"], cwd=tmp_path, check=True)
    config = json.loads((tmp_path / "config.json").read_text())
    oci_schema.validate(config, "runtime-config")
    config["process"]["args"] = "not a list"
    with pytest.raises(jsonschema.ValidationError):
        oci_schema.validate(config, "runtime-config")


def test_the_demo_pulls_and_shows_the_busybox_image():
    demo = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py")], capture_output=True, text=True, timeout=300
    )
    assert demo.returncode == 0, demo.stderr
    assert "$ ocibox pull 127.0.0.1:" in demo.stdout
    assert "demo/busybox" in demo.stdout
    assert "demo finished: registry stopped" in demo.stdout
