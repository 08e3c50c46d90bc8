"""A fast loopback stand-in for Tray workflow URLs, run in its own process.

A bare ``asyncio.Protocol`` speaking just enough HTTP/1.1: keep-alive, pipelining, bodies by
``Content-Length``. Every ``POST`` gets ``200`` with a two-byte JSON body; ``GET /stats``
answers ``{"requests": N, "bytes": B}`` (POSTs received so far) for checking that every call
arrived. Chunked bodies are not supported (neither client sends them for a bytes body).

    python -m bench.receiver [--port 0]

prints ``listening on http://127.0.0.1:PORT`` on its first line, then serves until SIGTERM/SIGINT.
Only the standard library is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

HOST = "127.0.0.1"
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_CONTENT_LENGTH = b"\r\ncontent-length:"
_CLOSE = b"\r\nconnection: close"


class Stats:
    requests = 0
    bytes = 0


class HttpProtocol(asyncio.Protocol):
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        replies = []
        close = False
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = bytes(buffer[:end]).lower()
            length = 0
            at = head.find(_CONTENT_LENGTH)
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                try:
                    length = int(head[at + len(_CONTENT_LENGTH) : stop if stop >= 0 else None])
                except ValueError:
                    replies.append(BAD)
                    close = True
                    break
            total = end + 4 + length
            if len(buffer) < total:
                break
            del buffer[:total]
            if head.startswith(b"get /stats"):
                body = json.dumps(
                    {"requests": self.stats.requests, "bytes": self.stats.bytes}
                ).encode()
                replies.append(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
            else:
                self.stats.requests += 1
                self.stats.bytes += length
                replies.append(OK)
            if _CLOSE in head:
                close = True
                break
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))
            if close:
                self.transport.close()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    server = await loop.create_server(
        lambda: HttpProtocol(stats), HOST, port, backlog=1024, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on http://{HOST}:{bound}", flush=True)
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    async with server:
        await stopped.wait()
    print(json.dumps({"requests": stats.requests, "bytes": stats.bytes}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
