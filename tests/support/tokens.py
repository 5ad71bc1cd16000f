"""A small token server for docker-registry's `auth: token`, the way Docker Hub's auth works.

`TokenServer(workdir)` makes an RSA key and a self-signed certificate with `openssl`, then serves
the realm at http://127.0.0.1:PORT/token from a thread:

    GET  /token?service=S&scope=repository:NAME:pull,push[&scope=…]   (Basic auth optional)
    POST /token  grant_type=password&username=…&password=…&scope=…&service=…  (OAuth2 form)

It answers {"token", "access_token", "expires_in", "issued_at"} with a JWT signed RS256 whose
header carries the certificate (x5c), which the registry checks against `rootcertbundle`.
Grants: with the right user/password, pull, push and delete on any repository (and
registry:catalog:*); anonymous, pull on repositories under `public/` only; wrong credentials,
401. Every request is recorded in `requests` (method, scopes, username or None, status).
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_key_and_cert(workdir: Path, name: str = "ocibox-test-token-issuer") -> tuple[Path, Path]:
    """An RSA-2048 key and a self-signed certificate (valid two days) made by openssl."""
    key, cert = workdir / "token-key.pem", workdir / "token-cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


@dataclass
class TokenRequest:
    method: str
    scopes: list[str]
    username: str | None
    status: int
    granted: list[dict] = field(default_factory=list)


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """ "repository:name:pull,push" -> ("repository", "name", ["pull", "push"])."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2:
        return None
    return kind, name, [a for a in actions.split(",") if a]


class TokenServer:
    """The realm of a token-auth registry; see the module docstring."""

    def __init__(
        self,
        workdir: Path,
        username: str = "ocibox",
        password: str = "token-pass",
        service: str = "ocibox-test-registry",
        issuer: str = "ocibox-test-token-server",
        expires_in: int = 300,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.username, self.password = username, password
        self.service, self.issuer = service, issuer
        self.expires_in = expires_in
        self.key_path, self.cert_path = make_key_and_cert(self.workdir)
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._key = self._load_key()
        self._x5c = [self._cert_der_b64()]
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _load_key(self):
        from cryptography.hazmat.primitives import serialization

        return serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)

    def _cert_der_b64(self) -> str:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()

    def grant(self, username: str | None, scopes: list[str]) -> list[dict]:
        """What a user (None: anonymous) gets for the scopes asked."""
        access = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            kind, name, actions = parsed
            if username is not None:
                allowed = {"pull", "push", "delete", "*"}
            elif kind == "repository" and name.startswith("public/"):
                allowed = {"pull"}
            else:
                allowed = set()
            granted = [a for a in actions if a in allowed]
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        return access

    def sign(self, subject: str, access: list[dict], expires_in: int | None = None) -> str:
        """A JWT the registry accepts (RS256, x5c header)."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": self._x5c}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + (self.expires_in if expires_in is None else expires_in),
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(signature)

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 - http.server's signature
                pass

            def _reply(self, status: int, doc: dict, extra: dict | None = None) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _answer(self, method: str, username: str | None, password: str | None, scopes: list[str]):
                if username is not None and (username, password) != (server.username, server.password):
                    server._record(TokenRequest(method, scopes, username, 401))
                    self._reply(
                        401,
                        {"errors": [{"code": "UNAUTHORIZED", "message": "wrong username or password"}]},
                        {"WWW-Authenticate": 'Basic realm="ocibox-test-token-server"'},
                    )
                    return
                access = server.grant(username, scopes)
                token = server.sign(username or "", access)
                server._record(TokenRequest(method, scopes, username, 200, access))
                self._reply(
                    200,
                    {
                        "token": token,
                        "access_token": token,
                        "expires_in": server.expires_in,
                        "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    },
                )

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                if url.path != "/token":
                    self._reply(404, {"errors": [{"code": "NOT_FOUND"}]})
                    return
                query = urllib.parse.parse_qs(url.query)
                username = password = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    try:
                        username, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                    except ValueError:
                        username, password = "", None
                self._answer("GET", username, password, _split_scopes(query.get("scope", [])))

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                if urllib.parse.urlsplit(self.path).path != "/token":
                    self._reply(404, {"errors": [{"code": "NOT_FOUND"}]})
                    return
                if form.get("grant_type", [""])[0] != "password":
                    self._reply(400, {"error": "unsupported_grant_type"})
                    return
                username = form.get("username", [None])[0]
                password = form.get("password", [None])[0]
                self._answer("POST", username, password, _split_scopes(form.get("scope", [])))

        return Handler


def _split_scopes(values: list[str]) -> list[str]:
    """Scopes arrive as repeated parameters or space separated (OAuth2 form)."""
    return [scope for value in values for scope in value.split(" ") if scope]
