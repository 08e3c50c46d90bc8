"""Leases: the database, not the scheduler, prevents double work across processes and hosts.

Two kinds, one mechanism:

- an audience's lease (a row in ``sync_leases``): no two runs of one audience at once;
- the scheduler's leadership (a row in ``service_leases``): exactly one ``syncer serve``
  schedules, the others stand by.

The holder renews its row while it works. Another process may take a lease over when it has
expired, or at once when the holder is a dead process on this same host (its PID is gone, a
zombie, or now belongs to a process started at another time).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Engine, Row, Table, delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from syncer.db import first_line, write_transaction
from syncer.errors import LeaseHeldError
from syncer.models import RUN_INTERRUPTED, RUN_RUNNING, SERVICE_LEASES, SYNC_LEASES, SyncRun

logger = logging.getLogger(__name__)

AUDIENCE_LEASE_TTL = timedelta(seconds=60)
AUDIENCE_RENEW_SECONDS = 10.0
LEADER_LEASE_TTL = timedelta(seconds=20)
LEADER_RENEW_SECONDS = 5.0
SCHEDULER_LEASE = "scheduler"
DELETIONS_LEASE = "user-deletions"
HOST = socket.gethostname()[:255]
INTERRUPTED_ERROR = "the process running it stopped before it finished"


def process_start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot), to tell a reused PID apart.

    -1 for a zombie (dead, not yet reaped); None where /proc cannot tell.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return -1
    return int(fields[19])


def process_alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now_started = process_start_ticks(pid)
    if now_started == -1:
        return False
    return started is None or now_started is None or now_started == started


@dataclass(frozen=True, kw_only=True)
class _Kind:
    table: Table
    key: Column[Any]
    ttl: timedelta
    renew_seconds: float


AUDIENCE = _Kind(
    table=SYNC_LEASES,
    key=SYNC_LEASES.c.audience_id,
    ttl=AUDIENCE_LEASE_TTL,
    renew_seconds=AUDIENCE_RENEW_SECONDS,
)
DELETIONS = _Kind(
    table=SERVICE_LEASES,
    key=SERVICE_LEASES.c.name,
    ttl=AUDIENCE_LEASE_TTL,
    renew_seconds=AUDIENCE_RENEW_SECONDS,
)
LEADER = _Kind(
    table=SERVICE_LEASES,
    key=SERVICE_LEASES.c.name,
    ttl=LEADER_LEASE_TTL,
    renew_seconds=LEADER_RENEW_SECONDS,
)


def is_stale(row: Row[Any], now: datetime) -> bool:
    """A lease whose holder can no longer be working: expired, or dead on this host."""
    if row.expires_at <= now:
        return True
    return row.holder_host == HOST and not process_alive(row.holder_pid, row.holder_started)


class Lease:
    """A held lease; renews itself in a background thread until released."""

    def __init__(self, engine: Engine, kind: _Kind, key: object, token: str) -> None:
        self.engine = engine
        self.kind = kind
        self.key = key
        self.token = token
        self.lost = threading.Event()
        self._stop = threading.Event()
        # Until when the row surely holds (a monotonic time): renewals that keep failing past
        # it mean another process may have taken the lease over by now.
        self._held_until = time.monotonic() + kind.ttl.total_seconds()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{key}", daemon=True)
        self._thread.start()

    def _mine(self) -> Any:
        return (self.kind.key == self.key) & (self.kind.table.c.token == self.token)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.kind.renew_seconds):
            started = time.monotonic()
            try:
                with write_transaction(self.engine) as conn:
                    renewed = conn.execute(
                        update(self.kind.table)
                        .where(self._mine())
                        .values(expires_at=datetime.now(UTC) + self.kind.ttl)
                    ).rowcount
            except Exception as exc:
                if time.monotonic() < self._held_until:
                    logger.warning(
                        "could not renew the lease on %s: %s", self.key, describe_error(exc)
                    )
                    continue
                logger.error(
                    "could not renew the lease on %s before it expired (%s): giving it up",
                    self.key,
                    describe_error(exc),
                )
                self.lost.set()
                return
            if not renewed:
                logger.error("lost the lease on %s to another process", self.key)
                self.lost.set()
                return
            self._held_until = started + self.kind.ttl.total_seconds()

    def release(self) -> None:
        """Give the lease back. If the database cannot be reached, the lease expires on its
        own within its time to live: that is logged, not raised (the work it guarded is done)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            with write_transaction(self.engine) as conn:
                conn.execute(delete(self.kind.table).where(self._mine()))
        except SQLAlchemyError as exc:
            logger.warning(
                "could not release the lease on %s (%s); it expires within %ds",
                self.key,
                describe_error(exc),
                self.kind.ttl.total_seconds(),
            )


def describe_error(exc: BaseException) -> str:
    """A database error in one line, without statements or bound values."""
    orig = getattr(exc, "orig", None) or exc
    name = type(orig).__name__
    return f"{name}: {first_line(exc)}" if str(orig).strip() else name


def _take(kind: _Kind, engine: Engine, key: object, *, on_takeover: Any = None) -> Lease | Row[Any]:
    """Take the lease, or return the live holder's row."""
    token = secrets.token_hex(16)
    now = datetime.now(UTC)
    pid = os.getpid()
    mine = {
        "token": token,
        "holder_host": HOST,
        "holder_pid": pid,
        "holder_started": process_start_ticks(pid),
        "acquired_at": now,
        "expires_at": now + kind.ttl,
    }
    try:
        with write_transaction(engine) as conn:
            row = conn.execute(select(kind.table).where(kind.key == key).with_for_update()).first()
            if row is None:
                conn.execute(insert(kind.table).values({kind.key.name: key, **mine}))
            elif is_stale(row, now):
                logger.warning(
                    "taking over the lease on %s from dead or expired holder %s pid %s",
                    key,
                    row.holder_host,
                    row.holder_pid,
                )
                conn.execute(
                    update(kind.table)
                    .where(kind.key == key, kind.table.c.token == row.token)
                    .values(mine)
                )
            else:
                return row
            if on_takeover is not None:
                on_takeover(conn, now)
    except IntegrityError:
        with engine.connect() as conn:
            holder = conn.execute(select(kind.table).where(kind.key == key)).first()
        if holder is not None:
            return holder
        raise
    return Lease(engine, kind, key, token)


def acquire(engine: Engine, audience_id: int, audience_key: str) -> Lease:
    """Take the audience's lease or raise LeaseHeldError. Closes runs a dead holder left."""

    def close_runs_left_open(conn: Any, now: datetime) -> None:
        # Whoever held this audience before us is gone: close the runs it left open.
        conn.execute(
            update(SyncRun)
            .where(SyncRun.audience_id == audience_id, SyncRun.status == RUN_RUNNING)
            .values(status=RUN_INTERRUPTED, finished_at=now, error=INTERRUPTED_ERROR)
        )

    taken = _take(AUDIENCE, engine, audience_id, on_takeover=close_runs_left_open)
    if isinstance(taken, Lease):
        return taken
    raise LeaseHeldError(
        f"audience {audience_key!r} is being synced right now by "
        f"{taken.holder_host} pid {taken.holder_pid}; try again when it finishes"
    )


def acquire_deletions(engine: Engine) -> Lease:
    """The right to send the user-deletion queue (one sender at a time, like an audience)."""
    taken = _take(DELETIONS, engine, DELETIONS_LEASE)
    if isinstance(taken, Lease):
        return taken
    raise LeaseHeldError(
        f"user deletions are being sent right now by {taken.holder_host} pid "
        f"{taken.holder_pid}; they will be sent, try again later to see the outcome"
    )


def try_lead(engine: Engine) -> Lease | None:
    """Become the scheduling ``syncer serve`` if no live one is, else None."""
    taken = _take(LEADER, engine, SCHEDULER_LEASE)
    return taken if isinstance(taken, Lease) else None


def leader(engine: Engine) -> Row[Any] | None:
    with engine.connect() as conn:
        return conn.execute(select(SERVICE_LEASES).where(LEADER.key == SCHEDULER_LEASE)).first()


def abandon(engine: Engine) -> None:
    """Before a forced exit: close this process's open runs and free its audience leases,
    so that the next run starts at once and history does not show them running."""
    pid = os.getpid()
    with write_transaction(engine) as conn:
        conn.execute(
            update(SyncRun)
            .where(SyncRun.status == RUN_RUNNING, SyncRun.host == HOST, SyncRun.pid == pid)
            .values(
                status=RUN_INTERRUPTED,
                finished_at=datetime.now(UTC),
                error="stopped by a shutdown before it finished; what it owes stays owed",
            )
        )
        conn.execute(
            delete(SYNC_LEASES).where(
                SYNC_LEASES.c.holder_host == HOST, SYNC_LEASES.c.holder_pid == pid
            )
        )


def close_orphaned_runs(engine: Engine) -> int:
    """Mark runs 'interrupted' whose audience has no live lease (their process died)."""
    now = datetime.now(UTC)
    with write_transaction(engine) as conn:
        running = conn.execute(
            select(SyncRun.id, SyncRun.audience_id).where(SyncRun.status == RUN_RUNNING)
        ).all()
        if not running:
            return 0
        leases = {row.audience_id: row for row in conn.execute(select(SYNC_LEASES)).all()}
        orphaned = [
            run.id
            for run in running
            if run.audience_id not in leases or is_stale(leases[run.audience_id], now)
        ]
        if orphaned:
            conn.execute(
                update(SyncRun)
                .where(SyncRun.id.in_(orphaned), SyncRun.status == RUN_RUNNING)
                .values(status=RUN_INTERRUPTED, finished_at=now, error=INTERRUPTED_ERROR)
            )
    return len(orphaned)
