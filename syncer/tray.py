"""Tray.io workflow calls: Segment-style payloads, signatures, and one HTTP POST.

Bodies match what Segment sends to Tray (see DESIGN.md, "Wire format"). Calls are
``httpx.Request``s handed to an httpx transport: syncer's own aiohttp transport
(``syncer.transport``, many times faster than httpx's default transport on this workload), or
httpx's default one; both give the same answers and errors, never follow redirects and verify
TLS.
"""

from __future__ import annotations

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
from syncer.transport import AiohttpTransport

MAX_BODY_BYTES = 1_000_000
LIBRARY = {"name": "syncer", "version": __version__}
MESSAGE_NAMESPACE = uuid.UUID("6f1c7a52-3c1e-4a59-9e0b-5d1f2b3c4a10")
_ERROR_TEXT_LIMIT = 200


def format_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a ``Z``, as Segment writes it."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def identify_message_id(audience_id: int, run_id: int, user_id: str) -> str:
    """Stable per (run, audience, user): the same on every retry and every URL."""
    return str(uuid.uuid5(MESSAGE_NAMESPACE, f"identify/{audience_id}/{run_id}/{user_id}"))


def delete_message_id(deletion_id: int) -> str:
    """Stable per deletion request: the same on every retry and every URL."""
    return str(uuid.uuid5(MESSAGE_NAMESPACE, f"delete/{deletion_id}"))


def _encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > MAX_BODY_BYTES:
        raise PermanentDeliveryError(f"body of {len(body)} bytes exceeds Tray's 1 MB limit")
    return body


def identify_body(
    *,
    user_id: str,
    audience_key: str,
    audience_id: int,
    value: bool,
    message_id: str,
    timestamp: datetime,
) -> bytes:
    return _encode(
        {
            "type": "identify",
            "userId": user_id,
            "traits": {audience_key: value},
            "context": {
                "personas": {
                    "computation_class": "audience",
                    "computation_key": audience_key,
                    "computation_id": str(audience_id),
                },
                "library": LIBRARY,
            },
            "integrations": {"All": False},
            "messageId": message_id,
            "timestamp": format_timestamp(timestamp),
        }
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


def signature(body: bytes, secret: Secret) -> str:
    """``X-Signature``: lowercase hex HMAC-SHA1 of the exact body bytes."""
    return hmac.new(secret.reveal().encode(), body, hashlib.sha1).hexdigest()


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
    """

    def __init__(
        self,
        *,
        timeout_seconds: float,
        max_connections: int,
        shared_secret: Secret | None,
        transport: str = "aiohttp",
    ) -> None:
        self._secret = shared_secret
        self._transport: httpx.AsyncBaseTransport
        if transport == "aiohttp":
            self._transport = AiohttpTransport(max_connections=max_connections)
        elif transport == "httpx":
            limits = httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            )
            self._transport = httpx.AsyncHTTPTransport(limits=limits, verify=True)
        else:
            raise ValueError(f"unknown transport {transport!r}")
        self._extensions = {"timeout": httpx.Timeout(timeout_seconds).as_dict()}
        self._headers = httpx.Headers(
            {"Content-Type": "application/json", "User-Agent": f"syncer/{__version__}"}
        )
        self._urls: dict[str, httpx.URL] = {}

    async def __aenter__(self) -> TrayClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._transport.aclose()

    async def post(self, url: str, body: bytes) -> int:
        """Send one message. Returns the 2xx status, or raises a DeliveryError subclass."""
        headers = self._headers
        if self._secret is not None:
            headers = headers.copy()
            headers["X-Signature"] = signature(body, self._secret)
        target = self._urls.get(url)
        if target is None:
            target = self._urls[url] = httpx.URL(url)
        request = httpx.Request(
            "POST", target, content=body, headers=headers, extensions=self._extensions
        )
        try:
            response = await self._transport.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise TransientDeliveryError(f"timeout: {_short(exc)}") from None
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


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:_ERROR_TEXT_LIMIT]
