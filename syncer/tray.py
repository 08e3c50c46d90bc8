"""Tray.io workflow calls: Segment-style payloads, signatures, and one HTTP POST.

Bodies match what Segment sends to Tray (see DESIGN.md, "Wire format"). Calls are
``httpx.Request``s handed to an httpx transport: syncer's own HTTP/1.1 transport
(``syncer.transport``, many times faster than httpx's default transport on this workload), or
httpx's default one; both give the same answers and errors, never follow redirects and verify
TLS. On both, ``timeout_seconds`` bounds a whole call (connect, send, the complete answer) and
an answer's body is read to at most ``MAX_ANSWER_BYTES``: a receiver that never finishes
answering costs one failed attempt, never a hung run or the process's memory.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx

from syncer import __version__
from syncer.errors import PermanentDeliveryError, TransientDeliveryError
from syncer.settings import Secret
from syncer.transport import MAX_ANSWER_BYTES, AnswerOverLimit, Http1Transport

MAX_BODY_BYTES = 1_000_000
LIBRARY = {"name": "syncer", "version": __version__}
MESSAGE_NAMESPACE = uuid.UUID("6f1c7a52-3c1e-4a59-9e0b-5d1f2b3c4a10")
_ERROR_TEXT_LIMIT = 200
_USER_AGENT = f"syncer/{__version__}".encode()


def format_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a ``Z``, as Segment writes it."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def identify_message_id(audience_id: int, run_id: int, user_id: str) -> str:
    """Stable per (run, audience, user): the same on every retry and every URL."""
    return _uuid5(f"identify/{audience_id}/{run_id}/{user_id}")


def delete_message_id(deletion_id: int) -> str:
    """Stable per deletion request: the same on every retry and every URL."""
    return _uuid5(f"delete/{deletion_id}")


def _uuid5(name: str) -> str:
    """``str(uuid.uuid5(MESSAGE_NAMESPACE, name))`` without building a ``uuid.UUID`` (one per call)."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = digest.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


_NAMESPACE_BYTES = MESSAGE_NAMESPACE.bytes
_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _encode(message: dict[str, Any]) -> bytes:
    return _checked(_json(message).encode())


def _checked(body: bytes) -> bytes:
    if len(body) > MAX_BODY_BYTES:
        raise PermanentDeliveryError(f"body of {len(body)} bytes exceeds Tray's 1 MB limit")
    return body


class IdentifyBodies:
    """The identify bodies of one audience.

    Every body of an audience shares its trait key and context, and every body of a run its
    timestamp: those parts are encoded once, and a body is the user id, the value and the
    message id put between them. The bytes are those of ``json.dumps`` of the message (compact
    separators, the key order of DESIGN.md's wire format)."""

    _STAMPS_KEPT = 1_000

    def __init__(self, audience_key: str, audience_id: int) -> None:
        self.audience_id = audience_id
        context = _json(
            {
                "personas": {
                    "computation_class": "audience",
                    "computation_key": audience_key,
                    "computation_id": str(audience_id),
                },
                "library": LIBRARY,
            }
        )
        traits = ',"traits":{' + _json(audience_key) + ":"
        rest = '},"context":' + context + ',"integrations":{"All":false},"messageId":'
        self._middle = {True: traits + "true" + rest, False: traits + "false" + rest}
        self._stamps: dict[datetime, str] = {}

    def body(self, *, user_id: str, value: bool, message_id: str, timestamp: datetime) -> bytes:
        stamp = self._stamps.get(timestamp)
        if stamp is None:
            if len(self._stamps) >= self._STAMPS_KEPT:
                self._stamps.clear()
            stamp = self._stamps[timestamp] = format_timestamp(timestamp)
        text = "".join(
            (
                '{"type":"identify","userId":',
                _json(user_id),
                self._middle[value],
                _json(message_id),
                ',"timestamp":"',
                stamp,
                '"}',
            )
        )
        return _checked(text.encode())


def identify_body(
    *,
    user_id: str,
    audience_key: str,
    audience_id: int,
    value: bool,
    message_id: str,
    timestamp: datetime,
) -> bytes:
    """One identify body (a pass builds many through one ``IdentifyBodies``)."""
    return IdentifyBodies(audience_key, audience_id).body(
        user_id=user_id, value=value, message_id=message_id, timestamp=timestamp
    )


def delete_body(*, user_id: str, message_id: str, timestamp: datetime) -> bytes:
    return _encode(
        {
            "type": "delete",
            "userId": user_id,
            "timestamp": format_timestamp(timestamp),
            "messageId": message_id,
        }
    )


class Signer:
    """``X-Signature``: lowercase hex HMAC-SHA1 of the exact body bytes. The key is set up
    once; each body costs one copy of the keyed state."""

    def __init__(self, secret: Secret) -> None:
        self._keyed = hmac.new(secret.reveal().encode(), digestmod=hashlib.sha1)

    def __call__(self, body: bytes) -> str:
        mac = self._keyed.copy()
        mac.update(body)
        return mac.hexdigest()


def signature(body: bytes, secret: Secret) -> str:
    return Signer(secret)(body)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class TrayClient:
    """POSTs bodies to workflow URLs over one pooled set of keep-alive connections.

    Requests go straight to the httpx transport: no cookie jar, no redirect handling, no
    auth flow, which cost more than the HTTP exchange itself on this workload. Redirects are
    never followed (the transport does not follow them either) and TLS is verified.

    ``timeout_seconds`` is the deadline of a whole call, from asking for a connection to the
    last byte of the answer. syncer's transport keeps it itself (one loop timer per call: the
    ``total`` timeout); httpx's is bounded here with ``asyncio.timeout``. A call past its
    deadline or past a cap on the answer fails with a ``TransientDeliveryError`` and its
    connection is dropped.
    """

    def __init__(
        self,
        *,
        timeout_seconds: float,
        max_connections: int,
        shared_secret: Secret | None,
        transport: str = "syncer",
    ) -> None:
        self._secret = shared_secret
        self._transport: httpx.AsyncBaseTransport
        self._timeout_seconds = timeout_seconds
        timeouts: dict[str, float | None]
        if transport == "syncer":
            self._transport = Http1Transport(max_connections=max_connections)
            self._bound_here = False
            timeouts = {**httpx.Timeout(timeout_seconds).as_dict(), "total": timeout_seconds}
        elif transport == "httpx":
            limits = httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            )
            self._transport = httpx.AsyncHTTPTransport(limits=limits, verify=True)
            # The call's deadline is kept here, by cancelling the call. A TLS handshake cut off
            # by cancelling leaves its socket open in httpcore 1.0, so opening a connection
            # keeps a timeout of its own that ends it first: half the call for the TCP
            # connection, half for the handshake.
            self._bound_here = True
            timeouts = httpx.Timeout(None, connect=timeout_seconds / 2).as_dict()
        else:
            raise ValueError(f"unknown transport {transport!r}")
        self._extensions = {"timeout": timeouts}
        self._signer = Signer(shared_secret) if shared_secret is not None else None
        # Per URL: the parsed URL and the headers every call to it carries.
        self._targets: dict[str, tuple[httpx.URL, list[tuple[bytes, bytes]]]] = {}

    def _target(self, url: str) -> tuple[httpx.URL, list[tuple[bytes, bytes]]]:
        parsed = httpx.URL(url)
        head = [
            (b"Host", parsed.netloc),
            (b"Content-Type", b"application/json"),
            (b"User-Agent", _USER_AGENT),
        ]
        return parsed, head

    async def __aenter__(self) -> TrayClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._transport.aclose()

    async def post(self, url: str, body: bytes) -> int:
        """Send one message. Returns the 2xx status, or raises a DeliveryError subclass."""
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = self._target(url)
        parsed, head = target
        headers = [*head, (b"Content-Length", str(len(body)).encode())]
        if self._signer is not None:
            headers.append((b"X-Signature", self._signer(body).encode()))
        # ``stream=``: the headers above are complete (Host and Content-Length included), so
        # httpx need not work them out again for every call.
        request = httpx.Request(
            "POST",
            parsed,
            headers=headers,
            stream=httpx.ByteStream(body),
            extensions=self._extensions,
        )
        try:
            if self._bound_here:
                async with asyncio.timeout(self._timeout_seconds):
                    response = await self._exchange(request)
            else:
                # syncer's transport hands over the whole answer, its body read and capped.
                response = await self._transport.handle_async_request(request)
        except TimeoutError:  # asyncio.timeout's
            raise TransientDeliveryError(
                f"timeout: no complete answer within {self._timeout_seconds:g} s"
            ) from None
        except httpx.TimeoutException as exc:
            text = str(exc).strip()
            if not text and isinstance(exc, httpx.ConnectTimeout):  # httpcore's say nothing
                text = f"no connection within {self._timeout_seconds / 2:g} s"
            raise TransientDeliveryError(f"timeout: {_short(exc, text)}") from None
        except AnswerOverLimit as exc:
            raise TransientDeliveryError(_short(exc)) from None
        except httpx.TransportError as exc:
            raise TransientDeliveryError(f"connection error: {_short(exc)}") from None
        status = response.status_code
        if 200 <= status < 300:
            return status
        reason = f"HTTP {status}"
        if status == 429 or status >= 500:
            raise TransientDeliveryError(
                reason,
                status_code=status,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if 300 <= status < 400:
            reason += " (redirect not followed; check the workflow URL)"
        raise PermanentDeliveryError(reason, status_code=status)

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        """One request through httpx's transport and its answer, whose body is drained (only
        the status and headers are used) up to ``MAX_ANSWER_BYTES``."""
        response = await self._transport.handle_async_request(request)
        try:
            size = 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise AnswerOverLimit(f"answer body over {MAX_ANSWER_BYTES // 1024} KiB")
        finally:
            await response.aclose()
        return response


def _short(exc: BaseException, text: str = "") -> str:
    text = text or str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:_ERROR_TEXT_LIMIT]
