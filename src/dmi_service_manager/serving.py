"""The HTTP server around the app: uvicorn, with the limits that keep refused hosts from taking it down.

uvicorn's httptools protocol buffers a request's headers without limit and waits for them without a
deadline, and answers a request it cannot parse in plain text. The event loop here (asyncio's, see
`uvicorn_settings` for why) answers a host that IP_WHITELIST refuses with a 403 in the accept loop itself,
before reading its request (a trusted proxy or loopback gets as far as the request, where the full access
rule applies), and out of descriptors it pauses accepting and says so once. The protocol, per connection:
- caps the bytes and the count of a request's head and trailers (431), and gives the head a deadline
  from its first byte (408); a head with several Host headers is refused (400);
- caps the requests pipelined behind one not yet answered: a client that sends more is disconnected;
- cuts a body that stops arriving for BODY_IDLE_SECONDS (408), as nginx's client_body_timeout does; a slow
  body that keeps moving, or one the server itself has stopped reading, is never cut;
- answers every request it cannot parse with the usual JSON error body;
- answers a request sent whole before the client half-closed the connection, then closes it.
The process's descriptor limit is raised to its hard limit at start-up, and the limits are logged.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource
import socket
import time
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from .access import AccessPolicy
from .errors import AnswerCut

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024  # request line and headers together
MAX_HEADERS = 100
HEAD_SECONDS = 10.0  # from a request's first byte to the end of its headers
BODY_IDLE_SECONDS = 30.0  # between two reads of a request's body
MAX_PIPELINED = 32  # requests a client may send ahead of the answers (browsers send none)
ACCEPT_PAUSE_SECONDS = 1.0  # out of descriptors: how long accepting waits before it tries again
LINGER_SECONDS = 2.0  # how long a refused host's connection is read (and dropped) after its 403
LINGER_BYTES = 64 * 1024  # and at most how much of what it sends
MAX_LINGERING = 256  # refused connections lingering at once (at most an eighth of the open-file limit)
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

# Set by the app factory in each worker process, before the server accepts connections.
_policy: AccessPolicy | None = None


def use_policy(policy: AccessPolicy) -> None:
    global _policy
    _policy = policy


class _DropCutAnswers(logging.Filter):
    """uvicorn logs a traceback for every exception out of the app; an AnswerCut was logged, in one line,
    where it happened, and closing the connection (which uvicorn does) is all there is to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], AnswerCut))


def quiet_logs() -> None:
    """What the log leaves out: answers cut on purpose, and python-multipart's warning for each body it
    refuses (the client gets that reason in its 400; logged too, any client could write a line per request).
    Called in each worker once uvicorn has set up its logging, which would replace an earlier filter."""
    server_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropCutAnswers) for f in server_log.filters):
        server_log.addFilter(_DropCutAnswers())
    logging.getLogger("python_multipart").setLevel(logging.ERROR)


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one; returns (soft, hard) as they now are."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


_STOPPED = "the server stopped before it could answer; send the request again"
_STOPPING = json.dumps({"status": "error", "message": _STOPPED, "reason": _STOPPED}).encode()


def _error(status: int, reason: bytes, message: str) -> bytes:
    body = json.dumps({"status": "error", "message": message, "reason": message}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason, len(body))) + body


class GuardedEventLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop, accepting as a server under a connection flood must.

    asyncio accepts up to `backlog` (here 4,096) connections per wake-up and lets their protocols see
    them only afterwards: a burst from a refused host could take every descriptor before one of its
    connections was dropped. Here a refused peer is answered 403 before the next accept, with no protocol,
    task or buffer. Out of descriptors, asyncio logs a traceback for each of the wake-up's remaining tries
    (tens of MB a second); here accepting pauses for a second, with one warning a minute."""

    _warned_at = 0.0
    _refused_said_at = 0.0
    _refused = 0  # connections refused since the log last said so
    _lingering = 0

    def _accept_connection(self, protocol_factory: Any, sock: socket.socket, sslcontext: Any = None,
                           server: Any = None, backlog: int = 100, *timeouts: Any) -> None:
        # The signature and the calls below are asyncio's own from 3.11 to 3.13 (timeouts: the TLS
        # handshake's and shutdown's, passed through).
        for _ in range(backlog):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                self._pause_accepting(exc, protocol_factory, sock, sslcontext, server, backlog, *timeouts)
                return
            peer = address[0] if isinstance(address, tuple) else ""
            if _policy is not None and not _policy.may_connect(str(peer)):
                self._refuse(conn, str(peer))
                continue
            conn.setblocking(False)
            accept = self._accept_connection2(  # type: ignore[attr-defined]
                protocol_factory, conn, {"peername": address}, sslcontext, server, *timeouts)
            self.create_task(accept)

    def _refuse(self, conn: socket.socket, peer: str) -> None:
        """The original's answer to a host outside IP_WHITELIST, a 403 (4CAT tells its admin "no access"
        on it), sent as soon as the connection is accepted, unasked: nothing of the request is parsed or
        kept. The connection then lingers a moment, its input read and dropped, since closing a socket with
        unread input resets the connection, and a reset can destroy the 403 before the client reads it.
        Lingering connections are capped; past the cap (a flood) they close at once."""
        self._refused += 1
        if time.monotonic() - self._refused_said_at > 60:
            self._refused_said_at = time.monotonic()
            log.warning("refused %d connection(s) from hosts outside IP_WHITELIST, the latest from %s",
                        self._refused, peer)
            self._refused = 0
        try:
            conn.setblocking(False)
            conn.send(_error(403, b"Forbidden", f"{peer} may not use this server"))
            conn.shutdown(socket.SHUT_WR)
        except OSError:  # gone already, or its buffer full (not a client waiting for an answer)
            conn.close()
            return
        cap = min(MAX_LINGERING, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 8)
        if self._lingering >= cap:
            conn.close()
            return
        self._lingering += 1
        fd = conn.fileno()
        left = LINGER_BYTES

        def done() -> None:
            if conn.fileno() == -1:
                return
            self._remove_reader(fd)  # type: ignore[attr-defined]
            timer.cancel()
            conn.close()
            self._lingering -= 1

        def drain() -> None:
            nonlocal left
            try:
                data = conn.recv(min(left, 16 * 1024))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            left -= len(data)
            if not data or left <= 0:
                done()

        timer = self.call_later(LINGER_SECONDS, done)
        self._add_reader(fd, drain)  # type: ignore[attr-defined]

    def _pause_accepting(self, exc: OSError, protocol_factory: Any, sock: socket.socket, *rest: Any) -> None:
        if time.monotonic() - self._warned_at > 60:
            self._warned_at = time.monotonic()
            log.warning("out of %s (limit %d open files): new connections wait in the kernel's queue, accepted"
                        " again every %g s", exc.strerror, resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                        ACCEPT_PAUSE_SECONDS)
        self._remove_reader(sock.fileno())  # type: ignore[attr-defined]
        self.call_later(ACCEPT_PAUSE_SECONDS, self._start_serving,  # type: ignore[attr-defined]
                        protocol_factory, sock, *rest)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets TCP_NODELAY only on sockets whose protocol number says TCP, and uvicorn's listening
            # socket leaves it 0: without it, a response written in two parts waits for the client's delayed
            # ACK, 40 ms per request on a kept-alive connection.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self._head_bytes = 0
        self._head_size = 0
        self._header_count = 0
        self._in_head = True
        self._begun = False  # a byte of the request whose head is awaited has arrived
        self._pipeline_full = False
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_seen = 0.0
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(HEAD_SECONDS, self._head_too_slow)

    def data_received(self, data: bytes) -> None:
        if self._body_timer is not None:
            self._body_seen = self.loop.time()
        # Counted as it arrives, checked once the parser has seen it (a read may hold the head and a body):
        # what an unfinished head can hold is one read past the limit.
        counting = self._in_head
        if counting:
            self._head_bytes += len(data)
        super().data_received(data)
        if counting and self._in_head and (self._head_bytes > MAX_HEAD_BYTES or self._header_count > MAX_HEADERS):
            self._too_large()
        elif self._in_head and self._head_timer is None and not self.transport.is_closing():
            # A head that began in this read and is not complete: its deadline runs from now. (A head that
            # arrives whole, nearly every one, costs no timer.)
            self._arm()

    def _too_large(self) -> None:
        self._refuse(431, b"Request Header Fields Too Large",
                     f"the request line and headers may hold at most {MAX_HEAD_BYTES} bytes and {MAX_HEADERS}"
                     " headers")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0
        self._begun = True
        if not self._in_head:  # the next request on a kept-alive connection: its head gets a deadline too,
            self._in_head, self._head_bytes, self._header_count = True, 0, 0  # once its read has been parsed

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._head_size += len(name) + len(value) + 4
        if not self._in_head and (self._head_size > MAX_HEAD_BYTES or self._header_count > MAX_HEADERS):
            # A chunked body's trailers, which the parser reports as headers: the head's limits hold for both.
            self._too_large()
            raise ValueError("request trailers too large")  # stops the parser; the answer is already sent
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = self._begun = False
        if self._head_size > MAX_HEAD_BYTES or self._header_count > MAX_HEADERS:
            self._too_large()
            raise ValueError("request head too large")  # stops the parser; the answer is already sent
        hosts, body = 0, False  # one pass over the headers, on every request
        for name, value in self.headers:
            if name == b"host":
                hosts += 1
            elif name in (b"content-length", b"transfer-encoding") and value.strip() != b"0":
                body = True
        # An absolute-form target names the host, and the Host headers are ignored (RFC 9112 3.2.2); else
        # several Host headers leave open which one names us (RFC 9112 3.2).
        absolute = self.url[:1] != b"/" and self._authority_from_url()
        if hosts > 1 and not absolute:
            self._refuse(400, b"Bad Request", "a request must carry one Host header, not several")
            raise ValueError("several Host headers")
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        if len(self.pipeline) >= MAX_PIPELINED:
            # Each read would queue thousands more: the client is not waiting for answers. Those queued are
            # answered in order, and the last one's answer hangs up; the rest of what was sent is not read.
            log.warning("a client pipelined more than %d requests; its connection closes", MAX_PIPELINED)
            self._pipeline_full = True
            self.cycle.keep_alive = False
            raise ValueError("too many pipelined requests")  # stops the parser
        if body:
            self._body_seen = self.loop.time()
            self._body_timer = self.loop.call_later(BODY_IDLE_SECONDS, self._body_idle)

    def _authority_from_url(self) -> bool:
        """For a target in absolute form (`GET http://host:4000/api/jobs/1`, as a forward proxy may send
        it): the Host header becomes the target's authority, so the URLs this server hands out name it."""
        try:
            parsed = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            return False
        if not parsed.host or (parsed.schema or b"").lower() not in (b"http", b"https"):
            return False
        host = b"[" + parsed.host + b"]" if b":" in parsed.host else parsed.host
        authority = host + (b":%d" % parsed.port if parsed.port is not None else b"")
        self.headers[:] = [(n, v) for n, v in self.headers if n != b"host"] + [(b"host", authority)]  # the scope's
        self.scope["scheme"] = parsed.schema.lower().decode()
        return True

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def _body_idle(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # the server stopped reading (its own backpressure): not the client's delay
            self._body_seen = self.loop.time()
        idle = self.loop.time() - self._body_seen
        if idle < BODY_IDLE_SECONDS:
            self._body_timer = self.loop.call_later(BODY_IDLE_SECONDS - idle, self._body_idle)
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # an answer is under way: a second one cannot follow it
        else:
            self._refuse(408, b"Request Timeout", f"the request's body sent nothing for {BODY_IDLE_SECONDS:g} s")

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio takes True: keep writing
        """The client has sent all it will, and said so (a half-close: `nc -N`, some proxies). A request it
        sent whole and not yet answered is still answered, and the connection closes after that answer;
        asyncio would close it at once, and the request would run unanswered (a job stored that its client
        never heard of). A request cut short, or one whose answer is already streaming (a log followed: a
        client that has gone looks the same, and would hold its place), closes it now, and the app sees the
        disconnect."""
        last = self.cycle  # the latest request read (answered after any pipelined before it)
        if last is None or last.more_body or last.response_started:
            return None
        last.keep_alive = False
        return True

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        async def answered(scope: Any, receive: Any, send: Any) -> None:
            if scope.get("http_version") == "1.0":
                send = _close_delimited(cycle, scope, send)
            try:
                await app(scope, receive, send)
            except asyncio.CancelledError:
                # uvicorn cancels what still runs when the graceful stop's time is up, and answered those
                # requests with a plain-text 500 (and a traceback in the log): what an upload in flight got.
                log.warning("%s %s was still running when the server stopped; %s", scope.get("method"),
                            scope.get("path"), "the connection was closed" if cycle.response_started else
                            "answered 503")
                if cycle.response_started:  # a second answer cannot follow the first: hang up
                    cycle.transport.close()
                    cycle.disconnected = True
                else:
                    await send({"type": "http.response.start", "status": 503, "headers": [
                        (b"content-type", b"application/json"), (b"connection", b"close"),
                        (b"content-length", b"%d" % len(_STOPPING))]})
                    await send({"type": "http.response.body", "body": _STOPPING})

        super()._start_asgi_task(cycle, answered)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        if self._pipeline_full:
            return  # the parser was stopped on purpose; the answers queued come first
        self._refuse(400, b"Bad Request", f"the request could not be read as HTTP: {msg}")

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(HEAD_SECONDS, self._head_too_slow)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            if self._head_bytes or self._begun:
                self._refuse(408, b"Request Timeout", f"the request's headers took more than {HEAD_SECONDS:g} s")
            else:
                self.transport.close()  # a connection that never sent a byte: nothing to answer

    def _refuse(self, status: int, reason: bytes, message: str) -> None:
        if not self.transport.is_closing():
            self.transport.write(_error(status, reason, message))
            self.transport.close()


def _close_delimited(cycle: RequestResponseCycle, scope: Any, send: Any) -> Any:
    """An answer of no announced length (a streamed listing, a log) to an HTTP/1.0 client, which knows no
    chunks (RFC 9112 6.1): sent as it is, ended by closing the connection. uvicorn would chunk it."""
    streaming = False

    async def sending(message: Any) -> None:
        nonlocal streaming
        if message["type"] == "http.response.start":
            names = {name.lower() for name, _ in message.get("headers", [])}
            if scope["method"] != "HEAD" and message["status"] not in (204, 304) and b"content-length" not in names:
                streaming = True
                cycle.chunked_encoding = False
                cycle.keep_alive = False
        elif streaming and message["type"] == "http.response.body":
            cycle.expected_content_length = len(message.get("body", b""))  # each piece is all there is, so far
        await send(message)

    return sending


def uvicorn_settings() -> dict[str, Any]:
    """The server settings `dsm serve` runs with (see docs/performance.md for why)."""
    return {
        "http": GuardedHttpToolsProtocol,
        # asyncio's loop, not uvloop: under a burst of 1,000 kept-alive connections uvloop left new ones
        # unaccepted for seconds (4CAT opens one per poll, with a 30 s timeout); asyncio's answered them
        # within half a second, for about 15 % less throughput (bench/connections_bench.py).
        "loop": f"{__name__}:GuardedEventLoop",
        "proxy_headers": False,  # access.py decides which forwarded headers to believe
        "server_header": False,
        "backlog": 4096,
        "timeout_graceful_shutdown": 5,
    }
