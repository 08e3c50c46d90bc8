"""A hostile receiver costs one failed attempt: never a hung run, never the process's memory.

Each test runs a real loopback server that misbehaves on purpose (headers without end, one
byte every half second, silence, resets, bodies without end, ``100 Continue`` forever, a TLS
handshake that never comes, a server that will not read) and calls it through ``TrayClient``
on both transports, as deliveries do. Every call must end within its ``timeout_seconds`` (plus a
margin generous enough for a loaded machine) as a ``TransientDeliveryError`` with a short
reason, whatever the server does; the last test shows a whole run against such a URL finishing,
with a healthy URL beside it getting every message.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

import pytest

from syncer import loops
from syncer.errors import DeliveryError, TransientDeliveryError
from syncer.transport import (
    MAX_ANSWER_BYTES,
    MAX_HEAD_BYTES,
    MAX_HEADER_FIELDS,
    MAX_HEADER_LINE_BYTES,
    MAX_INTERIM_ANSWERS,
)
from syncer.tray import TrayClient
from tests.integration.conftest import World

TRANSPORTS = ["syncer", "httpx"]
TIMEOUT = 1.0
# The most a call may take: its deadline, and room for a machine busy with other tests.
LATEST = TIMEOUT * 3 + 1
BODY = b'{"type":"identify","userId":"u1","traits":{"vip":true},"messageId":"m1"}'
# How long a hostile server keeps at it, whatever the client does; and the most it sends.
LIFETIME = 30.0
FLOOD_LIMIT = 64 * 1024 * 1024
# What a flooding call may add to the process's peak memory (far less in practice).
RSS_GROWTH_LIMIT = 64 * 1024 * 1024


class Stopped(Exception):
    """The hostile server is shutting down, or has been at it for LIFETIME."""


class Hostile:
    """A loopback TCP server that gives every connection to ``behave(server, conn)``, in a
    thread of its own. On exit the listening socket and every connection are closed and the
    threads joined; a behaviour that outlives LIFETIME is stopped too."""

    def __init__(
        self,
        behave: Callable[[Hostile, socket.socket], None],
        *,
        https: bool = False,
        receive_buffer: int | None = None,
    ) -> None:
        self.behave = behave
        self.https = https
        self.sent = 0  # bytes written to clients
        self.received = 0  # bytes read from clients
        self.connections = 0
        self._stop = threading.Event()
        self._born = time.monotonic()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._server = socket.socket()
        if receive_buffer is not None:  # accepted sockets inherit it
            self._server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self._server.settimeout(0.05)

    def url(self) -> str:
        scheme = "https" if self.https else "http"
        return f"{scheme}://127.0.0.1:{self._server.getsockname()[1]}/w1"

    def __enter__(self) -> Self:
        self._spawn(self._accept)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._server.close()
        with self._lock:
            for conn in self._open:
                conn.close()

    # -- what behaviours use ---------------------------------------------------------------------

    def check(self) -> None:
        if self._stop.is_set() or time.monotonic() - self._born > LIFETIME:
            raise Stopped

    def pause(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise Stopped
        self.check()

    def send(self, conn: socket.socket, data: bytes) -> None:
        """Send all of ``data``, however slowly the client reads, until stopped."""
        view = memoryview(data)
        while view:
            self.check()
            try:
                count = conn.send(view)
            except TimeoutError:
                continue
            self.sent += count
            view = view[count:]

    def recv(self, conn: socket.socket, size: int = 65536) -> bytes:
        while True:
            self.check()
            try:
                data = conn.recv(size)
            except TimeoutError:
                continue
            if not data:
                raise Stopped  # the client hung up
            self.received += len(data)
            return data

    def read_head(self, conn: socket.socket) -> bytes:
        """Read up to the end of a request's head; what came after it is returned."""
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.recv(conn)
        return data.partition(b"\r\n\r\n")[2]

    def read_request(self, conn: socket.socket) -> None:
        """Read a whole request: its head and its Content-Length of body."""
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.recv(conn)
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            rest += self.recv(conn)

    def flood(self, conn: socket.socket, piece: bytes) -> None:
        """``piece`` again and again, as fast as the client takes it, until FLOOD_LIMIT."""
        batch = piece * max(1, 65536 // len(piece))
        while self.sent < FLOOD_LIMIT:
            self.send(conn, batch)

    # -- the server ------------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(0.05)
            with self._lock:
                self._open.append(conn)
                self.connections += 1
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(Stopped, OSError):
            self.behave(self, conn)
        # Whatever the behaviour did, the connection stays open until the test ends: closing
        # it would let the client off with a "server disconnected".
        with contextlib.suppress(Stopped):
            while True:
                self.pause(0.05)


# -- behaviours ------------------------------------------------------------------------------------

OK_HEAD = b"HTTP/1.1 200 OK\r\n"


def many_headers(h: Hostile, conn: socket.socket) -> None:
    h.read_head(conn)
    h.send(conn, OK_HEAD)
    h.flood(conn, b"X-Flood: " + b"f" * 40 + b"\r\n")


def one_endless_header(h: Hostile, conn: socket.socket) -> None:
    h.read_head(conn)
    h.send(conn, OK_HEAD + b"X-Endless: ")
    h.flood(conn, b"e" * 4096)


def huge_headers(h: Hostile, conn: socket.socket) -> None:
    """Few fields, each of them long."""
    h.read_head(conn)
    h.send(conn, OK_HEAD)
    h.flood(conn, b"X-Big: " + b"b" * (MAX_HEADER_LINE_BYTES * 2) + b"\r\n")


def endless_status_line(h: Hostile, conn: socket.socket) -> None:
    h.read_head(conn)
    h.send(conn, b"HTTP/1.1 200 ")
    h.flood(conn, b"O" * 4096)


def drip_head(h: Hostile, conn: socket.socket) -> None:
    """One byte of an answer whose headers never end, every half second."""
    h.read_head(conn)
    answer = OK_HEAD
    while True:
        for byte in answer:
            h.send(conn, bytes([byte]))
            h.pause(0.5)
        answer = b"X-Drip: 1\r\n"


def drip_body(h: Hostile, conn: socket.socket) -> None:
    """A complete head, then a chunked body of one byte every half second, never ended."""
    h.read_head(conn)
    h.send(conn, OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    while True:
        h.send(conn, b"1\r\nx\r\n")
        h.pause(0.5)


def never_answers(h: Hostile, conn: socket.socket) -> None:
    h.read_request(conn)


def never_reads(h: Hostile, conn: socket.socket) -> None:
    """Accepts the connection and does nothing with it (for an https URL: no handshake)."""


def reads_slowly(h: Hostile, conn: socket.socket) -> None:
    """Takes a byte of the request every tenth of a second; answers once it has it all."""
    while True:
        h.recv(conn, 1)
        h.pause(0.1)


def resets_mid_answer(h: Hostile, conn: socket.socket) -> None:
    h.read_request(conn)
    h.send(conn, OK_HEAD + b'Content-Length: 100\r\n\r\n{"ok')
    h.pause(0.1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # with a zero linger: a reset, not a goodbye


def endless_chunked_body(h: Hostile, conn: socket.socket) -> None:
    h.read_head(conn)
    h.send(conn, OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    h.flood(conn, b"4000\r\n" + b"c" * 0x4000 + b"\r\n")


def endless_body(h: Hostile, conn: socket.socket) -> None:
    """A body that ends when the connection does, which it never does."""
    h.read_head(conn)
    h.send(conn, OK_HEAD + b"\r\n")
    h.flood(conn, b"x" * 4096)


def interim_flood(h: Hostile, conn: socket.socket) -> None:
    h.read_head(conn)
    h.flood(conn, b"HTTP/1.1 100 Continue\r\n\r\n")


def interim_drip(h: Hostile, conn: socket.socket) -> None:
    """A ``100 Continue`` every fifth of a second, and never the answer."""
    h.read_head(conn)
    while True:
        h.send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        h.pause(0.2)


# -- the calls -------------------------------------------------------------------------------------


# What a call came to (the status, or the error) and the seconds it took.
Outcome = tuple[int | DeliveryError, float]


def call(url: str, transport: str, body: bytes = BODY, *, calls: int = 1) -> list[Outcome]:
    """What ``calls`` posts in a row through one client came to: a status or the error, each
    with the seconds it took."""

    async def go() -> list[Outcome]:
        seen: list[Outcome] = []
        async with TrayClient(
            timeout_seconds=TIMEOUT, max_connections=4, shared_secret=None, transport=transport
        ) as client:
            for _ in range(calls):
                started = time.monotonic()
                try:
                    seen.append((await client.post(url, body), time.monotonic() - started))
                except DeliveryError as exc:
                    seen.append((exc, time.monotonic() - started))
        return seen

    return loops.run(go())


def failure(url: str, transport: str, body: bytes = BODY) -> str:
    """The reason of the one call that must fail in time as a transient error."""
    [(error, took)] = call(url, transport, body)
    assert isinstance(error, TransientDeliveryError), error
    assert took < LATEST, f"{took:.1f} s: {error}"
    text = str(error)
    assert text and "\n" not in text and len(text) <= 200, text
    return text


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts KiB


TIMED_OUT = f"timeout: no complete answer within {TIMEOUT:g} s"

# behaviour, what syncer's transport says (httpx's default transport: a timeout or a broken
# connection, in its own words)
FAST_FAILURES = {
    "many header fields": (many_headers, f"answer has over {MAX_HEADER_FIELDS} header fields"),
    "one endless header": (one_endless_header, f"answer headers over {MAX_HEAD_BYTES // 1024} KiB"),
    "long header lines": (
        huge_headers,
        f"answer header line over {MAX_HEADER_LINE_BYTES // 1024} KiB",
    ),
    "endless status line": (
        endless_status_line,
        f"answer headers over {MAX_HEAD_BYTES // 1024} KiB",
    ),
    "endless chunked body": (
        endless_chunked_body,
        f"answer body over {MAX_ANSWER_BYTES // 1024} KiB",
    ),
    "endless body until close": (endless_body, f"answer body over {MAX_ANSWER_BYTES // 1024} KiB"),
    "1xx flood": (interim_flood, f"answer has over {MAX_INTERIM_ANSWERS} interim (1xx) answers"),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(FAST_FAILURES))
def test_an_answer_without_end_fails_at_a_cap_without_eating_memory(
    case: str, transport: str
) -> None:
    """Headers, a status line, a body or interim answers sent as fast as the client takes
    them, for ever: the call fails in time and the process does not grow with the flood."""
    behave, reason = FAST_FAILURES[case]
    before = peak_rss()
    with Hostile(behave) as server:
        text = failure(server.url(), transport)
    assert peak_rss() - before < RSS_GROWTH_LIMIT
    if transport == "syncer":
        assert text == reason
    else:
        assert text.startswith(("timeout", "connection error", "answer body over")), text


SLOW_FAILURES = {
    "drip of the headers": drip_head,
    "drip of the body": drip_body,
    "never answers": never_answers,
    "never reads": never_reads,
    "reads the request slowly": reads_slowly,
    "1xx every 0.2 s": interim_drip,
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(SLOW_FAILURES))
def test_a_receiver_that_keeps_the_call_waiting_meets_the_deadline(
    case: str, transport: str
) -> None:
    """``timeout_seconds`` bounds the whole call, not the gap between two bytes."""
    # A request that does not fit in the buffers between client and server.
    body = BODY + b" " * 4_000_000 if case == "reads the request slowly" else BODY
    with Hostile(SLOW_FAILURES[case], receive_buffer=4096) as server:
        text = failure(server.url(), transport, body)
        assert server.connections == 1
    assert text == TIMED_OUT


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_tls_handshake_that_never_comes_meets_the_deadline(transport: str) -> None:
    with Hostile(never_reads, https=True) as server:
        assert failure(server.url(), transport).startswith("timeout: no connection within")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_reset_in_the_middle_of_an_answer_is_a_connection_error(transport: str) -> None:
    with Hostile(resets_mid_answer) as server:
        assert failure(server.url(), transport).startswith("connection error")


def answers_before_reading(h: Hostile, conn: socket.socket) -> None:
    """Answers each request as soon as its head is in, reading none of its body."""
    while True:
        h.read_head(conn)
        h.send(conn, OK_HEAD + b"Content-Length: 2\r\n\r\n{}")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_answer_before_the_request_is_read_never_hangs_the_next_call(transport: str) -> None:
    """However a transport copes with it (an answer, or a timeout while it still writes), no
    call hangs: a connection with part of a request still unread must not trap the calls after
    it."""
    body = BODY + b" " * 12_000_000  # more than the socket buffers between them hold
    with Hostile(answers_before_reading, receive_buffer=4096) as server:
        seen = call(server.url(), transport, body, calls=3)
        connections = server.connections
    for outcome, took in seen:
        assert outcome == 200 or isinstance(outcome, TransientDeliveryError), outcome
        assert took < LATEST
    if transport == "syncer":
        # It reads the answer while it writes (httpx's writes first), and does not use a
        # connection again while part of the request before is still unsent.
        assert [outcome for outcome, _ in seen] == [200, 200, 200]
        assert connections == 3


# -- a whole run -----------------------------------------------------------------------------------

KEY = "pro_users"


def test_a_run_with_a_dripping_url_finishes_and_the_healthy_url_gets_everything(
    world: World,
) -> None:
    """The dripping URL's deliveries end as owed, each with a short reason; the run finishes
    (its lease released, not left ``running``) and the healthy URL has every message."""
    w = world
    members = [f"u{i}" for i in range(1, 6)]
    w.set_users(members)
    w.create()
    with Hostile(drip_head) as dripping:
        w.configure([dripping.url(), w.rx.url("w1")], timeout_seconds=TIMEOUT)
        started = time.monotonic()
        result = w.sync(KEY)
        took = time.monotonic() - started

    assert (result.status, result.sent) == ("partial", len(members))
    assert took < 60, took
    assert sorted(str(r.user_id) for r in w.rx.accepted("w1")) == members
    [run] = w.rows("SELECT status, finished_at FROM sync_runs WHERE id = :r", r=result.run_id)
    assert run.status == "partial" and run.finished_at is not None
    rows = w.rows("SELECT status, last_error FROM deliveries WHERE run_id = :r", r=result.run_id)
    assert sorted(row.status for row in rows) == ["pending"] * 5 + ["sent"] * 5
    for row in rows:
        if row.status == "pending":
            assert row.last_error == TIMED_OUT
    assert "running" not in {status for (status,) in w.rows("SELECT status FROM sync_runs")}
    # The audience is free for the next run: the lease went with the run.
    w.configure([w.rx.url("w1")])
    assert w.sync(KEY).run_id not in (None, result.run_id)


def _answers(raw: bytes) -> Callable[[Hostile, socket.socket], None]:
    """A server that reads the request, answers ``raw`` and closes its side."""

    def behave(server: Hostile, conn: socket.socket) -> None:
        del server
        conn.settimeout(LATEST)
        with contextlib.suppress(OSError):
            conn.recv(65536)
            conn.sendall(raw)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # until the client lets go

    return behave


# Answers no well-kept HTTP/1.1 client takes as a success (syncer's transport refuses each at
# once; a lenient parser may guess)
MALFORMED = {
    "HTTP/0.9 (no status line)": b"OK\n",
    "HTTP/2 connection preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "HTTP/2 status line": b"HTTP/2 200\r\nContent-Length: 0\r\n\r\n",
    "a 1xx, then close": b"HTTP/1.1 100 Continue\r\n\r\n",
    "Content-Length -1": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok",
    "two Content-Lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\nok",
    "Content-Length past 64 bits": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n"
    b"\r\nok",
    "chunk size 2^64": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\nab",
    "negative chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nab",
    "chunked and Content-Length": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 3\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "a NUL in a header": b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "a two-digit status": b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    "a body shorter than its length": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_answer_is_a_failed_call_at_once(case: str) -> None:
    with Hostile(_answers(MALFORMED[case])) as server:
        [(error, took)] = call(server.url(), "syncer")
    assert isinstance(error, TransientDeliveryError), error
    assert took < TIMEOUT, f"{took:.1f} s: {error}"
    assert str(error).startswith("connection error:"), error
