"""The two HTTP transports behind TrayClient answer alike.

syncer sends through its own HTTP/1.1 transport for speed; httpx's default transport is the
reference. Every rule a delivery depends on (which answers are retried, which fail for good,
timeouts, dropped connections, redirects never followed, the signature and the exact bytes)
must come out the same on both, against the same loopback receiver. Calls run on syncer's own
event loop (``syncer.loops``), as deliveries do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from syncer import loops
from syncer.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from syncer.settings import Secret
from syncer.transport import Http1Transport
from syncer.tray import TrayClient
from tests.receiver import Receiver

TRANSPORTS = ["syncer", "httpx"]
BODY = '{"type":"identify","userId":"ü-1","traits":{"vip":true},"messageId":"m1"}'.encode()


def post(url: str, transport: str, *, secret: str | None = "s3cret", timeout: float = 5.0) -> int:
    async def go() -> int:
        async with TrayClient(
            timeout_seconds=timeout,
            max_connections=4,
            shared_secret=Secret(secret) if secret else None,
            transport=transport,
        ) as client:
            return await client.post(url, BODY)

    return loops.run(go())


def outcome(url: str, transport: str, **kwargs: object) -> tuple[str, int | None, str]:
    """What a call came to: ("sent", status, "") or (error class, status code, message)."""
    try:
        return ("sent", post(url, transport, **kwargs), "")  # type: ignore[arg-type]
    except DeliveryError as exc:
        return (type(exc).__name__, exc.status_code, str(exc))


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver(secret="s3cret", slow_seconds=2.0, retry_after="7") as receiver:
        yield receiver


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_2xx_is_sent_with_the_exact_bytes_and_a_valid_signature(
    rx: Receiver, transport: str
) -> None:
    assert post(rx.url("w1"), transport) == 200
    [request] = rx.requests("w1")
    assert request.body == BODY
    assert request.signature_ok is True
    expected = hmac.new(b"s3cret", BODY, hashlib.sha1).hexdigest()
    assert request.headers["X-Signature"] == expected
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("syncer/")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_without_a_secret_there_is_no_signature_header(transport: str) -> None:
    with Receiver() as rx:
        assert post(rx.url("w1"), transport, secret=None) == 200
        [request] = rx.requests("w1")
        assert "X-Signature" not in request.headers


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("500", (TransientDeliveryError, 500)),
        ("503", (TransientDeliveryError, 503)),
        ("429", (TransientDeliveryError, 429)),
        ("400", (PermanentDeliveryError, 400)),
        ("404", (PermanentDeliveryError, 404)),
        ("302", (PermanentDeliveryError, 302)),
        ("drop", (TransientDeliveryError, None)),
        ("slow", (TransientDeliveryError, None)),
    ],
)
def test_every_kind_of_failure_comes_out_the_same_on_both_transports(
    rx: Receiver, answer: str, expected: tuple[type[DeliveryError], int | None]
) -> None:
    rx.set_status("w1", answer)
    seen = {t: outcome(rx.url("w1"), t, timeout=0.5) for t in TRANSPORTS}

    kinds = {(kind, code) for kind, code, _ in seen.values()}
    assert kinds == {(expected[0].__name__, expected[1])}
    messages = {t: message for t, (_, _, message) in seen.items()}
    if answer == "drop":
        assert all(m.startswith("connection error") for m in messages.values()), messages
    elif answer == "slow":
        assert all(m.startswith("timeout") for m in messages.values()), messages
    else:
        assert len(set(messages.values())) == 1, messages
    # A redirect is never followed: one request each, nothing sent to the Location.
    assert len(rx.requests("w1")) == len(TRANSPORTS)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_retry_after_is_read_from_a_429(rx: Receiver, transport: str) -> None:
    rx.set_status("w1", "429")
    with pytest.raises(TransientDeliveryError) as raised:
        post(rx.url("w1"), transport)
    assert raised.value.retry_after == 7.0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nobody_listening_is_a_connection_error(transport: str) -> None:
    with socket.socket() as bound:  # bound, never listening: refused, and no other test's port
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        kind, code, message = outcome(f"http://127.0.0.1:{port}/w1", transport)
    assert (kind, code) == ("TransientDeliveryError", None)
    assert message.startswith("connection error")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_keep_alive_connections_are_reused(rx: Receiver, transport: str) -> None:
    async def go() -> None:
        async with TrayClient(
            timeout_seconds=5, max_connections=2, shared_secret=None, transport=transport
        ) as client:
            for _ in range(6):
                await client.post(rx.url("w1"), BODY)

    loops.run(go())
    assert len({r.client_port for r in rx.requests("w1")}) == 1


class Scripted:
    """A raw loopback server that answers every request with the same bytes; with ``tls``,
    over TLS (it records whether each handshake completed)."""

    def __init__(self, answer: bytes, *, close: bool, tls: ssl.SSLContext | None = None) -> None:
        self.answer, self.close, self.tls = answer, close, tls
        self.requests = 0
        self.bodies: list[bytes] = []
        self.handshakes: list[str] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.server.getsockname()[1]}/w1"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:  # ssl.SSLError included: the client refused the certificate
                self.handshakes.append("refused")
                conn.close()
                return
            self.handshakes.append("completed")
        # A client may hang up before reading all of a large answer.
        with conn, contextlib.suppress(OSError):
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(data) < length:
                    data += conn.recv(65536)
                self.bodies.append(data[:length])
                data = data[length:]
                self.requests += 1
                conn.sendall(self.answer)
                if self.close:
                    return

    def stop(self) -> None:
        self.server.close()


ANSWERS = {
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        False,
    ),
    "body until close": (b"HTTP/1.1 200 OK\r\n\r\nok", True),
    "interim 100 first": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        False,
    ),
    "large answer": (b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"x" * 200_000, False),
    "connection close": (
        b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        True,
    ),
    "503 and close": (
        b"HTTP/1.1 503 Busy\r\nRetry-After: 3\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        True,
    ),
    "not HTTP": (b"NOT HTTP AT ALL\r\n\r\n", True),
    "cut short": (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok", True),
}


@pytest.mark.parametrize("name", list(ANSWERS))
def test_how_an_answer_is_framed_does_not_change_the_outcome(name: str) -> None:
    """Chunked bodies, bodies ended by closing, interim 1xx answers, answers past the cap on a
    body, connections the server closes after each answer, and broken answers: both
    transports see the same status (or the same kind of error) on two calls in a row."""
    answer, close = ANSWERS[name]
    server = Scripted(answer, close=close)

    async def twice(transport: str) -> list[tuple[str, int | None, float | None]]:
        seen: list[tuple[str, int | None, float | None]] = []
        async with TrayClient(
            timeout_seconds=2, max_connections=2, shared_secret=None, transport=transport
        ) as client:
            for _ in range(2):
                try:
                    seen.append(("sent", await client.post(server.url(), BODY), None))
                except DeliveryError as exc:
                    seen.append((type(exc).__name__, exc.status_code, exc.retry_after))
        return seen

    try:
        outcomes = {t: loops.run(twice(t)) for t in TRANSPORTS}
    finally:
        server.stop()
    assert outcomes["syncer"] == outcomes["httpx"]
    assert server.requests == 2 * len(TRANSPORTS)
    if name in ("not HTTP", "cut short", "large answer"):
        assert outcomes["syncer"][0] == ("TransientDeliveryError", None, None)
    elif name == "503 and close":
        assert outcomes["syncer"][0] == ("TransientDeliveryError", 503, 3.0)
    else:
        assert outcomes["syncer"][0][0] == "sent"


OK_AND_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"


def tls_server(tmp_path: Path) -> tuple[Scripted, Path]:
    """A loopback HTTPS server with a certificate of its own (no authority signed it), and
    that certificate."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return Scripted(OK_AND_CLOSE, close=True, tls=context), cert


def test_tls_certificates_are_verified(tmp_path: Path) -> None:
    """A workflow URL whose certificate no trusted authority signed is a connection error on
    both transports: nothing is sent to a server that cannot prove who it is."""
    server, _cert = tls_server(tmp_path)
    try:
        seen = {t: outcome(server.url(), t) for t in TRANSPORTS}
    finally:
        server.stop()
    for kind, code, message in seen.values():
        assert (kind, code) == ("TransientDeliveryError", None)
        assert message.startswith("connection error")
        assert "certificate" in message.lower(), message
    assert "completed" not in server.handshakes
    assert server.bodies == []


def test_a_call_over_tls_arrives_when_the_certificate_is_trusted(tmp_path: Path) -> None:
    """The HTTPS path end to end (handshake, the host name checked against the certificate,
    the request and its answer), with a client that trusts the server's certificate."""
    server, cert = tls_server(tmp_path)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def call(transport: httpx.AsyncBaseTransport) -> int:
        request = httpx.Request(
            "POST", server.url(), content=BODY, headers={"Content-Type": "application/json"}
        )
        try:
            response = await transport.handle_async_request(request)
            await response.aread()
            return response.status_code
        finally:
            await transport.aclose()

    try:
        statuses = [
            loops.run(call(Http1Transport(max_connections=2, ssl_context=trusting))),
            loops.run(call(httpx.AsyncHTTPTransport(verify=trusting))),
        ]
    finally:
        server.stop()
    assert statuses == [200, 200]
    assert server.bodies == [BODY, BODY]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_more_connections_than_the_limit(rx: Receiver, transport: str) -> None:
    async def go() -> None:
        async with TrayClient(
            timeout_seconds=5, max_connections=3, shared_secret=None, transport=transport
        ) as client:
            await asyncio.gather(*(client.post(rx.url("w1"), BODY) for _ in range(30)))

    loops.run(go())
    assert len(rx.requests("w1")) == 30
    assert 1 <= len({r.client_port for r in rx.requests("w1")}) <= 3
