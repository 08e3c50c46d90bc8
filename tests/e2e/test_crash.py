"""``kill -9`` during a run loses nothing: the next run sends what is owed, duplicates stay few.

The receiver runs in its own process (it outlives the killed syncer and keeps a record file).
The first run sends 3000 users two at a time (a few seconds of delivery here), and is killed
once the receiver has recorded a given number of requests, so the kill lands where each
scenario wants it whatever the machine's speed:

- before the commit (the audience query is made slow; the run's row exists, nothing else);
- early in delivery, and in the middle of it (on PostgreSQL);
- in the middle of delivery with ``delivery_processes = 2``: the helper process dies with the
  run's process (nothing keeps sending behind the next run's back), and what either had
  claimed is sent by the next run.

The second run uses more concurrency and must end with every user told, exit 0.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from tests.e2e.conftest import Project
from tests.helpers import TEST_SECRET, children, gone, start_cli
from tests.receiver import ReceiverProcess

USERS = [f"user-{i:05d}" for i in range(3000)]
NAME, KEY = "Crash Audience", "crash_audience"
FAST_SQL = "SELECT user_id FROM users"
# about a second of work on SQLite before the first id comes out
SLOW_SQL = (
    "SELECT user_id FROM users WHERE (WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL "
    "SELECT x + 1 FROM n WHERE x < 1500000) SELECT max(x) FROM n) > 0"
)
FIRST_RUN_CONCURRENCY = 2
SECOND_RUN_CONCURRENCY = 8
MAX_DUPLICATES = 500  # about half a second of sending here


@dataclass(frozen=True, kw_only=True)
class KillPoint:
    sql: str
    after_received: (
        int | None
    )  # kill once the receiver recorded this many; None: once the run began
    processes: int = 1  # [tray] delivery_processes of the first run


BEFORE_COMMIT = KillPoint(sql=SLOW_SQL, after_received=None)
EARLY_DELIVERY = KillPoint(sql=FAST_SQL, after_received=150)
MID_DELIVERY = KillPoint(sql=FAST_SQL, after_received=1200)
MID_DELIVERY_TWO_PROCESSES = KillPoint(sql=FAST_SQL, after_received=1200, processes=2)


def _wait_until(condition: Callable[[], bool], process: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(
                f"syncer exited ({process.returncode}) before {what}\n"
                f"--- stdout\n{process.read_stdout()}--- stderr\n{process.read_stderr()}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _runs(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                text("SELECT id, kind, status, committed_at FROM sync_runs ORDER BY id")
            ).all()
        )


def _count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


@pytest.mark.parametrize(
    ("backend", "point"),
    [
        pytest.param("sqlite", BEFORE_COMMIT, id="sqlite-before-commit"),
        pytest.param("sqlite", EARLY_DELIVERY, id="sqlite-early-delivery"),
        pytest.param(
            "postgres", MID_DELIVERY, id="postgres-mid-delivery", marks=pytest.mark.postgres
        ),
        pytest.param(
            "postgres",
            MID_DELIVERY_TWO_PROCESSES,
            id="postgres-mid-delivery-two-processes",
            marks=pytest.mark.postgres,
        ),
    ],
)
def test_kill_9_loses_nothing(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    project_factory: Callable[..., Project],
    backend: str,
    point: KillPoint,
) -> None:
    state_url = str(request.getfixturevalue("pg_url" if backend == "postgres" else "sqlite_url"))
    state = create_engine(state_url)
    receiver = ReceiverProcess(tmp_path / "received.jsonl", secret=TEST_SECRET)
    try:
        with receiver as rx:
            url = rx.url("w1")
            p = project_factory(
                state_url,
                USERS,
                workflow_urls=[url],
                shared_secret=TEST_SECRET,
                tray={
                    "max_concurrency": FIRST_RUN_CONCURRENCY,
                    "delivery_processes": point.processes,
                },
            )
            second_settings = p.write_settings(
                "second-run.toml",
                workflow_urls=[url],
                shared_secret=TEST_SECRET,
                tray={"max_concurrency": SECOND_RUN_CONCURRENCY},
            )
            p.cli("db", "upgrade")
            p.cli("audience", "create", NAME, "--sql", point.sql)

            with start_cli("sync", settings=p.settings, env=p.env) as syncer:
                if point.after_received is None:
                    _wait_until(lambda: bool(_runs(state)), syncer, "the run began", 30)
                else:
                    wanted = point.after_received
                    _wait_until(
                        lambda: len(rx.records()) >= wanted, syncer, f"{wanted} requests", 60
                    )
                helpers = children(syncer.pid)
                assert len(helpers) == point.processes - 1, helpers
                syncer.send_signal(signal.SIGKILL)
                assert syncer.wait(timeout=10) == -signal.SIGKILL
                deadline = time.monotonic() + 5
                while not all(gone(pid) for pid in helpers) and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert all(gone(pid) for pid in helpers), "a delivery helper outlived syncer"
            received_before_kill = len(rx.records())

            [killed] = _runs(state)
            assert killed.status == "running"
            committed = killed.committed_at is not None
            if point is BEFORE_COMMIT:
                assert not committed, "the kill meant to land before the commit came after it"
            if not committed:  # a crash before the commit changes nothing
                assert _count(state, "memberships") == 0
                assert _count(state, "deliveries") == 0
                assert received_before_kill == 0
            else:
                assert _count(state, "deliveries") == len(USERS)

            p.cli("sync", settings=second_settings)
            records = rx.records()
            runs = p.cli("history", "--json", settings=second_settings).stdout
    finally:
        state.dispose()

    # every user told, with the right value and a valid signature
    calls: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        body = record["body"]
        assert record["status"] == 200, record
        assert record["signature_ok"] is True, record
        assert body["type"] == "identify" and body["traits"] == {KEY: True}, body
        calls[body["userId"]].append(body)
    assert sorted(calls) == USERS, f"{len(USERS) - len(calls)} users never told"

    # duplicates: only calls in flight (or not yet recorded as sent) at the kill, same messageId
    times = Counter(len(bodies) for bodies in calls.values())
    duplicated = sum(count for told, count in times.items() if told > 1)
    print(
        f"\n{request.node.callspec.id}: {received_before_kill} received before the kill, "
        f"committed={committed}, users told n times: {dict(sorted(times.items()))}"
    )
    assert max(times) <= 2, times
    # outcomes are recorded in batches every fraction of a second: at most that much is resent
    assert duplicated <= min(received_before_kill, MAX_DUPLICATES), times
    for bodies in calls.values():
        assert len({body["messageId"] for body in bodies}) == 1, bodies

    # history: the killed run is 'interrupted' (nothing stays 'running'); the next run is
    # 'incremental' when the killed one had committed its snapshot, else still 'initial'
    second, first = json.loads(runs)
    assert first["run_id"] == killed.id and first["status"] == "interrupted", first
    assert second["status"] == "succeeded", second
    assert second["kind"] == ("incremental" if committed else "initial"), second
    assert second["members"] == len(USERS)
