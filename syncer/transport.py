"""An httpx transport on aiohttp, cut to what a workflow call needs.

httpx stays the API (``httpx.Request`` in, ``httpx.Response`` out, httpx's exception types), and
aiohttp moves the bytes. Compared with the general-purpose ``httpx_aiohttp`` transport it reads
the whole (small) answer at once instead of wrapping a stream, parses each URL once, and builds
one ``ClientTimeout`` per timeout setting: together about half the per-call cost of a Tray call
(see bench/README.md). Redirects are never followed, bodies are neither compressed nor
decompressed, and TLS is verified with the system's trust store.
"""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp
import httpx
from yarl import URL

# An answer larger than this is cut off: Tray answers a few bytes, and only the status and
# Retry-After are used.
MAX_ANSWER_BYTES = 64 * 1024


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, max_connections: int, keepalive_seconds: float = 15.0) -> None:
        self._max_connections = max_connections
        self._keepalive_seconds = keepalive_seconds
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        self._timeouts: dict[tuple[Any, ...], aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            keepalive_timeout=self._keepalive_seconds,
            ssl=ssl.create_default_context(),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            # httpx's headers are passed as they are: no User-Agent or Accept of aiohttp's own.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self._session

    def _url(self, url: httpx.URL) -> URL:
        text = str(url)
        parsed = self._urls.get(text)
        if parsed is None:
            parsed = self._urls[text] = URL(text, encoded=True)
        return parsed

    def _timeout(self, request: httpx.Request) -> aiohttp.ClientTimeout:
        limits = request.extensions.get("timeout") or {}
        key = (limits.get("connect"), limits.get("read"), limits.get("write"), limits.get("pool"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            connect, read, write, pool = key
            # aiohttp has no write timeout: a stalled write shows as a read timeout instead.
            timeout = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None,
                connect=pool,
                sock_connect=connect,
                sock_read=read if read is not None else write,
            )
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        try:
            async with session.request(
                request.method,
                self._url(request.url),
                headers=request.headers.multi_items(),
                data=request.content or None,
                allow_redirects=False,
                compress=False,
                timeout=self._timeout(request),
            ) as answer:
                content = await _read_answer(answer)
                status = answer.status
                headers = answer.raw_headers
        except TimeoutError as exc:
            # aiohttp's timeouts (ServerTimeoutError, ConnectionTimeoutError) are TimeoutErrors.
            connecting = isinstance(exc, aiohttp.ConnectionTimeoutError)
            error = httpx.ConnectTimeout if connecting else httpx.ReadTimeout
            raise error(str(exc) or type(exc).__name__, request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except aiohttp.ClientPayloadError as exc:
            raise httpx.ReadError(str(exc), request=request) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise httpx.RemoteProtocolError(
                str(exc) or "server disconnected", request=request
            ) from exc
        except aiohttp.InvalidURL as exc:
            raise httpx.UnsupportedProtocol(str(exc), request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.TransportError(str(exc) or type(exc).__name__, request=request) from exc
        return httpx.Response(status, headers=headers, content=content, request=request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_answer(answer: aiohttp.ClientResponse) -> bytes:
    """The answer's body, at most MAX_ANSWER_BYTES of it (the connection is dropped if more)."""
    length = answer.content_length
    if length is not None and length <= MAX_ANSWER_BYTES:
        return await answer.read()
    chunks: list[bytes] = []
    size = 0
    async for chunk in answer.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_ANSWER_BYTES:
            answer.close()
            break
    return b"".join(chunks)[:MAX_ANSWER_BYTES]
