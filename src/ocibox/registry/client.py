"""A distribution-spec (v2) client: authentication, manifests, blobs, both ways.

Over `transport.Transport` (persistent HTTP/1.1 connections, one per thread, TLS by default,
redirects without Authorization to other hosts), `RegistryClient` answers auth challenges, checks
manifest digests, and streams blobs into a caller's sink with retries (5xx, 429 with Retry-After,
dropped connections) and Range resumes. For a push it checks and mounts blobs, uploads them (one
PUT or PATCH chunks) and puts manifests. It knows nothing of the store: a sink is anything with
`offset`, `write(buffer)` and `reset()`, a blob to upload anything `open_blob()` opens.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ocibox.errors import AuthError, IntegrityError, NotFound, RegistryError
from ocibox.registry.auth import Authenticator, scope_for
from ocibox.registry.transport import (
    ProtocolError,
    ProxyError,
    RedirectError,
    Response,
    TooLarge,
    Transport,
    Untrusted,
    is_loopback,
    join_url,
    split_url,
)

if TYPE_CHECKING:
    from typing import BinaryIO

    from ocibox.registry.credentials import Credential

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
# Schema 1 is asked for last, only so that such an image is recognised and refused clearly.
SCHEMA1_TYPE = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MANIFEST_ACCEPT = ", ".join(MANIFEST_TYPES) + f", {SCHEMA1_TYPE};q=0.1"
MANIFEST_LIMIT = 4 << 20  # the OCI distribution spec's recommended maximum manifest size
CHUNK = 1 << 20  # read size for blobs: big enough that hashing and writing release the GIL
ATTEMPTS = 5  # tries per request before a transient failure is reported
MAX_DROPS = 15  # dropped connections per blob download, even when each brought some bytes
MAX_RETRY_AFTER = 60.0
INSECURE_ENV = "OCIBOX_INSECURE_REGISTRIES"
UPLOAD_CHUNK = 8 << 20  # blobs bigger than this go up in PATCH requests of this size; smaller in one PUT

# What a dropped or refused connection looks like: retried, then reported as the registry's fault.
TRANSIENT = (OSError, ProtocolError)
# What no retry or other scheme will fix.
_UNREACHABLE = (ConnectionRefusedError, socket.gaierror, TimeoutError, Untrusted, ProxyError)

__all__ = ["RegistryClient", "Transport", "insecure_hosts_from_env", "is_loopback", "Cancelled"]


class Cancelled(Exception):
    """Another download of the same pull failed, or the user interrupted it."""


class _Dropped(Exception):
    """The connection failed while a blob body was being read (not the sink: that error passes)."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


class _Retry(Exception):
    """A push step failed in a way a new attempt may fix (dropped connection, 429, 5xx)."""

    def __init__(self, problem: str, delay: float | None = None):
        super().__init__(problem)
        self.delay = delay


class BlobSink(Protocol):
    """Where a blob's bytes go: the store's temp-file writer, which hashes as it writes."""

    @property
    def offset(self) -> int: ...

    def write(self, data: memoryview) -> None: ...

    def reset(self) -> None: ...


def insecure_hosts_from_env(env: dict[str, str] | None = None) -> frozenset[str]:
    env = os.environ if env is None else env
    return frozenset(h.strip() for h in env.get(INSECURE_ENV, "").split(",") if h.strip())


@dataclass
class ManifestResponse:
    """A manifest or index as the registry sent it, its digest verified."""

    data: bytes
    media_type: str
    digest: str


def _digest_of(data: bytes, algorithm: str) -> str:
    if algorithm not in ("sha256", "sha512"):
        raise IntegrityError(f"unsupported digest algorithm {algorithm!r}")
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _error_detail(data: bytes) -> tuple[str, str]:
    """The first (code, message) of a distribution-spec error body, or ("", "")."""
    try:
        errors = json.loads(data).get("errors") or []
        first = errors[0]
        return str(first.get("code") or ""), str(first.get("message") or "")
    except (ValueError, AttributeError, IndexError, TypeError):
        return "", ""


def _retry_after(response: Response) -> float | None:
    value = response.header("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, min(when - time.time(), MAX_RETRY_AFTER))


def backoff(attempt: int) -> float:
    """0.2 s, 0.4 s, 0.8 s, … capped at 5 s."""
    return min(0.2 * (2 ** (attempt - 1)), 5.0)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, Untrusted | ProxyError | RedirectError):
        return str(exc)
    if type(exc).__name__.startswith("SSL"):
        return f"TLS error ({getattr(exc, 'reason', None) or exc})"
    if isinstance(exc, ConnectionError):
        return "connection dropped"
    if isinstance(exc, ProtocolError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class RegistryClient:
    """One registry host's API: `get_manifest`, `fetch_blob`, `check_login`; for a push
    `blob_exists`, `mount_blob`, `upload_blob`, `put_manifest`.

    `registry` is the name users type (docker.io), `api_host` the host serving the API
    (registry-1.docker.io). Safe to share between threads.
    """

    def __init__(
        self,
        registry: str,
        api_host: str | None = None,
        credential: Callable[[], Credential | None] | None = None,
        transport: Transport | None = None,
        sleep: Callable[[float], object] | None = None,
    ):
        self.registry = registry
        self.host = api_host or registry
        self.transport = transport or Transport(insecure_hosts_from_env())
        self.auth = Authenticator(registry, self.transport, credential or (lambda: None))
        self._base: str | None = None
        self._base_lock = threading.Lock()
        self._sleep = sleep or time.sleep

    # -- connection and authentication ---------------------------------------------------------

    def base_url(self) -> str:
        """`https://host` or, for a loopback/insecure host serving plain HTTP, `http://host`.

        Found by pinging `/v2/` once, as Docker does; a 401 there tells the auth scheme early.
        """
        with self._base_lock:
            if self._base is None:
                self._base = self._ping()
            return self._base

    def _ping(self) -> str:
        # Loopback registries are nearly always plain HTTP: ask that first. Hosts the user named
        # insecure are asked over TLS first, as Docker does, then plain HTTP.
        if is_loopback(self.host):
            schemes = ["http", "https"]
        elif self.transport.allows_plain_http(self.host):
            schemes = ["https", "http"]
        else:
            schemes = ["https"]
        last: BaseException | None = None
        for attempt in range(1, ATTEMPTS + 1):
            fatal: BaseException | None = None
            for scheme in schemes:
                url = f"{scheme}://{self.host}/v2/"
                try:
                    response = self.transport.request("GET", url, follow_redirects=False)
                    with response:
                        body = response.read_all(1 << 16) if response.status == 400 else b""
                except _UNREACHABLE as exc:
                    # Down, unknown or untrusted: no retry will change that.
                    fatal = fatal or exc
                    continue
                except (*TRANSIENT, TooLarge) as exc:
                    last = exc
                    continue
                if scheme == "http" and response.status == 400 and b"HTTPS" in body.upper():
                    continue  # Go's TLS server answering a plain request
                if response.status == 401:
                    self.auth.learn(response.header_values("WWW-Authenticate"))
                return f"{scheme}://{self.host}"
            if fatal is not None:
                raise RegistryError(f"can't reach registry {self.host}: {_describe(fatal)}")
            if attempt < ATTEMPTS:
                self._sleep(backoff(attempt))
        raise RegistryError(f"can't reach registry {self.host}: {_describe(last) if last else 'no answer'}")

    def _request(
        self,
        method: str,
        path: str,
        scope: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        """One authenticated request; a 401 is answered once (fresh token or basic auth) and retried.

        `path` is under the API's base URL, or an absolute URL (an upload's Location): credentials
        go only to the registry's own host."""
        url = path if "://" in path.split("?", 1)[0] else self.base_url() + path
        ours = split_url(url)[1] == split_url(self.base_url())[1]
        headers = dict(headers or {})
        authorization = self.auth.authorization(scope) if ours else None
        if authorization:
            headers["Authorization"] = authorization
        response = self.transport.request(method, url, headers, body)
        if response.status != 401 or not ours:
            return response
        challenges = response.header_values("WWW-Authenticate")
        response.close()
        headers["Authorization"] = self.auth.answer(challenges, scope, authorization)
        return self.transport.request(method, url, headers, body)

    def _retrying(
        self, what: str, send: Callable[[], Response], cancel: threading.Event | None = None
    ) -> Response:
        """`send()` until it is not a 429/5xx or a dropped connection, with backoff; then the answer."""
        problem = ""
        for attempt in range(1, ATTEMPTS + 1):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            delay = backoff(attempt)
            try:
                response = send()
            except (ConnectionRefusedError, socket.gaierror) as exc:
                problem = f"can't reach registry {self.host}: {_describe(exc)}"
            except (Untrusted, RedirectError, ProxyError) as exc:
                raise RegistryError(f"can't reach registry {self.host}: {_describe(exc)}") from None
            except TooLarge as exc:
                raise RegistryError(f"{what}: {exc}") from None
            except TRANSIENT as exc:
                problem = f"{what}: {_describe(exc)}"
            else:
                if response.status != 429 and response.status < 500:
                    return response
                problem = f"{what}: registry answered {response.status} {response.reason}"
                delay = _retry_after(response) or delay
                response.close()
            if attempt < ATTEMPTS:
                self._pause(delay, cancel)
        raise RegistryError(problem)

    def _pause(self, delay: float, cancel: threading.Event | None) -> None:
        """Wait `delay` seconds before another attempt; Cancelled when `cancel` is set meanwhile."""
        if cancel is not None:
            if cancel.wait(delay):
                raise Cancelled()
        elif delay:
            self._sleep(delay)

    @staticmethod
    def _refusal(response: Response) -> tuple[str, str]:
        """(error code, what to tell the user) of a refused request, from its body or its reason."""
        try:
            body = response.read_all(1 << 16)
        except (*TRANSIENT, TooLarge):
            body = b""
        code, message = _error_detail(body)
        return code, message or code.lower().replace("_", " ") or response.reason

    def _fail(self, response: Response, what: str, repository: str) -> None:
        """Raise the error a non-2xx answer means."""
        code, detail = self._refusal(response)
        if response.status == 404 or code in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"):
            raise NotFound(f"{what} not found: {detail}")
        if response.status == 401:
            if self.auth.credential is None:
                raise AuthError(
                    f"pull access denied for {self.registry}/{repository}: repository does not exist "
                    f"or may require 'ocibox login {self.registry}'"
                )
            raise AuthError(f"access to {self.registry}/{repository} denied: {detail}")
        if response.status == 403 or code == "DENIED":
            raise AuthError(f"access to {self.registry}/{repository} denied: {detail}")
        raise RegistryError(f"{what}: registry answered {response.status} {detail}")

    # -- the API --------------------------------------------------------------------------------

    def get_manifest(self, repository: str, reference: str, *, what: str | None = None) -> ManifestResponse:
        """GET a manifest or index by tag or digest; its digest is checked against the reference's
        digest, or else the registry's Docker-Content-Digest header."""
        path = f"/v2/{repository}/manifests/{reference}"
        what = what or f"manifest for {self.registry}/{repository}:{reference}"
        scope = scope_for(repository)

        def send() -> Response:
            response = self._request("GET", path, scope, {"Accept": MANIFEST_ACCEPT})
            if response.status != 200:
                return response
            try:
                response.data = response.read_all(MANIFEST_LIMIT)
            except BaseException:
                response.abort()
                raise
            return response

        response = self._retrying(f"fetching {what}", send)
        if response.status != 200:
            with response:
                self._fail(response, what, repository)
        data: bytes = response.data
        media_type = (response.header("Content-Type") or "").split(";")[0].strip()
        expected = reference if ":" in reference else response.header("Docker-Content-Digest")
        if expected and expected.partition(":")[0] in ("sha256", "sha512"):
            algorithm = expected.partition(":")[0]
            digest = _digest_of(data, algorithm)
            if digest != expected:
                raise IntegrityError(
                    f"{what}: content does not match its digest (expected {expected}, got {digest})"
                )
            if algorithm != "sha256":
                digest = _digest_of(data, "sha256")
        else:
            digest = _digest_of(data, "sha256")
        return ManifestResponse(data, media_type, digest)

    def fetch_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        sink: BlobSink,
        on_progress: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Stream blob `digest` (`size` bytes) into `sink`, resuming with Range after a dropped
        connection when the server allows (206), else starting over. The sink checks the digest."""
        path = f"/v2/{repository}/blobs/{digest}"
        scope = scope_for(repository)
        what = f"blob {digest} of {self.registry}/{repository}"
        buffer = memoryview(bytearray(CHUNK))
        use_range = True
        failures = 0  # drops in a row without a byte of progress
        drops = 0  # drops in all
        while True:
            start = sink.offset if use_range else 0
            if not use_range and sink.offset:
                sink.reset()
            headers = {"Range": f"bytes={start}-"} if start else {}
            response = self._retrying(
                f"downloading {what}", lambda h=headers: self._request("GET", path, scope, h), cancel
            )
            with response:
                if response.status == 206 and start:
                    if not (response.header("Content-Range") or "").startswith(f"bytes {start}-"):
                        use_range = False
                        response.abort()
                        continue
                elif response.status == 200:
                    if sink.offset:  # the server ignored Range: start over
                        sink.reset()
                        if on_progress is not None:
                            on_progress(0)
                else:
                    self._fail(response, what, repository)
                before = sink.offset
                try:
                    self._stream(response, sink, size, buffer, on_progress, cancel)
                except _Dropped as exc:
                    response.abort()
                    problem = _describe(exc.cause)
                else:
                    if sink.offset >= size:
                        return
                    problem = "connection dropped"
            drops += 1
            failures = 0 if sink.offset > before else failures + 1
            if failures >= ATTEMPTS or drops >= MAX_DROPS:
                raise RegistryError(f"downloading {what}: {problem} ({sink.offset} of {size} bytes)")
            # Reconnect at once after a drop that brought bytes; back off when nothing comes.
            self._pause(backoff(failures) if failures else 0.0, cancel)

    @staticmethod
    def _stream(
        response: Response,
        sink: BlobSink,
        size: int,
        buffer: memoryview,
        on_progress: Callable[[int], None] | None,
        cancel: threading.Event | None,
    ) -> None:
        """Copy the body into the sink, never past `size` bytes."""
        while True:
            remaining = size - sink.offset
            if remaining <= 0:
                return
            view = buffer if remaining >= len(buffer) else buffer[:remaining]
            try:
                n = response.readinto(view)
            except TRANSIENT as exc:
                raise _Dropped(exc) from None
            if n == 0:
                return
            sink.write(view[:n])
            if on_progress is not None:
                on_progress(sink.offset)
            if cancel is not None and cancel.is_set():
                response.abort()
                raise Cancelled()

    # -- pushing --------------------------------------------------------------------------------

    def _fail_push(self, response: Response, what: str, repository: str) -> None:
        """Raise the error a refused push step means (auth errors name push, not pull)."""
        if response.status in (401, 403):
            _, detail = self._refusal(response)
            hint = f" (run 'ocibox login {self.registry}')" if self.auth.credential is None else ""
            raise AuthError(f"push access to {self.registry}/{repository} denied: {detail}{hint}")
        self._fail(response, what, repository)

    def blob_exists(self, repository: str, digest: str) -> bool:
        """HEAD the blob: does the repository already have it?"""
        path = f"/v2/{repository}/blobs/{digest}"
        scope = scope_for(repository, "pull,push")
        what = f"blob {digest} of {self.registry}/{repository}"
        response = self._retrying(f"checking {what}", lambda: self._request("HEAD", path, scope))
        with response:
            if response.status == 200:
                return True
            if response.status == 404:
                return False
            self._fail_push(response, what, repository)
        return False

    def mount_blob(self, repository: str, digest: str, source: str) -> tuple[bool, str | None]:
        """Ask the registry to link blob `digest` from repository `source` into `repository`.

        (True, None) when mounted; else (False, an upload Location the registry opened instead, or
        None). A refused mount (no pull access to `source`) is not an error: the blob is uploaded."""
        import urllib.parse

        query = urllib.parse.urlencode({"mount": digest, "from": source})
        path = f"/v2/{repository}/blobs/uploads/?{query}"
        scope = f"{scope_for(repository, 'pull,push')} {scope_for(source)}"
        what = f"mounting blob {digest} from {self.registry}/{source} into {repository}"
        try:
            response = self._retrying(what, lambda: self._request("POST", path, scope, body=b""))
        except AuthError:
            return False, None
        with response:
            if response.status == 201:
                return True, None
            if response.status == 202 and response.header("Location"):
                return False, join_url(self.base_url() + path, response.header("Location") or "")
            if response.status in (401, 403):
                return False, None
            self._fail_push(response, what, repository)
        return False, None

    def upload_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        open_blob: Callable[[], BinaryIO],
        *,
        chunk_size: int = UPLOAD_CHUNK,
        location: str | None = None,
        on_progress: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Upload a blob: one PUT when it is at most `chunk_size` bytes, else PATCH requests of
        `chunk_size` bytes (Content-Range) and a closing PUT. Read from `open_blob()` a chunk at a
        time. A dropped connection or a busy registry (429, 5xx) starts the upload over."""
        what = f"uploading blob {digest} to {self.registry}/{repository}"
        problem = ""
        for attempt in range(1, ATTEMPTS + 1):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            delay = backoff(attempt)
            try:
                if location is None:
                    location = self._start_upload(repository, what)
                if size <= chunk_size:
                    with open_blob() as f:
                        data = f.read(size + 1)
                    self._check_length(digest, size, len(data))
                    self._close_upload(repository, location, digest, data, what)
                else:
                    self._upload_chunks(
                        repository, location, digest, size, open_blob, chunk_size, what, on_progress, cancel
                    )
                if on_progress is not None:
                    on_progress(size)
                return
            except _Retry as exc:
                problem, delay = f"{what}: {exc}", exc.delay or delay
            location = None  # a failed session is not resumed: the next try opens a new one
            if on_progress is not None:
                on_progress(0)
            if attempt < ATTEMPTS:
                self._pause(delay, cancel)
        raise RegistryError(problem)

    @staticmethod
    def _check_length(digest: str, size: int, got: int) -> None:
        if got != size:
            raise IntegrityError(f"blob {digest}: the store holds {got} bytes, the manifest says {size}")

    def _upload_step(
        self,
        method: str,
        url: str,
        repository: str,
        what: str,
        expect: int,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        """One request of an upload; transient failures raise _Retry, refusals their error."""
        scope = scope_for(repository, "pull,push")
        try:
            response = self._request(method, url, scope, headers, body)
        except (Untrusted, RedirectError, ProxyError) as exc:
            raise RegistryError(f"can't reach registry {self.host}: {_describe(exc)}") from None
        except TooLarge as exc:
            raise RegistryError(f"{what}: {exc}") from None
        except TRANSIENT as exc:
            raise _Retry(_describe(exc)) from None
        if response.status == 429 or response.status >= 500:
            delay = _retry_after(response)
            response.close()
            raise _Retry(f"registry answered {response.status} {response.reason}", delay)
        if response.status != expect:
            with response:
                self._fail_push(response, what, repository)
        return response

    def _location(self, response: Response, url: str, what: str) -> str:
        location = response.header("Location")
        response.close()
        if not location:
            raise RegistryError(f"{what}: the registry sent no upload location")
        return join_url(url, location)

    def _start_upload(self, repository: str, what: str) -> str:
        url = self.base_url() + f"/v2/{repository}/blobs/uploads/"
        response = self._upload_step("POST", url, repository, what, 202, body=b"")
        return self._location(response, url, what)

    def _close_upload(self, repository: str, location: str, digest: str, data: bytes, what: str) -> None:
        import urllib.parse

        url = location + ("&" if "?" in location else "?") + "digest=" + urllib.parse.quote(digest)
        headers = {"Content-Type": "application/octet-stream"}
        response = self._upload_step("PUT", url, repository, what, 201, headers, data)
        response.close()

    def _upload_chunks(
        self,
        repository: str,
        location: str,
        digest: str,
        size: int,
        open_blob: Callable[[], BinaryIO],
        chunk_size: int,
        what: str,
        on_progress: Callable[[int], None] | None,
        cancel: threading.Event | None,
    ) -> None:
        offset = 0
        with open_blob() as f:
            while True:
                data = f.read(chunk_size)
                if not data:
                    break
                self._check_length(digest, size, max(size, offset + len(data)))
                headers = {
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{offset + len(data) - 1}",
                }
                response = self._upload_step("PATCH", location, repository, what, 202, headers, data)
                location = self._location(response, location, what)
                offset += len(data)
                if on_progress is not None:
                    on_progress(offset)
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
        self._check_length(digest, size, offset)
        self._close_upload(repository, location, digest, b"", what)

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        """PUT a manifest or index, exactly these bytes, under a tag or its digest; its digest."""
        digest = _digest_of(data, "sha256")
        path = f"/v2/{repository}/manifests/{reference}"
        scope = scope_for(repository, "pull,push")
        what = f"pushing manifest {digest} to {self.registry}/{repository}:{reference}"
        headers = {"Content-Type": media_type}
        response = self._retrying(what, lambda: self._request("PUT", path, scope, headers, data))
        with response:
            if response.status not in (200, 201, 202):
                self._fail_push(response, what, repository)
            stored = response.header("Docker-Content-Digest")
        if stored and stored.startswith("sha256:") and stored != digest:
            raise IntegrityError(f"{what}: the registry stored it as {stored}")
        return digest

    def check_login(self) -> None:
        """Make sure the registry accepts the current credentials (`ocibox login`)."""
        path = "/v2/"

        def send() -> Response:
            return self._request("GET", path, "")

        response = self._retrying(f"logging in to {self.registry}", send)
        with response:
            if response.status == 200:
                return
            if response.status == 401:
                raise AuthError(f"login to {self.registry} failed: incorrect username or password")
            self._fail(response, f"registry {self.registry}", "")

    def close(self) -> None:
        self.transport.close()
