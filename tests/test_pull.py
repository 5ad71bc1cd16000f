"""`ocibox pull`: a user pulls an image from a registry and finds it in the store.

Against the real docker-registry fixture; faults come from the fault-injecting proxy in front of
it (tests/support/proxy.py). A few registry behaviours docker-registry never shows (redirects to
blob storage, schema 1, a lying Docker-Content-Digest) are served by a tiny HTTP server here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pty
import subprocess
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REF_NAME = "org.opencontainers.image.ref.name"


# --- helpers -----------------------------------------------------------------------------------


def index_json(root: Path) -> dict:
    return json.loads((root / "index.json").read_text())


def tagged(root: Path, name: str) -> dict:
    found = [d for d in index_json(root)["manifests"] if d.get("annotations", {}).get(REF_NAME) == name]
    assert len(found) == 1, index_json(root)
    return found[0]


def blob(root: Path, digest: str) -> bytes:
    return (root / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def has_blob(root: Path, digest: str) -> bool:
    return (root / "blobs" / "sha256" / digest.split(":", 1)[1]).exists()


def leftovers(root: Path) -> list[str]:
    """Files in the store's tmp/ other than the per-blob lock files."""
    tmp = root / "tmp"
    return sorted(p.name for p in tmp.iterdir() if not p.name.endswith(".lock")) if tmp.exists() else []


def assert_complete(root: Path, name: str, manifest_digest: str) -> None:
    """The tag names the manifest and every blob it needs is in the store with its digest."""
    entry = tagged(root, name)
    assert entry["digest"] == manifest_digest
    manifest = json.loads(blob(root, manifest_digest))
    for desc in [manifest["config"], *manifest["layers"]]:
        data = blob(root, desc["digest"])
        assert len(data) == desc["size"]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"]
    assert leftovers(root) == []


def assert_one_error(result, *fragments: str) -> None:
    assert result.returncode == 125, result
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("ocibox: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


# --- pulling the test images -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["busybox", "busybox-v2s2", "busybox-zstd", "busybox-uncompressed"])
def test_pull_stores_the_image_as_pushed(ocibox, images, oci_schema, name):
    image = images[name]
    result = ocibox("pull", image.ref)
    assert result.stdout == image.ref + "\n"
    assert "Pull complete" in result.stderr
    assert f"Digest: {image.digest}" in result.stderr
    root = ocibox.root
    assert_complete(root, image.ref, image.digest)
    entry = tagged(root, image.ref)
    assert entry["mediaType"] == image.media_type
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    oci_schema.validate(index_json(root), "index")
    oci_schema.validate(json.loads((root / "oci-layout").read_text()), "layout")
    oci_schema.validate(json.loads(blob(root, image.digest)), "manifest")
    oci_schema.validate(json.loads(blob(root, image.config_digest)), "config")
    assert [layer.digest for layer in image.layers] == [
        d["digest"] for d in json.loads(blob(root, image.digest))["layers"]
    ]


def test_skopeo_and_umoci_read_the_store(ocibox, images):
    image = images["busybox"]
    ocibox("pull", "-q", image.ref)
    root = ocibox.root
    inspect = subprocess.run(
        ["skopeo", "inspect", f"oci:{root}:{image.ref}"], capture_output=True, text=True, check=True
    )
    doc = json.loads(inspect.stdout)
    assert doc["Digest"] == image.digest
    assert doc["Layers"] == [layer.digest for layer in image.layers]
    listed = subprocess.run(
        ["umoci", "ls", "--layout", str(root)], capture_output=True, text=True, check=True
    )
    assert image.ref in listed.stdout.split()
    # skopeo re-hashes every blob it copies out of the layout.
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci:{root}:{image.ref}", f"dir:{ocibox.home / 'copy'}"], check=True
    )


@pytest.mark.parametrize("name", ["multiarch", "multiarch-v2s2"])
def test_pull_of_an_index_takes_the_host_platform_and_keeps_the_index(ocibox, images, oci_schema, name):
    image = images[name]
    ocibox("pull", "-q", image.ref)
    root = ocibox.root
    amd64 = image.manifests["linux/amd64"]
    assert_complete(root, image.ref, amd64.digest)
    entry = tagged(root, image.ref)
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    assert entry["mediaType"] == amd64.media_type
    index = json.loads(blob(root, image.digest))  # the index itself, for `save`
    oci_schema.validate(index, "index")
    oci_schema.validate(json.loads(blob(root, amd64.digest)), "manifest")
    oci_schema.validate(json.loads(blob(root, amd64.config_digest)), "config")
    assert not has_blob(root, image.manifests["linux/arm64/v8"].config_digest)


@pytest.mark.parametrize("platform", ["linux/arm64", "linux/arm64/v8", "arm64"])
def test_platform_flag_picks_the_arm64_manifest(ocibox, images, platform):
    image = images["multiarch"]
    ocibox("pull", "-q", "--platform", platform, image.ref)
    arm64 = image.manifests["linux/arm64/v8"]
    assert_complete(ocibox.root, image.ref, arm64.digest)
    assert tagged(ocibox.root, image.ref)["platform"]["architecture"] == "arm64"


def test_a_platform_the_index_lacks_is_one_clear_error(ocibox, images):
    result = ocibox("pull", "--platform", "linux/s390x", images["multiarch"].ref, check=False)
    assert_one_error(result, "no image for platform linux/s390x", "linux/amd64", "linux/arm64")


def test_a_single_platform_image_for_another_platform_is_refused_when_asked(ocibox, images):
    result = ocibox("pull", "--platform", "linux/arm64", images["busybox"].ref, check=False)
    assert_one_error(result, "linux/amd64", "does not match")


def test_pull_by_digest(ocibox, images):
    image = images["busybox"]
    result = ocibox("pull", "-q", image.ref_by_digest)
    assert result.stdout.strip() == image.ref_by_digest
    assert_complete(ocibox.root, image.ref_by_digest, image.digest)


def test_pull_by_digest_of_an_index(ocibox, images):
    image = images["multiarch"]
    ocibox("pull", "-q", image.ref_by_digest)
    assert_complete(ocibox.root, image.ref_by_digest, image.manifests["linux/amd64"].digest)


def test_quiet_pull_prints_only_the_name(ocibox, images):
    result = ocibox("pull", "-q", images["busybox"].ref)
    assert result.stdout == images["busybox"].ref + "\n"
    assert result.stderr == ""


def test_progress_on_a_terminal_draws_one_bar_per_layer(ocibox, images):
    image = images["busybox-uncompressed"]
    ctx = ocibox.context()
    main, secondary = pty.openpty()
    proc = subprocess.Popen(
        [*ctx.command, "pull", image.ref], env=ctx.env, stdout=subprocess.PIPE, stderr=secondary, cwd=ctx.home
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=60) == 0
    os.close(main)
    screen = b"".join(chunks).decode()
    assert "\x1b[" in screen  # lines redrawn in place
    for layer in image.layers:
        assert f"{layer.digest[7:19]}: Pull complete" in screen
    assert "Downloading [" in screen or "Pull complete" in screen


# --- what is already there is not fetched again --------------------------------------------------


def test_blobs_in_the_store_are_never_downloaded_again(ocibox, images, fault_proxy):
    images["busybox"], images["busybox-v2s2"]  # both pushed to the registry behind the proxy
    ocibox("pull", "-q", fault_proxy.ref("busybox"))
    first = len(fault_proxy.blob_gets())
    assert first == 1 + len(images["busybox"].layers)
    fault_proxy.reset()
    again = ocibox("pull", fault_proxy.ref("busybox"))
    assert "Image is up to date" in again.stderr
    ocibox("pull", "-q", fault_proxy.ref("busybox-v2s2"))  # same config and layers, other manifest
    assert fault_proxy.blob_gets() == []


def test_two_pulls_at_once_share_layers_and_store_each_blob_once(ocibox, images, fault_proxy):
    images["busybox"], images["busybox-v2s2"], images["busybox-zstd"]
    refs = [fault_proxy.ref(n) for n in ("busybox", "busybox-v2s2", "busybox-zstd")] * 2
    results = [None] * len(refs)

    def run(i: int) -> None:
        results[i] = ocibox("pull", "-q", refs[i], check=False)

    ocibox.context()  # made once, before the threads share it
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(refs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in results] == [0] * len(refs), [r.stderr for r in results]
    gets = [r.path.rsplit("/", 1)[1] for r in fault_proxy.blob_gets()]
    assert len(gets) == len(set(gets)), gets  # each blob fetched by one process only
    for name in ("busybox", "busybox-v2s2", "busybox-zstd"):
        assert_complete(ocibox.root, fault_proxy.ref(name), images[name].digest)


# --- faults: one clear line, exit 125, nothing half-written, the next pull completes --------------


def test_a_corrupt_blob_is_refused_and_the_next_pull_completes(ocibox, images, fault_proxy):
    image = images["busybox"]
    layer = image.layers[0].digest
    fault_proxy.corrupt_blob(layer)
    result = ocibox("pull", fault_proxy.ref("busybox"), check=False)
    assert_one_error(result, layer, "does not match its digest")
    assert not has_blob(ocibox.root, layer)
    assert leftovers(ocibox.root) == []
    assert fault_proxy.ref("busybox") not in json.dumps(index_json(ocibox.root))
    ocibox("pull", "-q", fault_proxy.ref("busybox"))
    assert_complete(ocibox.root, fault_proxy.ref("busybox"), image.digest)


def test_a_connection_cut_mid_blob_resumes_with_range(ocibox, images, fault_proxy):
    image = images["busybox"]
    layer = max(image.layers, key=lambda layer: layer.size)
    fault_proxy.cut_blob(layer.digest, after=300_000)
    ocibox("pull", "-q", fault_proxy.ref("busybox"))
    gets = fault_proxy.blob_gets(layer.digest)
    assert [g.fault for g in gets] == ["cut", ""]
    assert gets[1].range == "bytes=300000-" and gets[1].status == 206
    assert_complete(ocibox.root, fault_proxy.ref("busybox"), image.digest)


def test_a_cut_download_starts_over_when_the_server_ignores_range(ocibox, images, fault_proxy):
    image = images["busybox"]
    layer = max(image.layers, key=lambda layer: layer.size)
    fault_proxy.refuse_range()
    fault_proxy.cut_blob(layer.digest, after=300_000)
    ocibox("pull", "-q", fault_proxy.ref("busybox"))
    gets = fault_proxy.blob_gets(layer.digest)
    assert [g.status for g in gets] == [200, 200]
    assert_complete(ocibox.root, fault_proxy.ref("busybox"), image.digest)


def test_a_network_that_keeps_cutting_is_one_clear_error(ocibox, images, fault_proxy):
    image = images["busybox"]
    layer = max(image.layers, key=lambda layer: layer.size)
    fault_proxy.refuse_range()
    fault_proxy.cut_blob(layer.digest, after=1000, times=None)
    result = ocibox("pull", fault_proxy.ref("busybox"), check=False)
    assert_one_error(result, layer.digest, "connection dropped")
    assert not has_blob(ocibox.root, layer.digest)
    assert leftovers(ocibox.root) == []
    fault_proxy.reset()
    ocibox("pull", "-q", fault_proxy.ref("busybox"))
    assert_complete(ocibox.root, fault_proxy.ref("busybox"), image.digest)


def test_server_errors_are_retried(ocibox, images, fault_proxy):
    image = images["busybox"]
    fault_proxy.fail(503, times=2, path="/blobs/")
    fault_proxy.fail(502, times=1, path="/manifests/")
    ocibox("pull", "-q", fault_proxy.ref("busybox"))
    assert_complete(ocibox.root, fault_proxy.ref("busybox"), image.digest)
    assert [r.status for r in fault_proxy.requests if r.fault == "fail"] == [502, 503, 503]


def test_too_many_requests_waits_as_retry_after_says(ocibox, images, fault_proxy):
    image = images["busybox"]
    fault_proxy.fail(429, times=1, path="/manifests/", retry_after=1)
    ocibox("pull", "-q", fault_proxy.ref("busybox"))
    assert_complete(ocibox.root, fault_proxy.ref("busybox"), image.digest)
    statuses = [r.status for r in fault_proxy.requests if "/manifests/" in r.path]
    assert statuses[:2] == [429, 200]


def test_a_registry_that_keeps_failing_is_one_clear_error(ocibox, images, fault_proxy):
    images["busybox"]
    fault_proxy.fail(500, times=None, path="/blobs/")
    result = ocibox("pull", fault_proxy.ref("busybox"), check=False)
    assert_one_error(result, "registry answered 500")
    assert leftovers(ocibox.root) == []
    assert list((ocibox.root / "blobs" / "sha256").iterdir()) == []


def test_a_registry_that_is_down_is_one_clear_error(ocibox, images, fault_proxy):
    images["busybox"]
    ref = fault_proxy.ref("busybox")
    fault_proxy.stop()
    result = ocibox("pull", ref, check=False)
    assert_one_error(result, f"can't reach registry {fault_proxy.host}", "connection refused")


def test_an_unknown_image_or_tag_is_one_clear_error(ocibox, images, registry):
    images["busybox"]
    missing_repo = ocibox("pull", registry.ref("no-such-image"), check=False)
    assert_one_error(missing_repo, f"{registry.host}/no-such-image:latest", "not found")
    missing_tag = ocibox("pull", registry.ref("busybox", "no-such-tag"), check=False)
    assert_one_error(missing_tag, f"{registry.host}/busybox:no-such-tag", "not found")
    bad = ocibox("pull", "UPPER/case", check=False)
    assert_one_error(bad, "lowercase")


@contextmanager
def small_filesystem(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_one_clear_error_and_the_next_pull_completes(ocibox, images, tmp_path):
    image = images["busybox-uncompressed"]  # a 2 MB layer
    with small_filesystem(tmp_path / "small", "1m") as root:
        env = {"OCIBOX_ROOT": root}
        result = ocibox("pull", image.ref, env=env, check=False)
        assert_one_error(result, "no space left on device")
        assert leftovers(root) == []
        assert not has_blob(root, image.layers[0].digest)
        subprocess.run(["mount", "-o", "remount,size=16m", str(root)], check=True)
        ocibox("pull", "-q", image.ref, env=env)
        assert_complete(root, image.ref, image.digest)


def test_an_unprivileged_user_pulls_into_their_own_store(ocibox_user, images):
    image = images["busybox"]
    result = ocibox_user("pull", "-q", image.ref)
    assert result.stdout.strip() == image.ref
    root = ocibox_user.root
    assert_complete(root, image.ref, image.digest)
    assert root.stat().st_uid != 0


@pytest.mark.slow
def test_pull_of_the_python_image_matches_skopeo(ocibox, images, oci_schema):
    image = images["python"]
    ocibox("pull", "-q", image.ref)
    root = ocibox.root
    assert_complete(root, image.ref, image.digest)
    assert len(image.layers) == 4
    oci_schema.validate(json.loads(blob(root, image.config_digest)), "config")
    inspect = subprocess.run(
        ["skopeo", "inspect", "--config", f"oci:{root}:{image.ref}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(inspect.stdout)["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]


@pytest.mark.slow
def test_debian_and_python_pulled_at_once_share_their_base_layers(ocibox, images, fault_proxy):
    images["debian"], images["python"]
    refs = [fault_proxy.ref("debian"), fault_proxy.ref("python")]
    results = {}
    ocibox.context()
    threads = [
        threading.Thread(target=lambda r=r: results.setdefault(r, ocibox("pull", "-q", r))) for r in refs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == set(refs)
    gets = [r.path.rsplit("/", 1)[1] for r in fault_proxy.blob_gets()]
    assert len(gets) == len(set(gets))
    for name in ("debian", "python"):
        assert_complete(ocibox.root, fault_proxy.ref(name), images[name].digest)


# --- registry behaviours docker-registry does not show: a tiny registry of our own ---------------

SCHEMA1 = json.dumps(
    {
        "schemaVersion": 1,
        "name": "old",
        "tag": "latest",
        "architecture": "amd64",
        "fsLayers": [],
        "history": [],
    }
).encode()


class TinyRegistry:
    """A minimal registry on 127.0.0.1 answering a fixed set of paths; records the requests.

    `routes[path] = (status, headers, body)`; a `(… , "basic")` route needs `user:pass` basic auth.
    """

    def __init__(self):
        self.routes: dict[str, tuple[int, dict, bytes]] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.require_auth: set[str] = set()
        tiny = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                tiny.requests.append(("GET", self.path, dict(self.headers)))
                expected = "Basic " + base64.b64encode(b"user:pass").decode()
                if self.path in tiny.require_auth and self.headers.get("Authorization") != expected:
                    status, headers, body = 401, {"WWW-Authenticate": 'Basic realm="tiny"'}, b"{}"
                else:
                    status, headers, body = tiny.routes.get(self.path, (404, {}, b'{"errors":[]}'))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.routes["/v2/"] = (200, {}, b"{}")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tiny_registries():
    made: list[TinyRegistry] = []

    def make() -> TinyRegistry:
        made.append(TinyRegistry())
        return made[-1]

    yield make
    for tiny in made:
        tiny.stop()


def test_schema1_images_are_refused_with_a_clear_message(ocibox, tiny_registries):
    tiny = tiny_registries()
    schema1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    tiny.routes["/v2/old/manifests/latest"] = (200, {"Content-Type": schema1}, SCHEMA1)
    result = ocibox("pull", f"{tiny.host}/old", check=False)
    assert_one_error(result, "schema 1")


def test_a_manifest_that_does_not_match_its_digest_is_refused(ocibox, images, tiny_registries):
    image = images["busybox"]
    tiny = tiny_registries()
    raw = image.manifest.raw
    wrong = "sha256:" + "0" * 64
    headers = {"Content-Type": image.media_type, "Docker-Content-Digest": wrong}
    tiny.routes["/v2/busybox/manifests/latest"] = (200, headers, raw)
    result = ocibox("pull", f"{tiny.host}/busybox", check=False)
    assert_one_error(result, "does not match its digest", wrong)
    tiny.routes[f"/v2/busybox/manifests/{wrong}"] = (200, {"Content-Type": image.media_type}, raw)
    by_digest = ocibox("pull", f"{tiny.host}/busybox@{wrong}", check=False)
    assert_one_error(by_digest, "does not match its digest")


def test_blob_redirects_are_followed_without_sending_credentials_elsewhere(
    ocibox, images, registry, tiny_registries
):
    image = images["busybox"]
    reg, storage = tiny_registries(), tiny_registries()
    raw = image.manifest.raw
    reg.routes["/v2/app/manifests/latest"] = (200, {"Content-Type": image.media_type}, raw)
    reg.require_auth.add("/v2/app/manifests/latest")
    for digest in [image.config_digest, *(layer.digest for layer in image.layers)]:
        path = f"/v2/app/blobs/{digest}"
        reg.routes[path] = (307, {"Location": f"http://{storage.host}/storage/{digest}"}, b"")
        reg.require_auth.add(path)
        status, _, data = registry.request(f"/v2/{image.repository}/blobs/{digest}")
        assert status == 200
        storage.routes[f"/storage/{digest}"] = (200, {"Content-Type": "application/octet-stream"}, data)
    auth = base64.b64encode(b"user:pass").decode()
    config = ocibox.home / ".docker" / "config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
    ocibox("pull", "-q", f"{reg.host}/app")
    assert_complete(ocibox.root, f"{reg.host}/app:latest", image.digest)
    assert any("Authorization" in headers for _, path, headers in reg.requests if "/blobs/" in path)
    assert storage.requests and all("Authorization" not in headers for _, _, headers in storage.requests)


def test_an_artifact_that_is_not_an_image_is_refused_before_any_download(ocibox, tiny_registries):
    tiny = tiny_registries()
    chart = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.cncf.helm.config.v1+json",
            "digest": "sha256:" + "1" * 64,
            "size": 2,
        },
        "layers": [],
    }
    oci = "application/vnd.oci.image.manifest.v1+json"
    tiny.routes["/v2/chart/manifests/1.0"] = (200, {"Content-Type": oci}, json.dumps(chart).encode())
    result = ocibox("pull", f"{tiny.host}/chart:1.0", check=False)
    assert_one_error(result, "is not a container image", "application/vnd.cncf.helm.config.v1+json")
    assert not any("/blobs/" in path for _, path, _ in tiny.requests)


def test_ctrl_c_during_a_pull_stops_it_cleanly(ocibox, images, fault_proxy):
    import signal
    import time

    images["busybox"]
    fault_proxy.fail(503, times=None, path="/blobs/")  # the pull waits between retries
    ctx = ocibox.context()
    proc = subprocess.Popen(
        [*ctx.command, "pull", fault_proxy.ref("busybox")],
        env=ctx.env,
        cwd=ctx.home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not fault_proxy.blob_gets() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "ocibox: interrupted"
    assert leftovers(ocibox.root) == []
    assert list((ocibox.root / "blobs" / "sha256").iterdir()) == []
