"""Leases: one run of an audience at a time; dead or expired holders are taken over, and the
runs they left behind are closed as 'interrupted'. Crashes before and after the commit.
"""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert

from syncer import history, leases
from syncer.audiences import AudienceView
from syncer.delivery import register_destinations
from syncer.errors import LeaseHeldError
from syncer.models import SyncLease, SyncRun
from syncer.sync import evaluate_and_commit, start_run
from tests.integration.conftest import World

KEY = "pro_users"
OTHER_HOST = "elsewhere.example.internal"


def dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    process = subprocess.Popen(["sleep", "0"])
    process.wait()
    return process.pid


def plant_lease(
    w: World,
    audience: AudienceView,
    *,
    host: str,
    pid: int,
    started: int | None,
    expires_in: timedelta,
) -> None:
    now = datetime.now(UTC)
    with w.state.begin() as conn:
        conn.execute(
            insert(SyncLease).values(
                audience_id=audience.id,
                token="t" * 32,
                holder_host=host,
                holder_pid=pid,
                holder_started=started,
                acquired_at=now - timedelta(minutes=5),
                expires_at=now + expires_in,
            )
        )


def plant_running_run(w: World, audience: AudienceView, *, host: str, pid: int) -> int:
    """A 'running' sync_runs row, as a process that died mid-run leaves it (nothing committed)."""
    with w.state.begin() as conn:
        return int(
            conn.execute(
                insert(SyncRun)
                .values(
                    audience_id=audience.id,
                    kind="initial",
                    status="running",
                    started_at=datetime.now(UTC) - timedelta(minutes=5),
                    host=host,
                    pid=pid,
                )
                .returning(SyncRun.id)
            ).scalar_one()
        )


def run_status(w: World, run_id: int) -> tuple[str, bool, str | None]:
    [row] = w.rows("SELECT status, finished_at, error FROM sync_runs WHERE id = :r", r=run_id)
    return row.status, row.finished_at is not None, row.error


def test_a_live_lease_makes_the_run_skip(world: World) -> None:
    w = world
    w.set_users(["u1", "u2"])
    audience = w.create()
    lease = leases.acquire(w.state, audience.id, audience.key)
    try:
        result = w.sync(KEY)
        assert (result.status, result.run_id, result.kind) == ("skipped", None, None)
        assert result.error is not None and "being synced" in result.error
        assert w.rows("SELECT id FROM sync_runs") == []
        assert w.rx.requests() == []
        assert w.scalar("SELECT token FROM sync_leases") == lease.token
        with pytest.raises(LeaseHeldError):
            leases.acquire(w.state, audience.id, audience.key)
    finally:
        lease.release()
    assert w.rows("SELECT * FROM sync_leases") == []

    result = w.sync(KEY)
    assert (result.status, result.kind) == ("succeeded", "initial")
    assert w.rows("SELECT * FROM sync_leases") == []


def test_a_dead_holder_on_this_host_is_taken_over_at_once(world: World) -> None:
    w = world
    w.set_users(["u1"])
    audience = w.create()
    pid = dead_pid()
    stale_run = plant_running_run(w, audience, host=leases.HOST, pid=pid)
    plant_lease(
        w, audience, host=leases.HOST, pid=pid, started=12345, expires_in=timedelta(hours=1)
    )

    lease = leases.acquire(w.state, audience.id, audience.key)
    try:
        status, finished, error = run_status(w, stale_run)
        assert (status, finished) == ("interrupted", True)
        assert error is not None
        [row] = w.rows("SELECT token, holder_pid FROM sync_leases")
        assert (row.token, row.holder_pid) == (lease.token, os.getpid())
    finally:
        lease.release()


def test_a_reused_pid_is_not_taken_for_the_holder(world: World) -> None:
    """A live pid that belongs to a process started at another time is not the holder."""
    w = world
    w.set_users(["u1"])
    audience = w.create()
    assert leases.process_start_ticks(os.getpid()) is not None
    plant_lease(
        w,
        audience,
        host=leases.HOST,
        pid=os.getpid(),
        started=leases.process_start_ticks(os.getpid()) + 1000,
        expires_in=timedelta(hours=1),
    )

    result = w.sync(KEY)

    assert (result.status, result.kind) == ("succeeded", "initial")


def test_an_expired_lease_of_another_host_is_taken_over(world: World) -> None:
    w = world
    w.set_users(["u1", "u2"])
    audience = w.create()
    stale_run = plant_running_run(w, audience, host=OTHER_HOST, pid=4242)
    plant_lease(
        w, audience, host=OTHER_HOST, pid=4242, started=None, expires_in=-timedelta(seconds=1)
    )

    result = w.sync(KEY)

    assert (result.status, result.kind) == ("succeeded", "initial")
    assert run_status(w, stale_run)[:2] == ("interrupted", True)
    assert w.rx.final_traits("w1") == {"u1": {KEY: True}, "u2": {KEY: True}}
    assert [r.status for r in history.runs(w.state, KEY)] == ["succeeded", "interrupted"]
    assert w.rows("SELECT * FROM sync_leases") == []


def test_a_live_lease_of_another_host_is_respected(world: World) -> None:
    """The pid of another host means nothing here: only expiry frees its lease."""
    w = world
    w.set_users(["u1"])
    audience = w.create()
    running = plant_running_run(w, audience, host=OTHER_HOST, pid=dead_pid())
    plant_lease(
        w, audience, host=OTHER_HOST, pid=dead_pid(), started=1, expires_in=timedelta(minutes=1)
    )

    result = w.sync(KEY)

    assert result.status == "skipped"
    assert OTHER_HOST in (result.error or "")
    assert run_status(w, running)[:2] == ("running", False)
    assert w.rx.requests() == []


def test_close_orphaned_runs_closes_only_runs_without_a_live_holder(world: World) -> None:
    w = world
    w.set_users(["u1"])
    orphan = w.create("Orphan")
    held = w.create("Held")
    expired = w.create("Expired")
    orphan_run = plant_running_run(w, orphan, host=leases.HOST, pid=dead_pid())
    held_run = plant_running_run(w, held, host=leases.HOST, pid=os.getpid())
    expired_run = plant_running_run(w, expired, host=OTHER_HOST, pid=1)
    plant_lease(w, expired, host=OTHER_HOST, pid=1, started=None, expires_in=-timedelta(hours=1))
    lease = leases.acquire(w.state, held.id, held.key)
    try:
        # acquire() closes what a previous holder of *this* audience left: re-open it
        with w.state.begin() as conn:
            conn.exec_driver_sql(
                f"UPDATE sync_runs SET status = 'running', finished_at = NULL WHERE id = {held_run}"
            )

        assert leases.close_orphaned_runs(w.state) == 2

        assert run_status(w, orphan_run)[:2] == ("interrupted", True)
        assert run_status(w, expired_run)[:2] == ("interrupted", True)
        assert run_status(w, held_run)[:2] == ("running", False)
        assert leases.close_orphaned_runs(w.state) == 0
    finally:
        lease.release()
    assert leases.close_orphaned_runs(w.state) == 1
    assert run_status(w, held_run)[:2] == ("interrupted", True)


def test_a_crash_before_the_commit_changes_nothing(world: World) -> None:
    w = world
    w.set_users(["u1", "u2"])
    audience = w.create()
    crashed_run, kind = start_run(w.state, audience.id)  # step 1 done, then the process died
    assert kind == "initial"
    plant_lease(
        w, audience, host=leases.HOST, pid=dead_pid(), started=None, expires_in=timedelta(hours=1)
    )
    assert w.rows("SELECT * FROM memberships") == []

    result = w.sync(KEY)

    assert (result.status, result.kind, result.added) == ("succeeded", "initial", 2)
    assert run_status(w, crashed_run)[:2] == ("interrupted", True)
    assert w.scalar("SELECT committed_at FROM sync_runs WHERE id = :r", r=crashed_run) is None
    assert w.rows("SELECT id FROM deliveries WHERE run_id = :r", r=crashed_run) == []
    assert w.rx.final_traits("w1") == {"u1": {KEY: True}, "u2": {KEY: True}}


def test_a_crash_after_the_commit_loses_nothing(world: World) -> None:
    w = world
    w.set_users(["u1", "u2", "u3"])
    audience = w.create()
    # steps 1 to 4 of a run, then the process died before delivering
    crashed_run, _ = start_run(w.state, audience.id)
    targets = register_destinations(w.state, w.settings.tray.workflow_urls)
    evaluate_and_commit(w.state, w.settings, audience, crashed_run, targets)
    plant_lease(
        w, audience, host=leases.HOST, pid=dead_pid(), started=None, expires_in=timedelta(hours=1)
    )
    assert w.statuses(KEY) == {"pending": 6}

    result = w.sync(KEY)

    assert (result.status, result.kind) == ("succeeded", "incremental")
    assert (result.added, result.removed, result.sent) == (0, 0, 6)
    for path in ("w1", "w2"):
        assert w.rx.final_traits(path) == {u: {KEY: True} for u in ("u1", "u2", "u3")}
    assert w.statuses(KEY) == {"sent": 6}
    older = history.runs(w.state, KEY)[-1]
    assert (older.run_id, older.status, older.members, older.sent) == (
        crashed_run,
        "interrupted",
        3,
        6,
    )
    assert w.members_as_of(KEY, crashed_run) == {"u1", "u2", "u3"}
