"""HTTP/1.1 for the registry client: persistent connections, TLS, redirects, big streaming reads.

A small client on `socket` and `ssl` rather than http.client: http.client pulls in the email
package and friends, about 50 ms of imports on a cold page cache for a command that is over in
a few hundred, and its buffered reader adds a copy. What it needs of HTTP/1.1 is little: one
request at a time per connection, Content-Length or chunked bodies, keep-alive, redirects.

One connection per (thread, scheme, host); TLS verified by default, unverified (and plain HTTP)
only for hosts the caller allows; Authorization dropped when a redirect leads to another host.
HTTPS_PROXY / HTTP_PROXY / NO_PROXY are honoured as Go programs (docker, skopeo) do: CONNECT
tunnels for TLS, absolute-form requests for plain HTTP, loopback hosts never proxied.
"""

from __future__ import annotations

import base64
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

MAX_HEAD = 64 << 10  # status line and headers
MAX_REDIRECTS = 10
USER_AGENT = "ocibox"


class ProtocolError(Exception):
    """The peer broke HTTP (bad status line, truncated body) or closed the connection early."""


class Disconnected(ProtocolError, ConnectionError):
    """The connection closed before a complete answer: worth a retry."""


class TooLarge(Exception):
    """An answer bigger than the caller accepts (a manifest over 4 MiB)."""


class Untrusted(Exception):
    """TLS certificate verification failed: no retry will fix it."""


class ProxyError(Exception):
    """The proxy is misconfigured or refused to open a tunnel."""


class RedirectError(Exception):
    """A redirect ocibox will not follow (loop, other scheme, TLS to plain HTTP)."""


def split_url(url: str) -> tuple[str, str, str]:
    """`https://host:5000/v2/x?y` → ("https", "host:5000", "/v2/x?y")."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not an absolute URL: {url!r}")
    rest = rest.split("#", 1)[0]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, path = rest[:cut], rest[cut:]
    if not path.startswith("/"):
        path = "/" + path
    return scheme.lower(), netloc, path


def join_url(base: str, location: str) -> str:
    """Resolve a Location header against the URL that answered it."""
    if "://" in location.split("?", 1)[0]:
        return location
    scheme, netloc, path = split_url(base)
    if location.startswith("//"):
        return f"{scheme}:{location}"
    if location.startswith("/"):
        return f"{scheme}://{netloc}{location}"
    directory = path.split("?", 1)[0].rsplit("/", 1)[0]
    return f"{scheme}://{netloc}{directory}/{location}"


def hostname(netloc: str) -> str:
    """`host:5000` → `host`, `[::1]:5000` → `::1`, `user@host` → `host`."""
    netloc = netloc.rpartition("@")[2]
    if netloc.startswith("["):
        return netloc[1:].split("]", 1)[0]
    if netloc.count(":") == 1:
        return netloc.split(":", 1)[0]
    return netloc


def _host_port(netloc: str, scheme: str) -> tuple[str, int]:
    name = hostname(netloc)
    tail = netloc.rpartition("]")[2] if netloc.startswith("[") else netloc
    port_text = tail.rpartition(":")[2] if ":" in tail else ""
    if port_text:
        if not port_text.isdigit():
            raise ValueError(f"bad port in {netloc!r}")
        return name, int(port_text)
    return name, 443 if scheme == "https" else 80


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 and ::1 (with or without a port)."""
    name = hostname(host).lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "127" and all(p.isdigit() and int(p) < 256 for p in parts):
        return True
    if ":" in name:
        try:
            return socket.inet_pton(socket.AF_INET6, name) == socket.inet_pton(socket.AF_INET6, "::1")
        except OSError:
            return False
    return False


@dataclass(frozen=True)
class Proxy:
    netloc: str  # host:port of an HTTP proxy
    authorization: str | None = None  # Proxy-Authorization, from user:password in its URL


def proxy_for(scheme: str, netloc: str, env: Mapping[str, str]) -> Proxy | None:
    """The proxy the environment names for `scheme://netloc`, or None (NO_PROXY, loopback, unset)."""
    if is_loopback(netloc):
        return None
    host = hostname(netloc).lower()
    port = str(_host_port(netloc, scheme)[1])
    for entry in (env.get("NO_PROXY") or env.get("no_proxy") or "").split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return None
        if "/" in entry and _in_network(host, entry):
            return None
        name = hostname(entry).removeprefix("*").lstrip(".")
        entry_port = entry.rpartition(":")[2] if entry.count(":") == 1 else ""
        if entry_port and entry_port != port:
            continue
        if host == name or host.endswith("." + name):
            return None
    names = ("HTTPS_PROXY", "https_proxy") if scheme == "https" else ("HTTP_PROXY", "http_proxy")
    url = next((env[n] for n in names if env.get(n)), "")
    if not url:
        return None
    if "://" not in url:
        url = "http://" + url
    proxy_scheme, proxy_netloc, _ = split_url(url)
    if proxy_scheme != "http":
        raise ProxyError(f"unsupported proxy {url!r}: only http:// proxies are supported")
    userinfo, at, where = proxy_netloc.rpartition("@")
    authorization = None
    if at:
        import urllib.parse

        credentials = urllib.parse.unquote(userinfo).encode()
        authorization = "Basic " + base64.b64encode(credentials).decode()
    return Proxy(where, authorization)


def _in_network(host: str, cidr: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


class Connection:
    """One socket and the bytes already received past the last answer's head."""

    def __init__(
        self,
        scheme: str,
        netloc: str,
        timeout: float,
        context: ssl.SSLContext | None,
        proxy: Proxy | None = None,
    ):
        host, port = _host_port(netloc, scheme)
        address = _host_port(proxy.netloc, "http") if proxy else (host, port)
        sock = socket.create_connection(address, timeout=timeout)
        self.sock = sock
        self.pending = bytearray()
        self.proxy = proxy if scheme == "http" else None  # plain HTTP through a proxy: absolute-form
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if proxy is not None and scheme == "https":
                self._tunnel(netloc, host, port, proxy)
            if context is not None:
                import ssl

                try:
                    sock = context.wrap_socket(sock, server_hostname=host)
                except ssl.SSLCertVerificationError as exc:
                    reason = exc.verify_message
                    raise Untrusted(f"TLS certificate of {netloc} not trusted ({reason})") from None
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.used = False  # has answered at least once (then a reset may just be keep-alive expiry)
        self.busy = False

    def _tunnel(self, netloc: str, host: str, port: int, proxy: Proxy) -> None:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", f"User-Agent: {USER_AGENT}"]
        if proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        status_line = self.read_head().split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] != "200":
            raise ProxyError(f"proxy {proxy.netloc} refused a tunnel to {netloc}: {status_line[:80]}")
        self.pending.clear()

    def close(self) -> None:
        self.sock.close()

    def read_head(self) -> bytes:
        while True:
            end = self.pending.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.pending[: end + 4])
                del self.pending[: end + 4]
                return head
            if len(self.pending) > MAX_HEAD:
                raise ProtocolError("answer headers too large")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Disconnected("connection closed before an answer")
            self.pending += chunk

    def recv_into(self, view: memoryview) -> int:
        """Up to len(view) bytes: leftovers first, then one read from the socket."""
        if self.pending:
            n = min(len(view), len(self.pending))
            view[:n] = self.pending[:n]
            del self.pending[:n]
            return n
        return self.sock.recv_into(view)

    def read_line(self) -> bytes:
        while True:
            end = self.pending.find(b"\r\n")
            if end >= 0:
                line = bytes(self.pending[:end])
                del self.pending[: end + 2]
                return line
            if len(self.pending) > MAX_HEAD:
                raise ProtocolError("chunk header too large")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Disconnected("connection closed inside a chunked answer")
            self.pending += chunk


class Response:
    """An answer whose body the caller reads (`readinto`, `read_all`); `close` frees the connection."""

    def __init__(self, transport: Transport, key: tuple[str, str], conn: Connection, url: str, method: str):
        self._transport = transport
        self._key = key
        self._conn: Connection | None = conn
        self.url = url
        head = conn.read_head().decode("latin-1")
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP answer: {lines[0][:80]!r}")
        self.version = parts[0]
        self.status = int(parts[1])
        self.reason = parts[2] if len(parts) > 2 else ""
        self._headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                self._headers.append((name.strip().lower(), value.strip()))
        self.data = b""  # the body, for answers read whole (manifests)
        self.length: int | None = None  # body bytes still to come (None: chunked or until close)
        self._chunked = False
        self._chunk_left = 0
        self._error: BaseException | None = None
        self._keep_alive = self.version != "HTTP/1.0"
        connection = (self.header("Connection") or "").lower()
        if "close" in connection:
            self._keep_alive = False
        elif "keep-alive" in connection:
            self._keep_alive = True
        if method == "HEAD" or self.status in (204, 304) or 100 <= self.status < 200:
            self.length = 0
        elif "chunked" in (self.header("Transfer-Encoding") or "").lower():
            self._chunked = True
        elif (length := self.header("Content-Length")) is not None:
            if not length.strip().isdigit():
                raise ProtocolError(f"bad Content-Length {length!r}")
            self.length = int(length)
        else:
            self._keep_alive = False  # the body ends when the server closes
        if self.length == 0:
            self._done()

    # -- headers
    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self._headers:
            if key == name:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self._headers if key == name]

    # -- body
    @property
    def complete(self) -> bool:
        return self._conn is None

    def readinto(self, view: memoryview) -> int:
        """Fill as much of `view` as the body has, reading until it is full or the body ends.

        Raises Disconnected when the connection drops before the body's announced end."""
        if self._error is not None:
            raise self._error
        total = 0
        while total < len(view) and self._conn is not None:
            try:
                n = self._read_some(view[total:])
            except (OSError, ProtocolError) as exc:
                if not total:
                    raise
                self._error = exc  # hand over what arrived; the failure comes with the next read
                break
            if n == 0:
                break
            total += n
        return total

    def _read_some(self, view: memoryview) -> int:
        conn = self._conn
        if conn is None:
            return 0
        if self._chunked:
            if self._chunk_left == 0:
                size_line = conn.read_line().split(b";", 1)[0].strip()
                try:
                    self._chunk_left = int(size_line, 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {size_line[:20]!r}") from None
                if self._chunk_left == 0:
                    while conn.read_line():  # trailers, then the empty line
                        pass
                    self._done()
                    return 0
            want = min(len(view), self._chunk_left)
            n = conn.recv_into(view[:want])
            if n == 0:
                raise Disconnected("connection closed inside a chunked answer")
            self._chunk_left -= n
            if self._chunk_left == 0:
                conn.read_line()  # the CRLF after the chunk's data
            return n
        want = len(view) if self.length is None else min(len(view), self.length)
        n = conn.recv_into(view[:want])
        if n == 0:
            if self.length is None:
                self._done()
                return 0
            raise Disconnected(f"connection closed with {self.length} bytes of the answer missing")
        if self.length is not None:
            self.length -= n
            if self.length == 0:
                self._done()
        return n

    def read_all(self, limit: int) -> bytes:
        """The whole body, refusing more than `limit` bytes (ProtocolError)."""
        if self.length is not None and self.length > limit:
            self.abort()
            raise TooLarge(f"answer from {self.url} too large ({self.length} bytes)")
        out = bytearray()
        buffer = memoryview(bytearray(min(limit + 1, 1 << 16) if self.length is None else self.length + 1))
        while self._conn is not None:
            n = self._read_some(buffer)
            if n == 0:
                break
            out += buffer[:n]
            if len(out) > limit:
                self.abort()
                raise TooLarge(f"answer from {self.url} too large (more than {limit} bytes)")
        return bytes(out)

    def _done(self) -> None:
        """The body is complete: the connection goes back to the pool (or closes)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.busy = False
        if not self._keep_alive:
            self._transport.drop(self._key, conn)

    def close(self) -> None:
        """Done with the answer: a small unread rest is drained to keep the connection, else it drops."""
        if self._conn is None:
            return
        if self.length is not None and self.length <= 65536:
            try:
                self.read_all(65536)
                return
            except (OSError, ProtocolError, TooLarge):
                pass
        self.abort()

    def abort(self) -> None:
        """Drop the connection under this answer (it can't be reused mid-body)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._transport.drop(self._key, conn)

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transport:
    """Requests over keep-alive connections, one per (thread, scheme, host)."""

    def __init__(self, insecure_hosts=(), timeout: float = 60.0, env: Mapping[str, str] | None = None):
        self.insecure_hosts = frozenset(insecure_hosts)
        self.timeout = timeout
        self.env = os.environ if env is None else env
        self._local = threading.local()
        self._contexts: dict[bool, ssl.SSLContext] = {}  # made on first use: loading CAs takes 40 ms
        self._all: list[Connection] = []
        self._lock = threading.Lock()

    def allows_plain_http(self, host: str) -> bool:
        """Plain HTTP and unverified TLS: loopback hosts and the ones the user named insecure."""
        return is_loopback(host) or host in self.insecure_hosts or hostname(host) in self.insecure_hosts

    def _pool(self) -> dict[tuple[str, str], Connection]:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        return pool

    def _tls_context(self, verify: bool) -> ssl.SSLContext:
        import ssl

        with self._lock:
            context = self._contexts.get(verify)
            if context is None:
                context = ssl.create_default_context()
                if not verify:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                self._contexts[verify] = context
            return context

    def _connection(self, key: tuple[str, str]) -> Connection:
        pool = self._pool()
        conn = pool.get(key)
        if conn is not None and conn.busy:  # an unfinished answer holds it: start another
            self.drop(key, conn)
            conn = None
        if conn is None:
            scheme, netloc = key
            if scheme not in ("http", "https"):
                raise ValueError(f"unsupported URL scheme {scheme!r}")
            context = None
            if scheme == "https":
                context = self._tls_context(verify=not self.allows_plain_http(netloc))
            proxy = proxy_for(scheme, netloc, self.env)
            conn = Connection(scheme, netloc, self.timeout, context, proxy)
            pool[key] = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def drop(self, key: tuple[str, str], conn: Connection | None = None) -> None:
        pool = self._pool()
        if conn is None or pool.get(key) is conn:
            conn = pool.pop(key, conn)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()

    def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        follow_redirects: bool = True,
    ) -> Response:
        """Send one request (following redirects); the caller reads and closes the answer."""
        headers = dict(headers or {})
        for _ in range(MAX_REDIRECTS + 1):
            response = self._send(method, url, headers, body)
            location = response.header("Location")
            if not follow_redirects or response.status not in (301, 302, 303, 307, 308) or not location:
                return response
            response.close()
            target = join_url(url, location)
            old, new = split_url(url), split_url(target)
            if new[0] not in ("http", "https"):
                raise RedirectError(f"{old[1]} redirected to an unsupported URL {target!r}")
            if old[0] == "https" and new[0] == "http" and not self.allows_plain_http(new[1]):
                raise RedirectError(f"{old[1]} redirected to plain HTTP ({new[1]}): refused")
            if new[1] != old[1]:
                headers.pop("Authorization", None)
            if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                method, body = "GET", None
                headers.pop("Content-Type", None)
            url = target
        raise RedirectError(f"too many redirects fetching {url}")

    def _send(self, method: str, url: str, headers: dict[str, str], body: bytes | None) -> Response:
        scheme, netloc, path = split_url(url)
        key = (scheme, netloc)
        lines = [f"Host: {netloc}", f"User-Agent: {USER_AGENT}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}")
        for attempt in (1, 2):
            conn = self._connection(key)
            reused = conn.used
            target = path
            extra = []
            if conn.proxy is not None:  # plain HTTP through a proxy: the absolute URL, its credentials
                target = f"{scheme}://{netloc}{path}"
                if conn.proxy.authorization:
                    extra = [f"Proxy-Authorization: {conn.proxy.authorization}"]
            head = "\r\n".join([f"{method} {target} HTTP/1.1", *lines, *extra]) + "\r\n\r\n"
            request = head.encode("latin-1") + (body or b"")
            try:
                conn.busy = True
                conn.sock.sendall(request)
                response = Response(self, key, conn, url, method)
            except (Disconnected, ConnectionResetError, BrokenPipeError):
                # A keep-alive connection the server closed while idle: reconnect once.
                self.drop(key, conn)
                if reused and attempt == 1:
                    continue
                raise
            except BaseException:
                self.drop(key, conn)
                raise
            conn.used = True
            return response
        raise AssertionError("unreachable")
