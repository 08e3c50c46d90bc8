"""A loopback HTTP receiver standing in for Tray.io workflow URLs.

Every path is its own "workflow URL" (``rx.url("w1")``); the receiver answers POSTs on any path,
records each request (thread-safe) and can inject faults deterministically::

    with Receiver(secret="s3cret", fail_ratio=0.2, fault_modes=["503", "drop"], seed=7) as rx:
        ...  # point the code under test at rx.url("w1"), rx.url("w2")
        rx.wait_for(10, path="w1")
        assert rx.final_traits("w1")["u1"] == {"vip": True}

What a request gets, first match wins: ``fail_next`` (a queue of one-off faults), the user's fixed
status (``set_user_status``), the path's fixed status (``set_status``), a random fault drawn with
probability ``fail_ratio`` from ``fault_modes``, else ``200``. A fault mode (or fixed status) is an
HTTP status (``"503"``, ``"429"``, ``500`` …; a 429 carries ``Retry-After: <retry_after>``),
``"slow"`` (wait ``slow_seconds``, then answer 200; meant to trip the client's timeout, so it is
recorded as ``"slow"`` and never counts as accepted) or ``"drop"`` (close the connection without a
response; recorded as ``"dropped"``). A request is recorded before its answer is written: once a
client has seen a 2xx, the receiver has the record.

Also runs as its own process, for end-to-end tests that ``kill -9`` the client::

    python tests/receiver.py --port 0 --record FILE [--fail-ratio R] [--fault-modes 503,429,drop,slow]
                             [--seed N] [--secret S] [--slow-seconds S] [--retry-after S]

prints the port on stdout's first line and appends one flushed JSON line per request to FILE
(``read_record_file`` reads it back). Only the standard library is used here.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import http.server
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Literal, Self
from urllib.parse import urlsplit

HOST = "127.0.0.1"
SLOW: Final = "slow"
DROP: Final = "drop"
FAULT_MODES = ("503", "429", SLOW, DROP)
DEFAULT_SLOW_SECONDS = 5.0
DEFAULT_RETRY_AFTER = "0"
SIGNATURE_HEADER = "X-Signature"

# What the receiver did with a request: an HTTP status, or "dropped" / "slow".
Status = int | Literal["dropped", "slow"]
# What the receiver is told to do: an HTTP status, or "drop" / "slow".
Action = int | Literal["drop", "slow"]


class Headers(Mapping[str, str]):
    """Request headers with case-insensitive lookup; repeated headers are joined with ", "."""

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        merged: dict[str, str] = {}
        for name, value in items:
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        self._items = merged

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass(frozen=True, kw_only=True)
class RecordedRequest:
    seq: int  # arrival order, from 0
    method: str
    path: str  # "/w1", without the query string
    headers: Headers
    body: bytes
    json: Any  # the parsed body, None when it is not JSON
    status: Status
    fault: str | None  # why it was not a plain 200: "503", "slow", "drop", "path:500", "user:400"…
    signature_ok: bool | None  # None when the receiver has no secret
    received_at: float  # time.time()
    monotonic: float  # time.monotonic(), for measuring gaps between retries
    client_port: int  # one value per client connection: shows keep-alive reuse

    @property
    def accepted(self) -> bool:
        return isinstance(self.status, int) and 200 <= self.status < 300

    @property
    def message_type(self) -> str | None:
        value = self.json.get("type") if isinstance(self.json, dict) else None
        return value if isinstance(value, str) else None

    @property
    def user_id(self) -> str | None:
        value = self.json.get("userId") if isinstance(self.json, dict) else None
        return value if isinstance(value, str) else None

    @property
    def message_id(self) -> str | None:
        value = self.json.get("messageId") if isinstance(self.json, dict) else None
        return value if isinstance(value, str) else None

    def as_record_line(self) -> dict[str, Any]:
        """The JSON line written to a record file."""
        body: Any = self.json
        if body is None and self.body:
            body = self.body.decode("utf-8", "replace")
        return {
            "seq": self.seq,
            "path": self.path,
            "status": self.status,
            "fault": self.fault,
            "signature_ok": self.signature_ok,
            "received_at": self.received_at,
            "body": body,
        }


def sign(secret: str, body: bytes) -> str:
    """Lowercase hex HMAC-SHA1 of the exact body bytes, as Segment signs for Tray."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha1).hexdigest()


def parse_action(value: Action | str) -> Action:
    """``503``, ``"503"``, ``"slow"`` or ``"drop"`` -> an :data:`Action`."""
    if isinstance(value, bool):
        raise ValueError(f"not a fault mode: {value!r}")
    if isinstance(value, int):
        code = value
    elif value == SLOW:
        return SLOW
    elif value == DROP:
        return DROP
    elif value.isdigit():
        code = int(value)
    else:
        raise ValueError(f"not a fault mode: {value!r}; use an HTTP status, 'slow' or 'drop'")
    if not 100 <= code <= 599:
        raise ValueError(f"not an HTTP status: {code}")
    return code


def _status_of(action: Action) -> Status:
    if isinstance(action, int):
        return action
    return "dropped" if action == DROP else "slow"


def normalize_path(path: str) -> str:
    """``"w1"``, ``"/w1"`` or ``"http://127.0.0.1:PORT/w1"`` -> ``"/w1"``."""
    if "://" in path:
        path = urlsplit(path).path
    path = path.split("?", 1)[0]
    return path if path.startswith("/") else f"/{path}"


class Receiver:
    """A threaded HTTP/1.1 keep-alive server on 127.0.0.1 that records and answers POSTs."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        fail_ratio: float = 0.0,
        fault_modes: Sequence[Action | str] = ("503",),
        seed: int | None = 0,
        slow_seconds: float = DEFAULT_SLOW_SECONDS,
        retry_after: str | float | None = DEFAULT_RETRY_AFTER,
        max_body_bytes: int | None = None,
        record_file: Path | None = None,
        port: int = 0,
    ) -> None:
        self.secret = secret
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after  # header value on 429s; None: no header
        self.max_body_bytes = max_body_bytes  # larger bodies get 413 (Tray takes up to 1 MB)
        self._port_wanted = port
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._records: list[RecordedRequest] = []
        self._seq = 0
        self._fail_ratio = 0.0
        self._fault_modes: tuple[Action, ...] = ()
        self._rng = random.Random(seed)
        self._path_status: dict[str, Action] = {}
        self._user_status: dict[str, Action] = {}
        self._fail_next: list[tuple[str | None, Action]] = []
        self.set_faults(fail_ratio=fail_ratio, fault_modes=fault_modes)
        self._record_path = record_file
        self._record_io: IO[str] | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # lifecycle ---------------------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("receiver already started")
        self._stopping.clear()
        self._server = _Server((HOST, self._port_wanted), _Handler, self)
        self._port_wanted = int(self._server.server_address[1])  # a restart keeps the URLs
        if self._record_path is not None:
            self._record_io = self._record_path.open("a", encoding="utf-8")
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"receiver:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open keep-alive connections, join every thread, close the socket."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()  # wakes "slow" handlers
        server.shutdown()
        thread.join()
        server.close_connections()
        server.server_close()
        self._server = self._thread = None
        if self._record_io is not None:
            self._record_io.close()
            self._record_io = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port; kept after ``stop()``, and ``start()`` binds it again."""
        if not self._port_wanted:
            raise RuntimeError("receiver not started")
        return self._port_wanted

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, name: str = "w1") -> str:
        """The workflow URL called ``name``: ``http://127.0.0.1:PORT/<name>``."""
        return f"{self.base_url}/{name.lstrip('/')}"

    # faults ------------------------------------------------------------------------------------

    @property
    def fail_ratio(self) -> float:
        return self._fail_ratio

    @fail_ratio.setter
    def fail_ratio(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"fail_ratio must be within 0..1, got {value!r}")
        with self._lock:
            self._fail_ratio = float(value)

    @property
    def fault_modes(self) -> tuple[Action, ...]:
        return self._fault_modes

    @fault_modes.setter
    def fault_modes(self, modes: Sequence[Action | str]) -> None:
        if isinstance(modes, str):
            modes = modes.split(",")
        parsed = tuple(parse_action(mode) for mode in modes)
        with self._lock:
            self._fault_modes = parsed

    def set_faults(
        self,
        *,
        fail_ratio: float | None = None,
        fault_modes: Sequence[Action | str] | None = None,
        seed: int | None = None,
        slow_seconds: float | None = None,
        retry_after: str | float | None = None,
    ) -> None:
        """Change random fault injection at runtime; ``seed`` restarts the random sequence."""
        if fault_modes is not None:
            self.fault_modes = fault_modes
        if fail_ratio is not None:
            self.fail_ratio = fail_ratio
        if fail_ratio and not self._fault_modes:
            raise ValueError("fail_ratio > 0 needs at least one fault mode")
        if seed is not None:
            with self._lock:
                self._rng = random.Random(seed)
        if slow_seconds is not None:
            self.slow_seconds = slow_seconds
        if retry_after is not None:
            self.retry_after = retry_after

    def set_status(self, path: str, code: Action | str | None) -> None:
        """Make every request on ``path`` answer ``code`` (500: "down"); None: back to normal."""
        key = normalize_path(path)
        with self._lock:
            if code is None:
                self._path_status.pop(key, None)
            else:
                self._path_status[key] = parse_action(code)

    def set_user_status(self, user_id: str, code: Action | str | None) -> None:
        """Make every request whose body has ``userId == user_id`` answer ``code``."""
        with self._lock:
            if code is None:
                self._user_status.pop(user_id, None)
            else:
                self._user_status[user_id] = parse_action(code)

    def fail_next(self, count: int, mode: Action | str = "503", *, path: str | None = None) -> None:
        """The next ``count`` requests (on ``path``, or any) answer ``mode``, then normal again."""
        action = parse_action(mode)
        key = normalize_path(path) if path is not None else None
        with self._lock:
            self._fail_next.extend([(key, action)] * count)

    def clear_faults(self) -> None:
        """No random faults, no fixed statuses, no queued one-off faults."""
        with self._lock:
            self._fail_ratio = 0.0
            self._path_status.clear()
            self._user_status.clear()
            self._fail_next.clear()

    # what arrived ------------------------------------------------------------------------------

    def requests(self, path: str | None = None) -> list[RecordedRequest]:
        """Every recorded request (on ``path`` if given), in arrival order."""
        key = normalize_path(path) if path is not None else None
        with self._lock:
            return [r for r in self._records if key is None or r.path == key]

    def accepted(self, path: str | None = None) -> list[RecordedRequest]:
        """The requests answered 2xx (on ``path`` if given), in arrival order."""
        return [r for r in self.requests(path) if r.accepted]

    def final_traits(self, path: str) -> dict[str, dict[str, bool]]:
        """user id -> traits of the accepted identify calls on ``path``, merged, last value wins.

        Deletes are not applied here; see :meth:`deletes`.
        """
        traits: dict[str, dict[str, bool]] = {}
        for record in self.accepted(path):
            if record.message_type != "identify" or record.user_id is None:
                continue
            sent = record.json.get("traits")
            traits.setdefault(record.user_id, {}).update(sent if isinstance(sent, dict) else {})
        return traits

    def deletes(self, path: str) -> list[str]:
        """User ids of the accepted ``delete`` messages on ``path``, in arrival order."""
        return [
            r.user_id
            for r in self.accepted(path)
            if r.message_type == "delete" and r.user_id is not None
        ]

    def wait_for(
        self, count: int, path: str | None = None, timeout: float = 10.0
    ) -> list[RecordedRequest]:
        """Wait until at least ``count`` accepted requests arrived (on ``path``); return them all.

        Raises TimeoutError naming how many arrived.
        """
        key = normalize_path(path) if path is not None else None
        deadline = time.monotonic() + timeout

        def accepted() -> list[RecordedRequest]:
            return [r for r in self._records if r.accepted and (key is None or r.path == key)]

        with self._arrived:
            while len(found := accepted()) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    where = f" on {key}" if key else ""
                    raise TimeoutError(
                        f"receiver: {len(found)} of {count} accepted requests{where} "
                        f"after {timeout}s ({len(self._records)} requests in all)"
                    )
                self._arrived.wait(left)
            return found

    def clear_records(self) -> None:
        with self._lock:
            self._records.clear()

    # called by the handler ---------------------------------------------------------------------

    def _decide(self, path: str, user_id: str | None, body_size: int) -> tuple[Action, str | None]:
        with self._lock:
            if self.max_body_bytes is not None and body_size > self.max_body_bytes:
                return 413, "too_large"
            for i, (only_path, action) in enumerate(self._fail_next):
                if only_path is None or only_path == path:
                    del self._fail_next[i]
                    return action, f"next:{action}"
            if user_id is not None and user_id in self._user_status:
                action = self._user_status[user_id]
                return action, f"user:{action}"
            if path in self._path_status:
                action = self._path_status[path]
                return action, f"path:{action}"
            if self._fail_ratio > 0 and self._rng.random() < self._fail_ratio:
                action = self._rng.choice(self._fault_modes)
                return action, str(action)
            return 200, None

    def _record(self, **fields: Any) -> RecordedRequest:
        with self._arrived:
            record = RecordedRequest(seq=self._seq, **fields)
            self._seq += 1
            self._records.append(record)
            if self._record_io is not None:
                self._record_io.write(json.dumps(record.as_record_line()) + "\n")
                self._record_io.flush()
            self._arrived.notify_all()
        return record


class _Server(http.server.ThreadingHTTPServer):
    """One daemon thread per connection; tracks connections so ``stop`` can cut and join them."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], handler: type[_Handler], rx: Receiver) -> None:
        self.receiver = rx
        self._conn_lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection, args=(request, client_address), daemon=True
        )
        with self._conn_lock:
            self._connections[request] = thread
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._conn_lock:
                self._connections.pop(request, None)

    def close_connections(self) -> None:
        with self._conn_lock:
            open_now = dict(self._connections)
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in open_now.values():
            thread.join(timeout=10)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away (timeout, reset): expected with faults
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def do_POST(self) -> None:
        rx = self.server.receiver
        path = normalize_path(self.path)
        body = self._read_body()
        try:
            parsed: Any = json.loads(body) if body else None
        except ValueError:
            parsed = None
        user_id = parsed.get("userId") if isinstance(parsed, dict) else None
        action, fault = rx._decide(path, user_id if isinstance(user_id, str) else None, len(body))
        signature_ok: bool | None = None
        if rx.secret is not None:
            given = self.headers.get(SIGNATURE_HEADER)
            signature_ok = given is not None and hmac.compare_digest(given, sign(rx.secret, body))
        rx._record(
            method="POST",
            path=path,
            headers=Headers(self.headers.items()),
            body=body,
            json=parsed,
            status=_status_of(action),
            fault=fault,
            signature_ok=signature_ok,
            received_at=time.time(),
            monotonic=time.monotonic(),
            client_port=int(self.client_address[1]),
        )
        if action == DROP:
            self.close_connection = True
            return
        if action == SLOW:
            self.close_connection = True  # the client has most likely given up on this one
            if rx._stopping.wait(rx.slow_seconds):
                return
        code = action if isinstance(action, int) else 200
        extra: dict[str, str] = {}
        if code == 429 and rx.retry_after is not None:
            extra["Retry-After"] = str(rx.retry_after)
        self._answer(code, extra)

    def _unsupported(self) -> None:
        self._read_body()
        self._answer(405, {"Allow": "POST"})

    do_GET = do_PUT = do_PATCH = do_DELETE = _unsupported

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _answer(self, code: int, extra_headers: Mapping[str, str]) -> None:
        """Write status line, headers and body in one send (keeps keep-alive latency low)."""
        payload = json.dumps({"ok": 200 <= code < 300, "status": code}).encode()
        phrase = self.responses.get(code, ("Unknown",))[0]
        lines = [
            f"{self.protocol_version} {code} {phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
        ]
        lines += [f"{name}: {value}" for name, value in extra_headers.items()]
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the records are the log


def read_record_file(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a ``--record`` file; a torn last line (after ``kill -9``) is skipped."""
    if not path.exists():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(line))
    return lines


class ReceiverProcess:
    """``tests/receiver.py`` in its own process, for end-to-end tests. A context manager."""

    def __init__(
        self,
        record_file: Path,
        *,
        secret: str | None = None,
        fail_ratio: float = 0.0,
        fault_modes: Sequence[str] = ("503",),
        seed: int = 0,
        slow_seconds: float = DEFAULT_SLOW_SECONDS,
    ) -> None:
        self.record_file = record_file
        args = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--port",
            "0",
            "--record",
            str(record_file),
            "--fail-ratio",
            str(fail_ratio),
            "--fault-modes",
            ",".join(fault_modes),
            "--seed",
            str(seed),
            "--slow-seconds",
            str(slow_seconds),
        ]
        if secret is not None:
            args += ["--secret", secret]
        self._args = args
        self._process: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> Self:
        self._process = subprocess.Popen(
            self._args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self._process.stdout is not None
        first = self._process.stdout.readline().strip()
        if not first.isdigit():
            self.stop()
            raise RuntimeError(f"receiver process did not print its port (got {first!r})")
        self.port = int(first)
        return self

    def url(self, name: str = "w1") -> str:
        return f"http://{HOST}:{self.port}/{name.lstrip('/')}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("receiver process not running")
        return self._process.pid

    def kill(self) -> None:
        """SIGKILL the receiver process (its record file keeps every flushed line)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def records(self, path: str | None = None) -> list[dict[str, Any]]:
        key = normalize_path(path) if path is not None else None
        return [r for r in read_record_file(self.record_file) if key is None or r["path"] == key]

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Loopback stand-in for Tray.io workflow URLs")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--record", type=Path, help="append one JSON line per request here")
    parser.add_argument("--fail-ratio", type=float, default=0.0)
    parser.add_argument("--fault-modes", default="503", help="comma list: 503,429,drop,slow,…")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--secret")
    parser.add_argument("--slow-seconds", type=float, default=DEFAULT_SLOW_SECONDS)
    parser.add_argument("--retry-after", default=DEFAULT_RETRY_AFTER)
    args = parser.parse_args(argv)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    receiver = Receiver(
        secret=args.secret,
        fail_ratio=args.fail_ratio,
        fault_modes=[mode.strip() for mode in args.fault_modes.split(",") if mode.strip()],
        seed=args.seed,
        slow_seconds=args.slow_seconds,
        retry_after=args.retry_after,
        record_file=args.record,
        port=args.port,
    )
    with receiver:
        print(receiver.port, flush=True)
        while not stop.wait(0.2):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
