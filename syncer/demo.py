"""``syncer demo``: the whole flow in seconds, on the embedded default.

It builds a demo warehouse (users and orders, SQLite), starts an HTTP receiver on 127.0.0.1
standing in for Tray, defines two audiences, runs their initial syncs, changes some users,
runs an incremental sync, and prints the history. Everything lives in one folder.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import shutil
import sqlite3
import sys
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO

from syncer import audiences, db, history
from syncer.errors import UsageError
from syncer.settings import load_settings
from syncer.sync import RunResult, sync_audiences

MARKER = ".syncer-demo"
DEMO_SECRET = "demo-shared-secret"
AUDIENCES = {
    "Order Completed Last 30days": (
        "SELECT DISTINCT user_id FROM orders WHERE completed_at >= date('now', '-30 day')"
    ),
    "High Value Customers": (
        "SELECT user_id FROM orders GROUP BY user_id HAVING SUM(total) >= 500"
    ),
}


class _QuietServer(ThreadingHTTPServer):
    """A client closing a keep-alive connection is routine here, not worth a traceback."""

    daemon_threads = True
    # socketserver's default backlog of 5 overflows when a client opens its connections all at
    # once: the kernel then drops the handshake's last step, and the call waits seconds.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class DemoReceiver:
    """A stand-in for Tray workflow URLs: counts messages, drops repeats by ``messageId``
    (as a Tray workflow should: delivery is at least once), and checks signatures."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.calls: Counter[str] = Counter()
        self.seen: set[str] = set()
        self.repeats = 0
        self.bad_signatures = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                expected = hmac.new(receiver.secret, body, hashlib.sha1).hexdigest()
                message = json.loads(body)
                with receiver._lock:
                    if self.headers.get("X-Signature") != expected:
                        receiver.bad_signatures += 1
                    if message.get("messageId") in receiver.seen:
                        receiver.repeats += 1
                    else:
                        receiver.seen.add(message.get("messageId"))
                        for trait, value in message.get("traits", {}).items():
                            receiver.calls[f"{trait} = {str(value).lower()}"] += 1
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/demo-workflow"

    def __enter__(self) -> DemoReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def build_warehouse(path: Path, users: int, rng: random.Random) -> None:
    now = datetime.now(UTC)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (user_id TEXT PRIMARY KEY, email TEXT, country TEXT)")
        conn.execute(
            "CREATE TABLE orders (order_id INTEGER PRIMARY KEY, user_id TEXT, "
            "completed_at TEXT, total REAL)"
        )
        conn.executemany(
            "INSERT INTO users VALUES (?, ?, ?)",
            (
                (f"user-{i:05d}", f"user{i}@example.com", rng.choice(["DE", "FR", "US"]))
                for i in range(users)
            ),
        )
        orders = []
        for i in range(users):
            for _ in range(rng.randint(0, 3)):
                when = now - timedelta(days=rng.randint(0, 90))
                orders.append((f"user-{i:05d}", when.strftime("%Y-%m-%d"), rng.randint(20, 400)))
        conn.executemany(
            "INSERT INTO orders (user_id, completed_at, total) VALUES (?, ?, ?)", orders
        )
    conn.close()


def change_warehouse(path: Path, users: int, rng: random.Random) -> None:
    """Some users order today (they enter), some orders are refunded (users may leave)."""
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    with sqlite3.connect(path) as conn:
        buyers = rng.sample(range(users), max(1, users // 50))
        conn.executemany(
            "INSERT INTO orders (user_id, completed_at, total) VALUES (?, ?, ?)",
            ((f"user-{i:05d}", today, 450) for i in buyers),
        )
        recent = [
            row[0]
            for row in conn.execute(
                "SELECT order_id FROM orders WHERE completed_at >= date('now', '-30 day') "
                "AND completed_at < ?",
                (today,),
            )
        ]
        refunded = rng.sample(recent, min(len(recent), max(1, users // 50)))
        conn.executemany("DELETE FROM orders WHERE order_id = ?", ((o,) for o in refunded))
    conn.close()


def _prepare(directory: str) -> Path:
    root = Path(directory).resolve()
    if root.exists() and not root.is_dir():
        raise UsageError(f"--dir {root} is a file, not a folder; pick a folder with --dir")
    try:
        if root.exists():
            if not (root / MARKER).exists() and any(root.iterdir()):
                raise UsageError(
                    f"{root} exists and is not a syncer demo folder; pick another with --dir"
                )
            shutil.rmtree(root)
        root.mkdir(parents=True)
        (root / MARKER).write_text("made by syncer demo; removed and rebuilt on every run\n")
    except OSError as exc:
        raise UsageError(
            f"cannot make the demo folder {root}: {exc.strerror or exc}; pick another with --dir"
        ) from None
    return root


def build_demo_warehouse(path: str, *, users: int, out: TextIO) -> None:
    """Only the demo warehouse (SQLite tables ``users`` and ``orders``), at ``path``: something
    to point ``[sources.default]`` at and try audiences on. Never overwrites a file."""
    target = Path(path).resolve()
    if target.exists():
        raise UsageError(f"--warehouse {target} exists; remove it or pick another path")
    if not target.parent.is_dir():
        raise UsageError(f"--warehouse {target}: the folder {target.parent} does not exist")
    try:
        build_warehouse(target, users, random.Random(7))
    except (OSError, sqlite3.Error) as exc:
        target.unlink(missing_ok=True)
        raise UsageError(f"cannot write the demo warehouse {target}: {exc}") from None
    print(f"demo warehouse with {users} users and their orders: {target}", file=out)


def run_demo(directory: str, *, users: int, out: TextIO) -> int:
    if users < 10:
        raise UsageError("--users must be at least 10")
    root = _prepare(directory)
    rng = random.Random(7)
    warehouse = root / "warehouse.db"
    build_warehouse(warehouse, users, rng)
    with DemoReceiver(DEMO_SECRET) as receiver:
        settings_path = root / "settings.toml"
        settings_path.write_text(
            "# Written by syncer demo.\n"
            '[database]\nurl = "sqlite:///state.db"\n\n'
            '[sources.default]\nurl = "sqlite:///warehouse.db"\n\n'
            f'[tray]\nworkflow_urls = ["{receiver.url}"]\n'
            f'shared_secret = "{DEMO_SECRET}"\n'
        )
        settings = load_settings(str(settings_path))
        db.upgrade(settings.database.url)
        state = db.open_state(settings.database.url)
        try:
            print(f"demo folder: {root}", file=out)
            print(f"local receiver standing in for Tray: {receiver.url}\n", file=out)
            for name, sql in AUDIENCES.items():
                view = audiences.create(state, settings, name=name, sql=sql)
                print(f"created audience {view.key!r}", file=out)
            print("\ninitial sync:", file=out)
            failed = _report(sync_audiences(state, settings), out)
            change_warehouse(warehouse, users, rng)
            print(
                "\nsome users ordered today and some orders were refunded; incremental sync:",
                file=out,
            )
            failed |= _report(sync_audiences(state, settings), out)
            print("\nhistory (syncer history):", file=out)
            print(history.format_runs(history.runs(state)), file=out)
        finally:
            state.dispose()
        print("\nwhat the receiver got:", file=out)
        for call, count in sorted(receiver.calls.items()):
            print(f"  {count:6d} x {call}", file=out)
        print(f"  repeated calls (same messageId, dropped): {receiver.repeats}", file=out)
        print(f"  signatures that did not match: {receiver.bad_signatures}", file=out)
    print(
        f"\nInspect the state database with: sqlite3 {root / 'state.db'} "
        "'SELECT * FROM sync_runs'\n"
        f"Or: syncer --settings {settings_path} history",
        file=out,
    )
    return 1 if failed or receiver.bad_signatures else 0


def _report(results: list[RunResult], out: TextIO) -> bool:
    failed = False
    for r in results:
        print(
            f"  {r.audience_key}: run {r.run_id} {r.kind}, {r.members} members, "
            f"+{r.added} -{r.removed}, sent {r.sent} calls in {r.seconds:.2f}s ({r.status})",
            file=out,
        )
        failed |= r.status != "succeeded"
    return failed
