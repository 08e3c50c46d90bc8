"""The two HTTP transports behind TrayClient answer alike.

syncer sends through its own aiohttp transport for speed; httpx's default transport is the
reference. Every rule a delivery depends on (which answers are retried, which fail for good,
timeouts, dropped connections, redirects never followed, the signature and the exact bytes)
must come out the same on both, against the same loopback receiver.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
from collections.abc import Iterator

import pytest

from syncer.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from syncer.settings import Secret
from syncer.tray import TrayClient
from tests.receiver import Receiver

TRANSPORTS = ["aiohttp", "httpx"]
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

    return asyncio.run(go())


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
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
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

    asyncio.run(go())
    assert len({r.client_port for r in rx.requests("w1")}) == 1
