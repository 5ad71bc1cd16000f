"""The test fixtures themselves: real registries, real images, the CLI runner, the fault proxy."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest

from support.layout import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_LAYER, OCI_LAYER_ZSTD, OCI_MANIFEST
from support.registry import fetch_token, http


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
