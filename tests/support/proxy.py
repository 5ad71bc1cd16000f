"""A fault-injecting HTTP proxy in front of a real registry, for the network-fault tests.

    proxy = FaultProxy(registry.url)     # the `fault_proxy` fixture does this for `registry`
    ocibox("pull", proxy.ref("busybox"))  # 127.0.0.1:PORT/busybox:latest, through the proxy

Requests pass through unchanged (Location headers are rewritten to point back at the proxy)
until a test arms a fault. Faults apply in the order armed, each `times` times (None: forever);
`digest=None` means any blob, `path` is a regular expression searched in the request path.

    proxy.corrupt_blob(digest=None, times=1)           flip one byte in the middle of a blob GET body
                                                       (status and length stay right: only the
                                                       digest check can notice)
    proxy.cut_blob(digest=None, after=1024, times=1)   send the headers and `after` bytes of the
                                                       body (at most all but one), then drop the
                                                       connection
    proxy.fail(status=500, times=1, path="/blobs/",    answer `status` without asking the registry,
               retry_after=None, method=None)          with a Retry-After header if given
    proxy.refuse_range(True)                           ignore Range: always 200 and the whole body,
                                                       no Accept-Ranges header
    proxy.requests                                     every request: method, path, status, range
                                                       header, fault applied (or "")
    proxy.blob_gets(digest=None)                       the GET requests of blobs (of one digest)
    proxy.reset()                                      no faults, no recorded requests
    proxy.stop()                                       stop listening (a registry gone down)
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BLOB_PATH = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
}


@dataclass
class Fault:
    kind: str  # corrupt, cut, fail
    times: int | None = 1
    digest: str | None = None
    path: str | None = None
    method: str | None = None
    status: int = 500
    retry_after: int | str | None = None
    after: int = 1024

    def matches(self, method: str, path: str) -> bool:
        if self.kind in ("corrupt", "cut"):
            m = BLOB_PATH.match(path)
            return method == "GET" and m is not None and self.digest in (None, m["digest"])
        if self.method is not None and method != self.method:
            return False
        return self.path is None or re.search(self.path, path) is not None


@dataclass
class ProxyRequest:
    method: str
    path: str
    status: int
    range: str | None
    fault: str = ""


class FaultProxy:
    """See the module docstring."""

    def __init__(self, upstream: str):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 80
        self.upstream_netloc = parsed.netloc
        self.requests: list[ProxyRequest] = []
        self._faults: list[Fault] = []
        self._refuse_range = False
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, repository: str, tag: str = "latest") -> str:
        return f"{self.host}/{repository}:{tag}"

    # -- arming faults --------------------------------------------------------------------------

    def corrupt_blob(self, digest: str | None = None, times: int | None = 1) -> None:
        self._arm(Fault("corrupt", times, digest=digest))

    def cut_blob(self, digest: str | None = None, after: int = 1024, times: int | None = 1) -> None:
        self._arm(Fault("cut", times, digest=digest, after=after))

    def fail(
        self,
        status: int = 500,
        times: int | None = 1,
        path: str | None = "/blobs/",
        retry_after: int | str | None = None,
        method: str | None = None,
    ) -> None:
        self._arm(Fault("fail", times, path=path, status=status, retry_after=retry_after, method=method))

    def refuse_range(self, refuse: bool = True) -> None:
        self._refuse_range = refuse

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self.requests.clear()
        self._refuse_range = False

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def blob_gets(self, digest: str | None = None) -> list[ProxyRequest]:
        with self._lock:
            found = []
            for r in self.requests:
                m = BLOB_PATH.match(r.path)
                if r.method == "GET" and m and digest in (None, m["digest"]):
                    found.append(r)
            return found

    def _arm(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def _record(self, request: ProxyRequest) -> None:
        with self._lock:
            self.requests.append(request)

    # -- serving --------------------------------------------------------------------------------

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 - http.server's signature
                pass

            def _read_body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = self.headers.get("Content-Length")
                return self.rfile.read(int(length)) if length else None

            def _handle(self) -> None:
                method, path = self.command, self.path
                body = self._read_body()
                range_header = self.headers.get("Range")
                fault = proxy._take_fault(method, urllib.parse.urlsplit(path).path)
                if fault is not None and fault.kind == "fail":
                    # Recorded before answering: a client may look at the log as soon as it has the answer.
                    proxy._record(ProxyRequest(method, path, fault.status, range_header, "fail"))
                    self._send_failure(fault)
                    return
                # A list, not a dict: clients send Accept several times, one media type each.
                dropped = HOP_BY_HOP | {"host", "content-length"}
                if proxy._refuse_range:
                    dropped = dropped | {"range", "if-range"}
                headers = [(k, v) for k, v in self.headers.items() if k.lower() not in dropped]
                headers.append(("Host", proxy.upstream_netloc))
                if body is not None:
                    headers.append(("Content-Length", str(len(body))))
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                    for key, value in headers:
                        conn.putheader(key, value)
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                    self._send_upstream(method, path, resp, data, fault, range_header)
                finally:
                    conn.close()

            def _send_failure(self, fault: Fault) -> None:
                body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected by the fault proxy"}]}'
                if fault.status == 429:
                    body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"injected by the fault proxy"}]}'
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if fault.retry_after is not None:
                    self.send_header("Retry-After", str(fault.retry_after))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _send_upstream(self, method, path, resp, data: bytes, fault, range_header) -> None:
                applied = ""
                if fault is not None and fault.kind == "corrupt" and data:
                    middle = len(data) // 2
                    data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
                    applied = "corrupt"
                self.send_response(resp.status, resp.reason)
                length_sent = False
                for key, value in resp.getheaders():
                    low = key.lower()
                    if low in HOP_BY_HOP:
                        continue
                    if low == "accept-ranges" and proxy._refuse_range:
                        continue
                    if low == "location":
                        value = value.replace(f"//{proxy.upstream_netloc}", f"//{proxy.host}")
                    if low == "content-length":
                        length_sent = True
                        if method != "HEAD":
                            value = str(len(data))
                    self.send_header(key, value)
                if not length_sent:
                    self.send_header("Content-Length", str(len(data)))
                if fault is not None and fault.kind == "cut":
                    applied = "cut"
                    self.send_header("Connection", "close")
                    proxy._record(ProxyRequest(method, path, resp.status, range_header, applied))
                    self.end_headers()
                    self.wfile.write(data[: min(fault.after, max(len(data) - 1, 0))])
                    self.wfile.flush()
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                else:
                    proxy._record(ProxyRequest(method, path, resp.status, range_header, applied))
                    self.end_headers()
                    if method != "HEAD":
                        self.wfile.write(data)

            def _safe_handle(self) -> None:
                try:
                    self._handle()
                except (ConnectionError, BrokenPipeError, TimeoutError, OSError):
                    self.close_connection = True

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _safe_handle

        return Handler
