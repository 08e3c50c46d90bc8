"""syncer's own httpx transport: HTTP/1.1 keep-alive connections on asyncio, nothing more.

httpx stays the API (``httpx.Request`` in, ``httpx.Response`` out, httpx's exception types);
this transport only moves the bytes. A workflow call is one small POST and one small answer, so
a general-purpose client spends most of its time on things a call never uses. Here a request is
written with one ``write`` of its head and body, the answer is parsed by ``httptools`` (the C
HTTP parser asyncio servers use), and a connection is an ``asyncio.Protocol`` with one exchange
at a time. On this workload it costs a fraction of aiohttp's client per call (see
bench/README.md).

The rules are the ones a delivery depends on, checked against httpx's default transport by
tests/integration/test_transports.py: redirects are never followed, nothing is compressed or
decompressed, TLS is verified with the system's trust store, and an answer is read whole.

A receiver is not trusted to behave (tests/integration/test_hostile_receivers.py). Every wait
has a bound and every buffer a cap:

- Timeouts are httpx's (``connect`` for opening a connection, ``read`` for the gap between bytes
  of the answer, a stalled write showing as a read timeout, ``pool`` for waiting on a free
  connection) plus ``total``, as in aiohttp: one deadline for the whole call, from asking for a
  connection to the last byte of the answer. A receiver that drips a byte now and then, or
  answers ``100 Continue`` forever, meets it. It costs one loop timer per call, set when the
  request is written and never re-armed while the total is the shortest bound.
- An answer's head (status line and headers, interim 1xx answers included) is at most
  MAX_HEAD_BYTES, with at most MAX_HEADER_FIELDS fields of at most MAX_HEADER_LINE_BYTES each
  and at most MAX_INTERIM_ANSWERS interim answers; its body is at most MAX_ANSWER_BYTES. Past a
  cap the call fails with ``AnswerOverLimit`` and the connection is dropped.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import httptools
import httpx

# Caps on an answer; past one, the call fails and its connection is dropped. Tray answers a few
# bytes, and only the status and Retry-After are used.
MAX_ANSWER_BYTES = 64 * 1024  # the body
MAX_HEAD_BYTES = 64 * 1024  # the status line and headers, interim answers included
MAX_HEADER_FIELDS = 100
MAX_HEADER_LINE_BYTES = 8 * 1024  # one field's name and value
MAX_INTERIM_ANSWERS = 10  # 100 Continue, 103 Early Hints… before the answer itself
DEFAULT_PORTS = {b"http": 80, b"https": 443}
# A loop may run a timer this much before its time (uvloop's clock counts milliseconds).
_TIMER_SLACK = 0.001

Origin = tuple[bytes, bytes, int]


# The answer to one request: (status, headers, body, connection reusable).
Answer = tuple[int, list[tuple[bytes, bytes]], bytes, bool]


class AnswerOverLimit(httpx.RemoteProtocolError):
    """An answer past one of the caps above; its text says which, e.g. "answer headers over
    64 KiB"."""


class _Stop(Exception):
    """Raised from a parser callback to stop parsing an answer that already failed."""


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one request and its answer at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._answer: asyncio.Future[Answer] | None = None
        self._parser: Any = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._head_size = 0
        self._interim = 0
        self._headers_done = False
        self._until_close = False
        self._last_read = 0.0
        self._read_timeout: float | None = None
        self._deadline: float | None = None
        self._total = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.done():
            self.close()  # bytes nobody asked for: the connection can't be trusted any more
            return
        self._last_read = self._loop.time()
        if not self._headers_done:
            self._head_size += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            # (a no-op when a callback failed the answer and stopped the parser)
            self._fail(httpx.RemoteProtocolError(f"malformed answer: {exc}"))
        else:
            # Every byte counted is the head's unless the head ended within this chunk.
            if not self._headers_done and self._head_size > MAX_HEAD_BYTES:
                self._fail(AnswerOverLimit(f"answer headers over {_kib(MAX_HEAD_BYTES)}"))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost settles a pending answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        answer = self._answer
        if answer is None or answer.done():
            return
        if self._headers_done and self._until_close:
            self._finish(reusable=False)  # a body delimited by the end of the connection
        else:
            text = "server disconnected"
            if self._headers_done:
                text += " in the middle of the answer"
            self._fail(httpx.RemoteProtocolError(f"{text}: {exc}" if exc else text))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= MAX_HEADER_FIELDS:
            self._refuse(f"answer has over {MAX_HEADER_FIELDS} header fields")
        if len(name) + len(value) > MAX_HEADER_LINE_BYTES:
            self._refuse(f"answer header line over {_kib(MAX_HEADER_LINE_BYTES)}")
        headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        self._headers_done = True
        names = {name.lower() for name, _ in self._headers}
        self._until_close = (
            b"content-length" not in names
            and b"transfer-encoding" not in names
            and status not in (204, 304)
        )

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_ANSWER_BYTES:
            self._refuse(f"answer body over {_kib(MAX_ANSWER_BYTES)}")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if not self._headers_done:
            # The interim answer ended; wait for the real one.
            self._interim += 1
            if self._interim > MAX_INTERIM_ANSWERS:
                self._refuse(f"answer has over {MAX_INTERIM_ANSWERS} interim (1xx) answers")
            self._headers.clear()
            return
        transport = self._transport
        # A server that answered before it read the whole request may misread what follows.
        reusable = self._parser.should_keep_alive() and (
            transport is None or not transport.get_write_buffer_size()
        )
        self._finish(reusable=reusable)

    def _refuse(self, text: str) -> None:
        """Fail the answer for passing a cap, and stop parsing it."""
        self._fail(AnswerOverLimit(text))
        raise _Stop

    # -- one exchange ------------------------------------------------------------------------

    def send(
        self, data: bytes, read_timeout: float | None, deadline: float | None, total: float
    ) -> asyncio.Future[Answer]:
        """Write a whole request; the returned future settles with its answer, or fails with
        ``httpx.ReadTimeout`` once ``read_timeout`` passes without a byte or the loop's clock
        reaches ``deadline`` (the end of a call of ``total`` seconds)."""
        assert self._transport is not None
        loop = self._loop
        self._answer = answer = loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._headers = []
        self._body = []
        self._size = self._head_size = self._interim = 0
        self._headers_done = False
        self._until_close = False
        self._read_timeout = read_timeout
        self._deadline = deadline
        self._total = total
        self._last_read = now = loop.time()
        if read_timeout is not None:
            due = now + read_timeout
            self._timer = loop.call_at(
                due if deadline is None or due < deadline else deadline, self._check_timer
            )
        elif deadline is not None:
            self._timer = loop.call_at(deadline, self._check_timer)
        self._transport.write(data)
        return answer

    def _check_timer(self) -> None:
        """The call's one timer: due at its deadline, or at the end of the read gap when that
        comes first (then re-armed while bytes keep coming)."""
        self._timer = None
        now = self._loop.time() + _TIMER_SLACK
        deadline = self._deadline
        if deadline is not None and now >= deadline:
            self._fail(httpx.ReadTimeout(f"no complete answer within {_seconds(self._total)}"))
            return
        read_timeout = self._read_timeout
        if read_timeout is not None:
            due = self._last_read + read_timeout
            if now >= due:
                self._fail(httpx.ReadTimeout(f"no answer within {_seconds(read_timeout)}"))
                return
        else:
            due = deadline  # type: ignore[assignment]
        self._timer = self._loop.call_at(
            due if deadline is None or due < deadline else deadline, self._check_timer
        )

    def _settle(self) -> asyncio.Future[Answer] | None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        answer, self._answer = self._answer, None
        return answer if answer is not None and not answer.done() else None

    def _finish(self, *, reusable: bool) -> None:
        status = self._parser.get_status_code()
        answer = self._settle()
        if answer is not None:
            answer.set_result((status, self._headers, b"".join(self._body), reusable))

    def _fail(self, error: Exception) -> None:
        answer = self._settle()
        self.close()
        if answer is not None:
            answer.set_exception(error)

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()


class Http1Transport(httpx.AsyncBaseTransport):
    """At most ``max_connections`` open connections (idle ones included), reused while the
    server keeps them alive and for at most ``keepalive_seconds`` of idleness."""

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_seconds: float = 15.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_connections = max_connections
        self._keepalive_seconds = keepalive_seconds
        self._ssl_context = ssl_context
        self._slots: asyncio.Semaphore | None = None
        self._idle: dict[Origin, list[Connection]] = {}
        self._open: set[Connection] = set()
        self._closing = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout") or {}
        stream = request.stream
        body = b"".join(stream) if isinstance(stream, httpx.ByteStream) else await request.aread()
        data = _serialize(request, body)
        origin = _origin(request)
        total = timeouts.get("total")
        deadline = None if total is None else asyncio.get_running_loop().time() + total
        slots = self._slots
        if slots is None:
            slots = self._slots = asyncio.Semaphore(self._max_connections)
        if slots.locked():
            timeout = _within(timeouts.get("pool"), deadline)
            try:
                await asyncio.wait_for(slots.acquire(), timeout)
            except TimeoutError:
                raise httpx.PoolTimeout(
                    f"no free connection within {_seconds(timeout)}", request=request
                ) from None
        else:
            await slots.acquire()
        try:
            connection = self._reuse(origin) or await self._connect(
                origin, _within(timeouts.get("connect"), deadline), request
            )
            read_timeout = timeouts.get("read")
            write_timeout = timeouts.get("write")
            if read_timeout is None or (write_timeout is not None and write_timeout > read_timeout):
                read_timeout = write_timeout
            try:
                status, headers, body, reusable = await connection.send(
                    data, read_timeout, deadline, total or 0.0
                )
            except BaseException:
                connection.close()
                self._open.discard(connection)
                raise
            self._release(origin, connection, reusable)
        except httpx.TransportError as exc:
            exc.request = request
            raise
        finally:
            slots.release()
        # ``stream=``, as a transport hands answers to httpx: the body is already in memory.
        return httpx.Response(
            status, headers=headers, stream=httpx.ByteStream(body), request=request
        )

    def _reuse(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest_allowed = asyncio.get_running_loop().time() - self._keepalive_seconds
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.idle_since >= oldest_allowed:
                return connection
            connection.close()
            self._open.discard(connection)
        return None

    def _release(self, origin: Origin, connection: Connection, reusable: bool) -> None:
        if reusable and not connection.closed and not self._closing:
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.setdefault(origin, []).append(connection)
        else:
            connection.close()
            self._open.discard(connection)

    def _make_room(self) -> None:
        """Close the longest-idle connection if opening one more would pass the limit."""
        self._open = {c for c in self._open if not c.closed}
        if len(self._open) < self._max_connections:
            return
        idle = [c for conns in self._idle.values() for c in conns]
        if idle:
            victim = min(idle, key=lambda c: c.idle_since)
            for conns in self._idle.values():
                if victim in conns:
                    conns.remove(victim)
            victim.close()
            self._open.discard(victim)

    async def _connect(
        self, origin: Origin, timeout: float | None, request: httpx.Request
    ) -> Connection:
        scheme, host, port = origin
        self._make_room()
        loop = asyncio.get_running_loop()
        secure = scheme == b"https"
        if secure and self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        hostname = host.decode("ascii")
        try:
            _transport, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Connection(loop),
                    hostname,
                    port,
                    ssl=self._ssl_context if secure else None,
                    server_hostname=hostname if secure else None,
                ),
                timeout,
            )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection within {_seconds(timeout)}") from None
        except OSError as exc:  # refused, unreachable, unknown host, TLS verification failed
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
        self._open.add(connection)
        return connection

    async def aclose(self) -> None:
        self._closing = True
        for connection in self._open:
            connection.close()
        self._open.clear()
        self._idle.clear()


def _within(timeout: float | None, deadline: float | None) -> float | None:
    """``timeout``, shortened to what is left before ``deadline`` (a loop time)."""
    if deadline is None:
        return timeout
    left = max(0.0, deadline - asyncio.get_running_loop().time())
    return left if timeout is None or left < timeout else timeout


def _seconds(seconds: float | None) -> str:
    return f"{round(seconds or 0.0, 2):g} s"


def _kib(size: int) -> str:
    return f"{size // 1024} KiB"


def _origin(request: httpx.Request) -> Origin:
    url = request.url
    scheme = url.raw_scheme
    if scheme not in DEFAULT_PORTS:
        raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}", request=request)
    return (scheme, url.raw_host, url.port or DEFAULT_PORTS[scheme])


def _serialize(request: httpx.Request, body: bytes) -> bytes:
    """The request's bytes on the wire: request line, headers, blank line, body. A request
    made with ``content=`` has its Host and Content-Length from httpx; else they are added."""
    lines = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    has_host = has_length = False
    for name, value in request.headers.raw:
        if b"\r" in value or b"\n" in value or b":" in name:
            raise httpx.LocalProtocolError(f"invalid header {name!r}", request=request)
        lowered = name.lower()
        has_host = has_host or lowered == b"host"
        has_length = has_length or lowered in (b"content-length", b"transfer-encoding")
        lines += (name, b": ", value, b"\r\n")
    if not has_host:
        lines += (b"Host: ", request.url.netloc, b"\r\n")
    if not has_length:
        lines += (b"Content-Length: ", str(len(body)).encode(), b"\r\n")
    lines += (b"\r\n", body)
    return b"".join(lines)
