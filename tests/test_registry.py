"""The registry client's parts: challenges, credential files and helpers, hosts, platforms, tokens.

Pure parts are table-driven; the token and transport behaviour is checked against the real
docker-registry fixtures (token_registry's token server records every token request).
"""

from __future__ import annotations

import base64
import json
import os
import stat
import textwrap
from pathlib import Path

import pytest

from ocibox.errors import AuthError, IntegrityError, RegistryError
from ocibox.image import Index, Platform, parse_manifest
from ocibox.registry import credentials
from ocibox.registry.auth import parse_challenges
from ocibox.registry.client import RegistryClient, Transport, insecure_hosts_from_env, is_loopback
from ocibox.registry.credentials import Credential

# --- WWW-Authenticate -------------------------------------------------------------------------

CHALLENGES = [
    (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"',
        [
            (
                "bearer",
                {
                    "realm": "https://auth.docker.io/token",
                    "service": "registry.docker.io",
                    "scope": "repository:library/alpine:pull",
                },
            )
        ],
    ),
    ('Basic realm="Registry Realm"', [("basic", {"realm": "Registry Realm"})]),
    ("Basic", [("basic", {})]),
    (
        'BEARER Realm="r", Error="insufficient_scope"',
        [("bearer", {"realm": "r", "error": "insufficient_scope"})],
    ),
    (
        'Bearer realm = "spaced" , service=token-value',
        [("bearer", {"realm": "spaced", "service": "token-value"})],
    ),
    (r'Bearer realm="with \"quote\" inside"', [("bearer", {"realm": 'with "quote" inside'})]),
    (
        'Basic realm="a, b", Bearer realm="https://t/token",scope="x:y:pull,push"',
        [("basic", {"realm": "a, b"}), ("bearer", {"realm": "https://t/token", "scope": "x:y:pull,push"})],
    ),
    ("Negotiate abc123==", [("negotiate", {"": "abc123=="})]),
    ("", []),
]


@pytest.mark.parametrize(("header", "expected"), CHALLENGES)
def test_challenge_headers_parse_like_rfc7235(header, expected):
    got = [(c.scheme, c.params) for c in parse_challenges([header])]
    assert got == expected


def test_challenges_from_several_header_lines_are_all_kept():
    got = parse_challenges(['Basic realm="x"', 'Bearer realm="y"'])
    assert [c.scheme for c in got] == ["basic", "bearer"]


# --- hosts: TLS unless loopback or named insecure ------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("127.0.0.1:5000", True),
        ("127.1.2.3", True),
        ("[::1]:5000", True),
        ("registry.local:5000", False),
        ("10.0.0.1:5000", False),
        ("docker.io", False),
        ("127.0.0.1.example.com", False),
    ],
)
def test_only_loopback_hosts_may_speak_plain_http_by_default(host, loopback):
    assert is_loopback(host) is loopback
    assert Transport().allows_plain_http(host) is loopback


def test_insecure_registries_come_from_the_environment():
    hosts = insecure_hosts_from_env({"OCIBOX_INSECURE_REGISTRIES": "reg.lan:5000, other.lan ,"})
    assert hosts == {"reg.lan:5000", "other.lan"}
    transport = Transport(hosts)
    assert transport.allows_plain_http("reg.lan:5000")
    assert transport.allows_plain_http("other.lan:443")
    assert not transport.allows_plain_http("reg.lan:6000")


def test_a_registry_that_does_not_answer_is_one_clear_error():
    client = RegistryClient("127.0.0.1:9", transport=Transport(timeout=5))
    with pytest.raises(RegistryError) as info:
        client.get_manifest("library/x", "latest")
    assert "can't reach registry 127.0.0.1:9: connection refused" in str(info.value)


# --- platform selection ------------------------------------------------------------------------


def _index(*platforms: dict) -> Index:
    manifests = [
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": "sha256:" + f"{i:x}".rjust(64, "0"),
            "size": 100 + i,
            "platform": p,
        }
        for i, p in enumerate(platforms, start=1)
    ]
    doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
    node = parse_manifest(json.dumps(doc).encode())
    assert isinstance(node, Index)
    return node


AMD64 = {"os": "linux", "architecture": "amd64"}
ARM64 = {"os": "linux", "architecture": "arm64"}
ARM64_V8 = {"os": "linux", "architecture": "arm64", "variant": "v8"}
ARM_V7 = {"os": "linux", "architecture": "arm", "variant": "v7"}
ARM_V6 = {"os": "linux", "architecture": "arm", "variant": "v6"}


@pytest.mark.parametrize(
    ("wanted", "offered", "chosen"),
    [
        ("linux/amd64", [ARM64, AMD64], 2),
        ("linux/arm64", [AMD64, ARM64_V8], 2),  # no variant asked: v8 is arm64's default
        ("linux/arm64/v8", [AMD64, ARM64], 2),  # an arm64 entry without variant is v8
        ("linux/arm/v7", [ARM_V6, ARM_V7], 2),  # exact variant first
        ("linux/arm/v7", [AMD64, ARM_V6], 2),  # v7 runs v6 images
        ("arm64", [AMD64, ARM64], 2),  # just an architecture means linux
    ],
)
def test_platform_selection_matches_like_containerd(wanted, offered, chosen):
    index = _index(*offered)
    assert index.select(Platform.parse(wanted)).digest == index.manifests[chosen - 1].digest


def test_no_manifest_for_the_platform_names_the_ones_there_are():
    with pytest.raises(IntegrityError, match=r"no image for platform linux/s390x.*linux/amd64, linux/arm64"):
        _index(AMD64, ARM64).select(Platform.parse("linux/s390x"))


# --- credential files --------------------------------------------------------------------------


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _write(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def env(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "PATH": os.environ["PATH"]}


def test_docker_config_auths_are_read_with_any_key_spelling(env):
    _write(
        Path(env["HOME"]) / ".docker/config.json",
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": _auth("hubuser", "hubpass")},
                "http://reg.example:5000/": {"auth": _auth("u", "p:with:colons")},
            }
        },
    )
    assert credentials.lookup("docker.io", "library/alpine", env) == Credential("hubuser", "hubpass")
    assert credentials.lookup("reg.example:5000", env=env) == Credential("u", "p:with:colons")
    assert credentials.lookup("reg.example", env=env) is None


def test_docker_config_env_and_registry_auth_file_take_precedence(env, tmp_path):
    _write(Path(env["HOME"]) / ".docker/config.json", {"auths": {"r.io": {"auth": _auth("home", "x")}}})
    _write(tmp_path / "dc/config.json", {"auths": {"r.io": {"auth": _auth("dockerconfig", "x")}}})
    _write(tmp_path / "raf.json", {"auths": {"r.io": {"auth": _auth("authfile", "x")}}})
    assert credentials.lookup("r.io", env=env).username == "home"
    env["DOCKER_CONFIG"] = str(tmp_path / "dc")
    assert credentials.lookup("r.io", env=env).username == "dockerconfig"
    env["REGISTRY_AUTH_FILE"] = str(tmp_path / "raf.json")
    assert credentials.lookup("r.io", env=env).username == "authfile"


def test_containers_auth_json_is_read_from_the_runtime_and_config_dirs(env, tmp_path):
    config_home = Path(env["HOME"]) / ".config"
    _write(config_home / "containers/auth.json", {"auths": {"q.io": {"auth": _auth("cfg", "x")}}})
    assert credentials.lookup("q.io", env=env).username == "cfg"
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    _write(tmp_path / "run/containers/auth.json", {"auths": {"q.io": {"auth": _auth("run", "x")}}})
    assert credentials.lookup("q.io", env=env).username == "run"


def test_a_repository_scoped_entry_wins_over_the_registry_entry(env):
    _write(
        Path(env["HOME"]) / ".docker/config.json",
        {
            "auths": {
                "q.io": {"auth": _auth("everyone", "x")},
                "q.io/team": {"auth": _auth("team", "x")},
                "q.io/team/app": {"auth": _auth("app", "x")},
            }
        },
    )
    assert credentials.lookup("q.io", "team/app", env).username == "app"
    assert credentials.lookup("q.io", "team/other", env).username == "team"
    assert credentials.lookup("q.io", "solo", env).username == "everyone"


def test_identity_tokens_are_kept_for_the_oauth_flow(env):
    entry = {"auth": _auth("u", "p"), "identitytoken": "refresh-me"}
    _write(Path(env["HOME"]) / ".docker/config.json", {"auths": {"q.io": entry}})
    assert credentials.lookup("q.io", env=env) == Credential("u", "p", "refresh-me")


def test_a_malformed_credentials_file_is_one_clear_error(env):
    path = Path(env["HOME"]) / ".docker/config.json"
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(AuthError, match="malformed credentials file"):
        credentials.lookup("q.io", env=env)


def test_login_writes_docker_format_with_private_permissions(env):
    path = _write(Path(env["HOME"]) / ".docker/config.json", {"auths": {}, "psFormat": "table"})
    written = credentials.save("docker.io", Credential("me", "pw"), env)
    assert written == path
    doc = json.loads(path.read_text())
    assert doc["psFormat"] == "table"  # other settings are kept
    assert doc["auths"] == {"https://index.docker.io/v1/": {"auth": _auth("me", "pw")}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert credentials.erase("docker.io", env) is True
    assert json.loads(path.read_text())["auths"] == {}
    assert credentials.erase("docker.io", env) is False


def test_login_creates_the_docker_folder_private(env):
    credentials.save("r.io:5000", Credential("me", "pw"), env)
    folder = Path(env["HOME"]) / ".docker"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert credentials.lookup("r.io:5000", env=env) == Credential("me", "pw")


# --- credential helpers: a real docker-credential-* program speaking the helper protocol ------

HELPER = textwrap.dedent(
    """\
    #!/usr/bin/python3
    # A minimal docker-credential helper keeping its secrets in one JSON file.
    import json, os, sys
    path = os.environ["HELPER_DB"]
    db = json.load(open(path)) if os.path.exists(path) else {}
    action, data = sys.argv[1], sys.stdin.read()
    if action == "get":
        if data.strip() not in db:
            print("credentials not found in native keychain"); sys.exit(1)
        user, secret = db[data.strip()]
        print(json.dumps({"ServerURL": data.strip(), "Username": user, "Secret": secret}))
    elif action == "store":
        doc = json.loads(data); db[doc["ServerURL"]] = [doc["Username"], doc["Secret"]]
    elif action == "erase":
        if db.pop(data.strip(), None) is None:
            print("credentials not found in native keychain"); sys.exit(1)
    json.dump(db, open(path, "w"))
    """
)


@pytest.fixture
def helper_env(env, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-testhelper"
    helper.write_text(HELPER)
    helper.chmod(0o755)
    env["PATH"] = f"{bindir}:{env['PATH']}"
    env["HELPER_DB"] = str(tmp_path / "helper-db.json")
    return env


def test_creds_store_helper_stores_gets_and_erases(helper_env):
    config = _write(Path(helper_env["HOME"]) / ".docker/config.json", {"credsStore": "testhelper"})
    credentials.save("docker.io", Credential("hub", "secret"), helper_env)
    db = json.loads(Path(helper_env["HELPER_DB"]).read_text())
    assert db == {"https://index.docker.io/v1/": ["hub", "secret"]}
    assert "secret" not in config.read_text()  # the file only marks the registry
    assert credentials.lookup("docker.io", "library/alpine", helper_env) == Credential("hub", "secret")
    assert credentials.erase("docker.io", helper_env) is True
    assert credentials.lookup("docker.io", env=helper_env) is None


def test_cred_helpers_apply_per_registry(helper_env):
    Path(helper_env["HELPER_DB"]).write_text(json.dumps({"q.io": ["helped", "pw"]}))
    _write(
        Path(helper_env["HOME"]) / ".docker/config.json",
        {"credHelpers": {"q.io": "testhelper"}, "auths": {"r.io": {"auth": _auth("plain", "pw")}}},
    )
    assert credentials.lookup("q.io", env=helper_env) == Credential("helped", "pw")
    assert credentials.lookup("r.io", env=helper_env) == Credential("plain", "pw")


def test_a_helper_that_is_not_installed_does_not_break_anonymous_pulls(env):
    _write(Path(env["HOME"]) / ".docker/config.json", {"credsStore": "desktop"})
    assert credentials.lookup("docker.io", env=env) is None


# --- tokens against the real token registry ------------------------------------------------------


def test_bearer_tokens_are_fetched_once_per_repository_and_reused(token_registry, monkeypatch):
    server = token_registry.token_server
    server.requests.clear()
    client = RegistryClient(token_registry.host)
    for _ in range(3):
        client.get_manifest("public/busybox", "latest")
    scopes = [r.scopes for r in server.requests]
    assert scopes == [["repository:public/busybox:pull"]]
    assert server.requests[0].username is None  # anonymous


def test_an_expired_token_is_replaced(token_registry):
    server = token_registry.token_server
    server.requests.clear()
    ticks = [0.0]
    client = RegistryClient(token_registry.host)
    client.auth._clock = lambda: ticks[0]
    client.get_manifest("public/busybox", "latest")
    ticks[0] += 3600
    client.get_manifest("public/busybox", "latest")
    assert len(server.requests) == 2


def test_credentials_are_sent_to_the_token_server(token_registry):
    server = token_registry.token_server
    server.requests.clear()
    cred = Credential(token_registry.username, token_registry.password)
    client = RegistryClient(token_registry.host, credential=lambda: cred)
    manifest = client.get_manifest("private/busybox", "latest")
    assert manifest.digest.startswith("sha256:")
    assert [r.username for r in server.requests] == [token_registry.username]


# --- TLS: a docker-registry serving HTTPS with a certificate from a test CA ------------------------


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory, busybox_layouts):
    import subprocess
    import time
    import urllib.request

    from support.registry import die_with_parent, free_port

    work = tmp_path_factory.mktemp("tls-registry")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=work)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=ocibox test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (work / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:registry.test\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    )
    host = f"127.0.0.1:{free_port()}"
    (work / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {work / 'storage'}\nhttp:\n  addr: {host}\n  tls:\n"
        f"    certificate: {work / 'server.pem'}\n    key: {work / 'server.key'}\n"
    )
    log = open(work / "registry.log", "wb")
    proc = subprocess.Popen(
        ["/usr/bin/docker-registry", "serve", str(work / "config.yml")],
        stdout=log,
        stderr=log,
        preexec_fn=die_with_parent,
    )
    import ssl

    context = ssl.create_default_context(cafile=str(work / "ca.pem"))
    for _ in range(200):
        try:
            urllib.request.urlopen(f"https://{host}/v2/", context=context, timeout=2)
            break
        except OSError:
            time.sleep(0.05)
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            "--dest-tls-verify=false",
            f"oci:{busybox_layouts['busybox']}:latest",
            f"docker://{host}/busybox:latest",
        ],
        check=True,
        capture_output=True,
    )
    yield host, work / "ca.pem"
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def test_a_loopback_registry_speaking_tls_is_pulled_over_tls(ocibox, tls_registry):
    host, _ = tls_registry
    result = ocibox("pull", "-q", f"{host}/busybox")
    assert result.stdout.strip() == f"{host}/busybox:latest"


def test_tls_certificates_are_verified_against_the_system_cas(tls_registry):
    import ssl

    from ocibox.registry.transport import Connection, Untrusted

    host, ca = tls_registry
    with pytest.raises(Untrusted, match="not trusted"):
        Connection("https", host, 5, ssl.create_default_context())
    Connection("https", host, 5, ssl.create_default_context(cafile=str(ca))).close()


# --- proxies: HTTPS_PROXY with a CONNECT tunnel, as Go's clients (docker, skopeo) use them ----------


class ConnectProxy:
    """A minimal HTTP CONNECT proxy that tunnels every request to one upstream address."""

    def __init__(self, upstream: tuple[str, int]):
        import socket
        import threading

        self.upstream = upstream
        self.tunnels: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        import socket
        import threading

        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                conn.close()
                return
            head += chunk
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
        self.tunnels.append(f"{method} {target}")
        upstream = socket.create_connection(self.upstream)
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pipe(src, dst) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()
        pipe(conn, upstream)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxied_tls_registry(tls_registry):
    """registry.test:PORT reached through an HTTPS_PROXY that tunnels to the TLS registry."""
    host, ca = tls_registry
    port = int(host.rsplit(":", 1)[1])
    proxy = ConnectProxy(("127.0.0.1", port))
    env = {"HTTPS_PROXY": proxy.url, "NO_PROXY": None, "no_proxy": None}
    yield f"registry.test:{port}", ca, proxy, env
    proxy.close()


def test_tls_to_a_named_registry_through_a_proxy_is_verified(ocibox, proxied_tls_registry):
    name, ca, proxy, env = proxied_tls_registry
    result = ocibox("pull", "-q", f"{name}/busybox", env={**env, "SSL_CERT_FILE": ca})
    assert result.stdout.strip() == f"{name}/busybox:latest"
    assert proxy.tunnels and set(proxy.tunnels) == {f"CONNECT {name}"}


def test_an_untrusted_certificate_is_refused_unless_the_registry_is_named_insecure(
    ocibox, proxied_tls_registry
):
    name, _, _, env = proxied_tls_registry
    refused = ocibox("pull", f"{name}/busybox", env=env, check=False)
    assert refused.returncode == 125
    assert refused.stderr.strip().splitlines()[-1] == (
        f"ocibox: can't reach registry {name}: TLS certificate of {name} not trusted "
        "(unable to get local issuer certificate)"
    )
    ocibox("pull", "-q", f"{name}/busybox", env={**env, "OCIBOX_INSECURE_REGISTRIES": name})
    ocibox("pull", "-q", "--insecure", f"{name}/busybox", env=env)


@pytest.mark.parametrize(
    ("scheme", "netloc", "no_proxy", "expected"),
    [
        ("https", "registry.example:5000", "", "proxy:3128"),
        ("https", "127.0.0.1:5000", "", None),  # loopback never goes through a proxy
        ("https", "registry.example", "ample", "proxy:3128"),  # whole labels only
        ("https", "registry.example", ".example", None),
        ("https", "registry.example", "registry.example", None),
        ("https", "a.registry.example", "registry.example", None),
        ("https", "registry.example:5000", "registry.example:6000", "proxy:3128"),
        ("https", "registry.example:5000", "registry.example:5000", None),
        ("https", "10.1.2.3:5000", "10.0.0.0/8", None),
        ("https", "registry.example", "*", None),
        ("http", "registry.example", "", "plainproxy:8080"),
    ],
)
def test_proxies_follow_the_environment_like_go(scheme, netloc, no_proxy, expected):
    from ocibox.registry.transport import proxy_for

    env = {"HTTPS_PROXY": "http://proxy:3128", "http_proxy": "plainproxy:8080", "NO_PROXY": no_proxy}
    found = proxy_for(scheme, netloc, env)
    assert (found.netloc if found else None) == expected


def test_proxy_credentials_come_from_the_proxy_url():
    from ocibox.registry.transport import proxy_for

    found = proxy_for("https", "r.example", {"HTTPS_PROXY": "http://me:p%40ss@proxy:3128/"})
    assert found.netloc == "proxy:3128"
    assert found.authorization == "Basic " + base64.b64encode(b"me:p@ss").decode()


# --- the HTTP/1.1 transport against a scripted server: body framings and keep-alive -------------


class ScriptedServer:
    """Answers each request on a connection with the next raw answer of `answers` (bytes), then
    closes the connection when the answer is followed by None. Counts connections."""

    def __init__(self, answers: list):
        import socket
        import threading

        self.answers = list(answers)
        self.connections = 0
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                while self.answers:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        head += chunk
                    if not head:
                        break
                    self.requests.append(head)
                    conn.sendall(self.answers.pop(0))
                    if self.answers and self.answers[0] is None:
                        self.answers.pop(0)
                        break

    def close(self) -> None:
        self.listener.close()


def _get(transport: Transport, host: str, path: str = "/x") -> tuple[int, bytes]:
    with transport.request("GET", f"http://{host}{path}") as response:
        return response.status, response.read_all(1 << 20)


def test_chunked_answers_are_decoded():
    body = b"7\r\nchunked\r\n1;ext=1\r\n!\r\n0\r\nTrailer: x\r\n\r\n"
    server = ScriptedServer([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body])
    assert _get(Transport(), server.host) == (200, b"chunked!")
    server.close()


def test_an_answer_without_length_ends_when_the_server_closes():
    server = ScriptedServer([b"HTTP/1.0 200 OK\r\n\r\nuntil close", None])
    assert _get(Transport(), server.host) == (200, b"until close")
    server.close()


def test_keep_alive_reuses_the_connection_and_survives_an_idle_close():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    server = ScriptedServer([ok, ok, None, ok])  # the server drops the connection after two answers
    transport = Transport()
    assert [_get(transport, server.host) for _ in range(3)] == [(200, b"ok")] * 3
    assert server.connections == 2
    server.close()


def test_redirects_to_another_host_drop_the_authorization_header():
    target = ScriptedServer([b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nblob"])
    origin = ScriptedServer(
        [
            f"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{target.host}/b\r\n"
            "Content-Length: 0\r\n\r\n".encode()
        ]
    )
    with Transport().request("GET", f"http://{origin.host}/a", {"Authorization": "Bearer t"}) as response:
        assert (response.status, response.read_all(100)) == (200, b"blob")
    assert b"Authorization: Bearer t" in origin.requests[0]
    assert b"Authorization" not in target.requests[0]
    origin.close()
    target.close()
