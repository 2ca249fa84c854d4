"""A fault-injecting HTTP/1.1 reverse proxy for tests against local object stores (stdlib only).

Point the client's ``endpoint_url`` at :attr:`FaultProxy.endpoint_url`; the proxy forwards each
request verbatim (Host header included, so SigV4 signatures stay valid) to the real server, over
one upstream keep-alive connection per client connection. Request and response bodies are relayed
as they stream (Content-Length, chunked, or until close). ``Expect: 100-continue`` is answered by
the proxy itself (that header is not signed) so that it can cut request bodies.

Faults, settable at any time from any thread (decisions come from one seeded RNG)::

    proxy = FaultProxy("127.0.0.1", server_port, seed=1).start()
    proxy.configure(throttle_fraction=0.1, reset_fraction=0.02)   # 503 SlowDown / cut bodies
    proxy.configure(response_reset_fraction=0.1)                   # cut response bodies
    proxy.configure(delay_secs=0.5, bandwidth_bytes_per_sec=50 << 20, deny_all=True)
    proxy.fail_next("POST", "uploadId")                  # CompleteMultipartUpload: one 503
    proxy.fail_next("PUT", "partNumber", times=None)     # every UploadPart: 503 forever
    proxy.fail_next("POST", "uploadId", action="drop_response")  # done upstream, answer lost
    proxy.count("PUT", "partNumber"); proxy.bytes_to_client("/bucket/key")

Error bodies are S3 XML by default; pass ``error_body=`` (e.g. JSON for GCS) to reuse it elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import select
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import BinaryIO
from urllib.parse import parse_qsl, urlsplit

_RELAY_CHUNK_BYTES = 256 * 1024
_MAX_LINE_BYTES = 65_536

ErrorBody = Callable[[int, str], tuple[bytes, str]]  # (status, code) -> (body, content type)


def s3_error_body(status: int, code: str) -> tuple[bytes, str]:
    """An S3-style XML error document."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{code} injected by FaultProxy (HTTP {status})"
        "</Message><RequestId>faultproxy</RequestId></Error>"
    )
    return body.encode(), "application/xml"


@dataclasses.dataclass
class FaultRule:
    """Answer requests matching ``method`` (+ ``query_param`` present, + ``path_contains``) with a
    fault, ``times`` times (None: forever). ``action``: ``"error"`` (answer ``status``/``code``
    without forwarding), ``"reset"`` (cut the connection mid request body),
    ``"drop_response"`` (forward, let the server finish, then cut the connection) or
    ``"response_reset"`` (cut the connection mid response body)."""

    method: str
    query_param: str | None = None
    path_contains: str | None = None
    status: int = 503
    code: str = "SlowDown"
    times: int | None = 1
    action: str = "error"
    fired: int = 0

    def matches(self, method: str, path: str, params: frozenset[str]) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if method != self.method.upper():
            return False
        if self.query_param is not None and self.query_param not in params:
            return False
        return self.path_contains is None or self.path_contains in path


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One request the proxy saw and what it did with it."""

    method: str
    path: str
    params: frozenset[str]
    outcome: str  # forwarded | error <status> | reset | response_reset | dropped

    @property
    def kind(self) -> str:
        """``"PUT ?partNumber&uploadId"``-style label: method plus query parameter names."""
        return f"{self.method} ?{'&'.join(sorted(self.params))}" if self.params else self.method


@dataclasses.dataclass
class _Settings:
    throttle_fraction: float = 0.0
    reset_fraction: float = 0.0
    response_reset_fraction: float = 0.0
    delay_secs: float = 0.0
    deny_all: bool = False
    bandwidth_bytes_per_sec: float | None = None


_OUTCOMES = {
    "forward": "forwarded",
    "reset": "reset",
    "drop_response": "dropped",
    "response_reset": "response_reset",
}


class _Reset(Exception):
    """Internal: cut the client connection now (with a TCP RST)."""


class _Pacer:
    """Keeps one connection's throughput under a bytes/sec cap (None: no cap)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    def account(self, n: int) -> None:
        if not self.rate:
            return
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


@dataclasses.dataclass
class _Request:
    method: str
    target: str
    head: bytes  # request line + headers (Expect removed), ready to forward
    headers: dict[str, str]
    expect_continue: bool

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def params(self) -> frozenset[str]:
        return frozenset(
            k for k, _ in parse_qsl(urlsplit(self.target).query, keep_blank_values=True)
        )

    @property
    def has_body(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower() or (
            int(self.headers.get("content-length", "0") or 0) > 0
        )


def _read_head(rfile: BinaryIO) -> tuple[bytes, list[bytes]] | None:
    """First line and header lines (raw, CRLF included) of a message; None at a clean EOF."""
    first = rfile.readline(_MAX_LINE_BYTES)
    if not first:
        return None
    lines: list[bytes] = []
    while True:
        line = rfile.readline(_MAX_LINE_BYTES)
        if not line:
            raise ConnectionError("connection closed inside a message head")
        if line in (b"\r\n", b"\n"):
            return first, lines
        lines.append(line)


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def _relay_body(
    rfile: BinaryIO,
    headers: dict[str, str],
    write: Callable[[bytes], None],
    *,
    until_close: bool = False,
    cut_after: int | None = None,
    on_payload: Callable[[int], None] | None = None,
) -> int:
    """Copy one message body from ``rfile`` to ``write`` using its framing (chunk framing is
    copied as is). With ``cut_after``, stop once that many payload bytes went and raise _Reset.
    ``on_payload(n)`` is told about payload bytes (framing excluded) before they are written.
    Returns the payload bytes relayed."""
    relayed = 0

    def take(n: int) -> None:
        nonlocal relayed
        while n > 0:
            want = min(n, _RELAY_CHUNK_BYTES)
            if cut_after is not None:
                want = min(want, max(cut_after - relayed, 0))
                if want == 0:
                    raise _Reset()
            data = rfile.read(want)
            if not data:
                raise ConnectionError("peer closed inside a message body")
            if on_payload is not None:
                on_payload(len(data))
            write(data)
            relayed += len(data)
            n -= len(data)

    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = rfile.readline(_MAX_LINE_BYTES)
            if not size_line:
                raise ConnectionError("peer closed inside a chunked body")
            write(size_line)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the final CRLF
                    trailer = rfile.readline(_MAX_LINE_BYTES)
                    write(trailer)
                    if trailer in (b"\r\n", b"\n", b""):
                        return relayed
            take(size)
            write(rfile.readline(_MAX_LINE_BYTES))  # CRLF after the chunk data
    if "content-length" in headers:
        take(int(headers["content-length"]))
        return relayed
    if until_close:
        while True:
            data = (
                rfile.read1(_RELAY_CHUNK_BYTES)
                if hasattr(rfile, "read1")
                else rfile.read(_RELAY_CHUNK_BYTES)
            )
            if not data:
                return relayed
            if on_payload is not None:
                on_payload(len(data))
            write(data)
            relayed += len(data)
    return relayed


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), like a crashed peer or a dropped connection."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """The proxy: see the module docstring. Thread-safe; use as a context manager or
    ``start()`` / ``stop()``."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        seed: int = 0,
        listen_host: str = "127.0.0.1",
        error_body: ErrorBody = s3_error_body,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listen_host = listen_host
        self._error_body = error_body
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._settings = _Settings()
        self._rules: list[FaultRule] = []
        self._records: list[RequestRecord] = []
        self._bytes_to_client: Counter[str] = Counter()
        self._sockets: set[socket.socket] = set()
        self.errors: list[BaseException] = []  # unexpected proxy failures, for debugging
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        """Listen on a free port and serve in background threads."""
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve_connection(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            block_on_close = False

        self._server = Server((self._listen_host, 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="faultproxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.server_address[1])

    @property
    def endpoint_url(self) -> str:
        return f"http://{self._listen_host}:{self.port}"

    # --- controls -------------------------------------------------------------------------
    def configure(
        self,
        *,
        throttle_fraction: float | None = None,
        reset_fraction: float | None = None,
        response_reset_fraction: float | None = None,
        delay_secs: float | None = None,
        deny_all: bool | None = None,
        bandwidth_bytes_per_sec: float | None = None,
        seed: int | None = None,
    ) -> None:
        """Change fault settings; arguments left None keep their value. Fractions apply per
        request: ``throttle_fraction`` answers 503 SlowDown, ``reset_fraction`` cuts the
        connection mid request body, ``response_reset_fraction`` mid response body.
        ``bandwidth_bytes_per_sec`` caps each new connection (0 removes the cap)."""
        with self._lock:
            s = self._settings
            for name, value in (
                ("throttle_fraction", throttle_fraction),
                ("reset_fraction", reset_fraction),
                ("response_reset_fraction", response_reset_fraction),
            ):
                if value is not None:
                    if not 0.0 <= value <= 1.0:
                        raise ValueError(f"{name} must be within [0, 1], got {value}")
                    setattr(s, name, value)
            if delay_secs is not None:
                s.delay_secs = delay_secs
            if deny_all is not None:
                s.deny_all = deny_all
            if bandwidth_bytes_per_sec is not None:
                s.bandwidth_bytes_per_sec = bandwidth_bytes_per_sec or None
            if seed is not None:
                self._rng.seed(seed)

    def fail_next(
        self,
        method: str,
        query_param: str | None = None,
        *,
        path_contains: str | None = None,
        status: int = 503,
        code: str = "SlowDown",
        times: int | None = 1,
        action: str = "error",
    ) -> FaultRule:
        """Add a :class:`FaultRule` (checked in order, before the random faults)."""
        if action not in ("error", "reset", "drop_response", "response_reset"):
            raise ValueError(f"unknown action {action!r}")
        rule = FaultRule(method.upper(), query_param, path_contains, status, code, times, action)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_faults(self) -> None:
        """Remove every rule and random fault (counters are kept)."""
        with self._lock:
            self._rules.clear()
            self._settings = _Settings()

    def reset_counters(self) -> None:
        with self._lock:
            self._records.clear()
            self._bytes_to_client.clear()

    # --- counters -------------------------------------------------------------------------
    @property
    def requests(self) -> list[RequestRecord]:
        """Every request seen since the last :meth:`reset_counters`, in arrival order."""
        with self._lock:
            return list(self._records)

    def count(
        self,
        method: str | None = None,
        query_param: str | None = None,
        *,
        outcome: str | None = None,
    ) -> int:
        """Requests seen with this method / query parameter / outcome (None: any)."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method.upper())
            and (query_param is None or query_param in r.params)
            and (outcome is None or r.outcome == outcome)
        )

    def counts_by_kind(self) -> Counter[str]:
        return Counter(r.kind for r in self.requests)

    def bytes_to_client(self, path: str | None = None) -> int:
        """Response body bytes (payload, not chunk framing) sent to clients, for one path or
        in total; a path is the URL path without the query, e.g. ``/bucket/key``."""
        with self._lock:
            if path is None:
                return sum(self._bytes_to_client.values())
            return self._bytes_to_client[path]

    def bytes_to_client_by_path(self) -> dict[str, int]:
        with self._lock:
            return dict(self._bytes_to_client)

    # --- serving --------------------------------------------------------------------------
    def _decide(self, req: _Request) -> tuple[str, FaultRule | None, _Settings, float]:
        """(action, rule, settings snapshot, cut fraction) for one request; records it."""
        action, rule, settings, fraction = self._draw(req)
        if action in ("deny", "throttle", "error"):
            status = 403 if action == "deny" else 503 if action == "throttle" else rule.status  # type: ignore[union-attr]
            outcome = f"error {status}"
        else:
            outcome = _OUTCOMES[action]
        # Recorded before anything is answered, so a client that got its answer sees it counted.
        with self._lock:
            self._records.append(RequestRecord(req.method, req.path, req.params, outcome))
        return action, rule, settings, fraction

    def _draw(self, req: _Request) -> tuple[str, FaultRule | None, _Settings, float]:
        with self._lock:
            settings = dataclasses.replace(self._settings)
            if settings.deny_all:
                return "deny", None, settings, 0.0
            for rule in self._rules:
                if rule.matches(req.method, req.path, req.params):
                    rule.fired += 1
                    return rule.action, rule, settings, self._rng.random()
            draw = self._rng.random()
            if draw < settings.throttle_fraction:
                return "throttle", None, settings, 0.0
            if draw < settings.throttle_fraction + settings.reset_fraction:
                return "reset", None, settings, self._rng.random()
            if settings.response_reset_fraction and (
                self._rng.random() < settings.response_reset_fraction
            ):
                return "response_reset", None, settings, self._rng.random()
            return "forward", None, settings, 0.0

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._sockets.add(sock)
            else:
                self._sockets.discard(sock)

    def _serve_connection(self, client: socket.socket) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._track(client, True)
        upstream: _Upstream | None = None
        rfile = client.makefile("rb")
        with self._lock:
            pacer = _Pacer(self._settings.bandwidth_bytes_per_sec)

        def to_client(data: bytes) -> None:
            client.sendall(data)
            pacer.account(len(data))

        try:
            while True:
                req = self._read_request(rfile)
                if req is None:
                    return
                action, rule, settings, fraction = self._decide(req)
                if action in ("deny", "throttle", "error"):
                    status, code = (
                        (403, "AccessDenied")
                        if action == "deny"
                        else (503, "SlowDown")
                        if action == "throttle"
                        else (rule.status, rule.code)  # type: ignore[union-attr]
                    )
                    if not self._answer_error(client, rfile, req, status, code):
                        return
                    continue
                if action == "reset":
                    self._cut_request(client, rfile, req, fraction)
                    return
                if upstream is None:
                    upstream = _Upstream(self.upstream, self._track)
                keep_alive = self._forward(
                    req, rfile, to_client, upstream, pacer, action, fraction, settings
                )
                if not keep_alive:
                    return
        except _Reset:
            _reset(client)
        except (ConnectionError, TimeoutError, OSError):
            pass  # a peer went away: nothing to relay any more
        except Exception as e:  # pragma: no cover - proxy bug; kept for the test to inspect
            self.errors.append(e)
        finally:
            with contextlib.suppress(OSError):
                rfile.close()
            with contextlib.suppress(OSError):
                client.close()
            self._track(client, False)
            if upstream is not None:
                upstream.close()

    def _read_request(self, rfile: BinaryIO) -> _Request | None:
        head = _read_head(rfile)
        if head is None:
            return None
        first, lines = head
        method, target, _ = first.decode("latin-1").split(" ", 2)
        headers = _parse_headers(lines)
        expect = headers.get("expect", "").lower() == "100-continue"
        kept = [line for line in lines if not line.lower().startswith(b"expect:")]
        return _Request(method.upper(), target, first + b"".join(kept) + b"\r\n", headers, expect)

    def _answer_error(
        self, client: socket.socket, rfile: BinaryIO, req: _Request, status: int, code: str
    ) -> bool:
        """Answer with an error document; True if the connection stays usable."""
        body, content_type = self._error_body(status, code)
        # With Expect: 100-continue the client waits and sends no body after a final answer,
        # so the connection is closed after it; otherwise the body is read and dropped.
        keep_alive = not req.expect_continue
        if keep_alive and req.has_body:
            _relay_body(rfile, req.headers, lambda _data: None)
        head = (
            f"HTTP/1.1 {status} {code}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {0 if req.method == 'HEAD' else len(body)}\r\n"
            f"x-amz-request-id: faultproxy\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        ).encode("latin-1")
        client.sendall(head if req.method == "HEAD" else head + body)
        return keep_alive

    def _cut_request(
        self, client: socket.socket, rfile: BinaryIO, req: _Request, fraction: float
    ) -> None:
        """Read part of the request body (if any), then reset the connection."""
        if req.has_body:
            if req.expect_continue:
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            length = int(req.headers.get("content-length", "0") or 0)
            with contextlib.suppress(_Reset, ConnectionError, OSError):
                _relay_body(rfile, req.headers, lambda _d: None, cut_after=int(length * fraction))
        raise _Reset()

    def _forward(
        self,
        req: _Request,
        rfile: BinaryIO,
        to_client: Callable[[bytes], None],
        upstream: _Upstream,
        pacer: _Pacer,
        action: str,
        fraction: float,
        settings: _Settings,
    ) -> bool:
        """Relay one request and its response; True if both connections stay usable."""
        up_sock, up_rfile = upstream.connect()
        up_sock.sendall(req.head)
        if req.has_body:
            if req.expect_continue:
                to_client(b"HTTP/1.1 100 Continue\r\n\r\n")

            def to_upstream(data: bytes) -> None:
                up_sock.sendall(data)
                pacer.account(len(data))

            _relay_body(rfile, req.headers, to_upstream)
        while True:  # skip interim 1xx answers
            head = _read_head(up_rfile)
            if head is None:
                raise ConnectionError("upstream closed before answering")
            status_line, lines = head
            status = int(status_line.split(b" ", 2)[1])
            if status >= 200 or status == 101:
                break
        headers = _parse_headers(lines)
        no_body = req.method == "HEAD" or status in (204, 304)
        framed = "chunked" in headers.get("transfer-encoding", "").lower() or (
            "content-length" in headers
        )
        close = (
            headers.get("connection", "").lower() == "close"
            or req.headers.get("connection", "").lower() == "close"
            or (not no_body and not framed)
        )
        if action == "drop_response":
            if not no_body:
                _relay_body(up_rfile, headers, lambda _d: None, until_close=not framed)
            if close:
                upstream.close()
            raise _Reset()
        if settings.delay_secs:
            time.sleep(settings.delay_secs)
        to_client(status_line + b"".join(lines) + b"\r\n")
        cut_after = None
        if action == "response_reset" and not no_body:
            cut_after = int(int(headers.get("content-length", "0") or 0) * fraction)
        path = req.path

        def count(n: int) -> None:
            with self._lock:  # counted before sending, so the client never sees it uncounted
                self._bytes_to_client[path] += n

        try:
            if not no_body:
                _relay_body(
                    up_rfile,
                    headers,
                    to_client,
                    until_close=not framed,
                    cut_after=cut_after,
                    on_payload=count,
                )
        except _Reset:
            upstream.close()
            raise
        if close:
            upstream.close()
        return not close


class _Upstream:
    """The proxy's connection to the real server for one client connection, reopened on demand."""

    def __init__(
        self, address: tuple[str, int], track: Callable[[socket.socket, bool], None]
    ) -> None:
        self._address = address
        self._track = track
        self._sock: socket.socket | None = None
        self._rfile: BinaryIO | None = None

    def connect(self) -> tuple[socket.socket, BinaryIO]:
        if self._sock is not None and select.select([self._sock], [], [], 0)[0]:
            self.close()  # idle keep-alive connection closed by the server: reopen
        if self._sock is None or self._rfile is None:
            sock = socket.create_connection(self._address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._track(sock, True)
            self._sock, self._rfile = sock, sock.makefile("rb")
        return self._sock, self._rfile

    def close(self) -> None:
        if self._sock is not None:
            self._track(self._sock, False)
            with contextlib.suppress(OSError):
                self._rfile.close()  # type: ignore[union-attr]
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = self._rfile = None
