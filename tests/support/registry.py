"""Real Debian `docker-registry` instances on 127.0.0.1, started and stopped by the tests.

`start_registry(workdir)` writes a config YAML and a storage folder under `workdir`, starts
/usr/bin/docker-registry on a free port and waits until `/v2/` answers. The returned `Registry`
knows its address, its credentials (if any) and how to stop itself. Three flavours:

- open:      no auth at all;
- htpasswd:  basic auth from an htpasswd file made with `htpasswd -B` (bcrypt);
- token:     `auth: token`, with the realm served by `TokenServer` (tests/support/tokens.py).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REGISTRY_BIN = "/usr/bin/docker-registry"
PR_SET_PDEATHSIG = 1
MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the test process dies, so nothing is left behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Registry:
    """A running docker-registry. `host` is "127.0.0.1:PORT", `url` is "http://127.0.0.1:PORT"."""

    host: str
    workdir: Path
    storage: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen
    auth: str = "none"  # "none", "htpasswd" or "token"
    username: str | None = None
    password: str | None = None
    token_server: object | None = None
    seeded: dict[str, str] = field(default_factory=dict)  # name -> reference pushed at start

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def creds(self) -> str | None:
        """ "user:password" for skopeo's --creds flags, or None for an open registry."""
        if self.username is None:
            return None
        return f"{self.username}:{self.password}"

    def ref(self, repository: str, tag: str = "latest") -> str:
        """A full reference to `repository:tag` on this registry."""
        return f"{self.host}/{repository}:{tag}"

    def request(
        self,
        path: str,
        method: str = "GET",
        headers: dict | None = None,
        data: bytes | None = None,
        auth: bool = True,
    ) -> tuple[int, dict, bytes]:
        """One HTTP request to the registry, returning (status, headers, body); never raises on
        HTTP error statuses. Manifest requests accept every manifest and index type unless
        `headers` has an Accept. With `auth`, it logs in with this registry's credentials: basic auth
        for htpasswd, and for a token registry it answers the Bearer challenge at the realm.
        """
        hdrs = dict(headers or {})
        if "/manifests/" in path and not any(k.lower() == "accept" for k in hdrs):
            hdrs["Accept"] = MANIFEST_TYPES
        if auth and self.auth == "htpasswd" and self.username:
            hdrs["Authorization"] = basic_auth(self.username, self.password)
        status, resp_headers, body = http(self.url + path, method, hdrs, data)
        challenge = resp_headers.get("WWW-Authenticate", "")
        if status == 401 and auth and self.auth == "token" and challenge.startswith("Bearer "):
            token = fetch_token(challenge, self.username, self.password)
            hdrs["Authorization"] = f"Bearer {token}"
            status, resp_headers, body = http(self.url + path, method, hdrs, data)
        return status, resp_headers, body

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stop the registry process (SIGTERM, then SIGKILL after 5 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.token_server is not None:
            self.token_server.stop()


def basic_auth(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def http(url: str, method: str = "GET", headers: dict | None = None, data: bytes | None = None):
    """(status, headers, body) of one request; HTTP error statuses are returned, not raised.

    `headers` is an http.client.HTTPMessage: look-ups ignore case ("WWW-Authenticate").
    """
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def parse_challenge(challenge: str) -> dict[str, str]:
    """The key="value" pairs of a `WWW-Authenticate: Bearer …` header."""
    return dict(re.findall(r'(\w+)="([^"]*)"', challenge))


def fetch_token(challenge: str, username: str | None = None, password: str | None = None) -> str:
    """A bearer token from the realm named in `challenge` (anonymous if no username)."""
    params = parse_challenge(challenge)
    query = {"service": params.get("service", "")}
    if "scope" in params:
        query["scope"] = params["scope"]
    headers = {"Authorization": basic_auth(username, password)} if username else {}
    url = params["realm"] + "?" + urllib.parse.urlencode(query)
    status, _, body = http(url, headers=headers)
    if status != 200:
        raise RuntimeError(f"token request {url} failed: {status} {body[:200]!r}")
    doc = json.loads(body)
    return doc.get("token") or doc["access_token"]


def write_htpasswd(path: Path, username: str, password: str) -> None:
    """An htpasswd file with one bcrypt entry, as docker-registry's htpasswd auth requires."""
    out = subprocess.run(
        ["htpasswd", "-Bbn", username, password], check=True, capture_output=True, text=True
    ).stdout
    path.write_text(out.strip() + "\n")


def _config_yaml(storage: Path, host: str, auth_section: str) -> str:
    return f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {host}
  secret: ocibox-tests-not-a-secret
  headers:
    X-Content-Type-Options: [nosniff]
{auth_section}"""


def _htpasswd_section(htpasswd: Path) -> str:
    return f"""auth:
  htpasswd:
    realm: ocibox-test
    path: {htpasswd}
"""


def _token_section(realm: str, service: str, issuer: str, certbundle: Path) -> str:
    return f"""auth:
  token:
    realm: {realm}
    service: {service}
    issuer: {issuer}
    rootcertbundle: {certbundle}
"""


def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 20.0) -> bool:
    """True once GET /v2/ answers (200 or 401); False if the process died first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + "/v2/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            time.sleep(0.05)
    return False


def start_registry(
    workdir: Path,
    auth: str = "none",
    username: str = "ocibox",
    password: str = "s3cret-pass",
    token_server=None,
) -> Registry:
    """Start docker-registry with its storage and config under `workdir` (created if missing).

    `auth` is "none", "htpasswd" or "token"; "token" needs a started `token_server`
    (tests/support/tokens.py) whose realm, service, issuer and certificate the registry trusts.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    if auth == "htpasswd":
        htpasswd = workdir / "htpasswd"
        write_htpasswd(htpasswd, username, password)
        auth_section = _htpasswd_section(htpasswd)
    elif auth == "token":
        if token_server is None:
            raise ValueError("a token registry needs a running token server")
        auth_section = _token_section(
            token_server.realm, token_server.service, token_server.issuer, token_server.cert_path
        )
        username, password = token_server.username, token_server.password
    elif auth == "none":
        auth_section = ""
        username = password = None
    else:
        raise ValueError(f"unknown registry auth {auth!r}")

    last_error = ""
    for _attempt in range(5):
        host = f"127.0.0.1:{free_port()}"
        config_path = workdir / "config.yml"
        config_path.write_text(_config_yaml(storage, host, auth_section))
        log_path = workdir / "registry.log"
        log = open(log_path, "ab")
        process = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=die_with_parent,
        )
        log.close()
        if _wait_ready(f"http://{host}", process):
            return Registry(
                host=host,
                workdir=workdir,
                storage=storage,
                config_path=config_path,
                log_path=log_path,
                process=process,
                auth=auth,
                username=username,
                password=password,
                token_server=token_server,
            )
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
        last_error = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"docker-registry did not start; last log:\n{last_error}")
