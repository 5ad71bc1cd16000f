"""Fixtures for ocibox's tests: real registries, real images, the CLI run as root or as a user.

Everything runs on this machine, offline: Debian's docker-registry on 127.0.0.1 (free ports),
images built from Debian packages and pushed with skopeo. The code lives in tests/support/.

Session fixtures
----------------
registry          an open docker-registry. `.host` "127.0.0.1:PORT", `.url` "http://127.0.0.1:PORT",
                  `.ref(repo, tag="latest")`, `.request(path, method, headers, data)` ->
                  (status, headers, body), `.storage` (its filesystem storage folder), `.stop()`.
auth_registry     the same behind htpasswd basic auth (bcrypt): `.username`, `.password`,
                  `.creds` ("user:pass"); `.seeded["busybox"]` is busybox pushed there.
token_registry    `auth: token`; realm served by `.token_server` (tests/support/tokens.py):
                  user/pass (`.username`, `.password`) may pull/push anything, anonymous may
                  pull `public/*` only. `.token_server.requests` records every token request;
                  `.token_server.expires_in` sets token lifetimes. Seeded with
                  `.seeded["public/busybox"]` and `.seeded["private/busybox"]`.
images            name -> TestImage on `registry`, pushed on first use. `str(img)` / `img.ref`
                  is "HOST/NAME:latest"; `img.ref_by_digest`, `img.digest` (of the tag's
                  manifest or index), `img.media_type`, `img.is_index`, `img.platforms`,
                  `img.manifests[platform]` (digest, media_type, config, config_digest, layers),
                  and for one-platform images `img.layers` / `img.config` / `img.config_digest`;
                  each layer has digest, size, media_type, diff_id. `img.facts` (debian, python):
                  layers, entries, files, file_bytes, compressed_size, deleted, added paths.
                  Names: busybox, busybox-v2s2, busybox-zstd, busybox-uncompressed, multiarch,
                  multiarch-v2s2, debian, python. Mark tests that use debian/python
                  `@pytest.mark.slow` (built once per machine in /var/cache/ocibox-tests:
                  about a minute cold, then a push of well under a second).
                  The registries are shared by the whole session: push your own repository
                  names, and never delete or overwrite the images above.
busybox_layouts   name -> Path of the busybox OCI layouts on disk (busybox, busybox-zstd,
                  busybox-uncompressed, multiarch), e.g. for `ocibox load` or skopeo.
oci_schema        `.validate(document, kind)`; kind is manifest, index, config, descriptor,
                  layout or runtime-config; raises jsonschema.ValidationError. Checks against
                  the schemas Debian ships (golang-github-opencontainers-{image-spec,specs}-dev).

Function fixtures
-----------------
ocibox            `ocibox(*args, user=None, env=None, input=None, check=True, timeout=120, cwd=None)`
                  -> CompletedProcess (text; stdout/stderr captured). A fresh store (OCIBOX_ROOT),
                  HOME and XDG_* per test and per user. As root: `sys.executable -m ocibox` with
                  the repo's src/. `user="ocibox-test"`: /usr/bin/python3 via setpriv as that
                  user, PYTHONPATH a world-readable copy of src/, OCIBOX_RUNTIME a copy of
                  runtime/ocibox-runtime (if built). `env={"K": "v", "DROP": None}` adds/removes
                  variables. `check=True` raises CommandFailed showing stdout and stderr.
                  `ocibox.root` (store), `ocibox.home`, `ocibox.env`; `ocibox.context(user)` the
                  same for another user.
ocibox_user       the same runner whose default user is ocibox-test (skips if that user is missing).
as_user           `as_user(cmd, user="ocibox-test", env=None, input=None, check=True, timeout=120,
                  cwd=None)`: run any command as the test user (also tests.support.users.as_user).
fault_proxy       an HTTP proxy in front of `registry` that injects faults; `.host`, `.url`,
                  `.ref(repo, tag)`, `.corrupt_blob()`, `.cut_blob()`, `.fail()`,
                  `.refuse_range()`, `.requests`, `.blob_gets()`, `.stop()` (registry gone);
                  see tests/support/proxy.py.

Plain helpers (import from `support.…`): registry.free_port() (a port nobody listens on: a
registry that is down), registry.start_registry(dir, auth=…), images.push_busybox(layouts,
registry, name, repository) to put a test image on any registry, users.as_user, schemas.validate.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from support import busybox as busybox_images
from support.images import TestImages, push_busybox
from support.proxy import FaultProxy
from support.registry import start_registry
from support.schemas import OciSchema
from support.tokens import TokenServer
from support.users import OciboxRunner, make_shared_code, user_exists
from support.users import as_user as run_as_user


@pytest.fixture(scope="session")
def test_workdir():
    """A session folder under /tmp that every user can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="ocibox-tests-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def registry(test_workdir):
    reg = start_registry(test_workdir / "registry")
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def busybox_layouts(test_workdir):
    return busybox_images.build_busybox_layouts(test_workdir / "layouts")


@pytest.fixture(scope="session")
def auth_registry(test_workdir, busybox_layouts):
    reg = start_registry(test_workdir / "auth-registry", auth="htpasswd")
    try:
        push_busybox(busybox_layouts, reg, "busybox", "busybox")
        reg.seeded["busybox"] = reg.ref("busybox")
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def token_registry(test_workdir, busybox_layouts):
    tokens = TokenServer(test_workdir / "token-server")
    reg = start_registry(test_workdir / "token-registry", auth="token", token_server=tokens)
    try:
        for repo in ("public/busybox", "private/busybox"):
            push_busybox(busybox_layouts, reg, "busybox", repo)
            reg.seeded[repo] = reg.ref(repo)
        tokens.requests.clear()
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def images(registry, test_workdir, busybox_layouts):
    return TestImages(registry, test_workdir / "images", busybox_layouts)


@pytest.fixture(scope="session")
def shared_code(test_workdir):
    return make_shared_code(test_workdir / "shared")


@pytest.fixture
def ocibox(test_workdir, shared_code, request):
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:40]
    base = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=test_workdir))
    os.chmod(base, 0o755)
    yield OciboxRunner(base, shared_code)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def ocibox_user(ocibox):
    if not user_exists():
        pytest.skip("the test user ocibox-test does not exist (run scripts/setup.sh)")
    return ocibox.for_user("ocibox-test")


@pytest.fixture
def as_user():
    if not user_exists():
        pytest.skip("the test user ocibox-test does not exist (run scripts/setup.sh)")
    return run_as_user


@pytest.fixture
def fault_proxy(registry):
    proxy = FaultProxy(registry.url)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def oci_schema():
    return OciSchema()
