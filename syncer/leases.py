"""Per-audience leases: no two runs of one audience at once, across processes and hosts.

A lease is a row in ``sync_leases`` (primary key: the audience), so the database, not the
scheduler, prevents double work. The holder renews it while it runs. Another process may take
it over when it has expired, or at once when the holder is a dead process on this same host
(its PID is gone, or now belongs to a process started at another time).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from syncer.db import write_transaction
from syncer.errors import LeaseHeldError
from syncer.models import RUN_INTERRUPTED, RUN_RUNNING, SyncLease, SyncRun

logger = logging.getLogger(__name__)

LEASE_TTL = timedelta(seconds=60)
RENEW_EVERY_SECONDS = 10.0
HOST = socket.gethostname()[:255]


def process_start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot), to tell a reused PID apart."""
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


MY_PID = os.getpid()
MY_START = process_start_ticks(MY_PID)


class Lease:
    """A held lease; renews itself in a background thread until released."""

    def __init__(self, engine: Engine, audience_id: int, token: str) -> None:
        self.engine = engine
        self.audience_id = audience_id
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"lease-{audience_id}", daemon=True
        )
        self.lost = False

    def _renew_loop(self) -> None:
        while not self._stop.wait(RENEW_EVERY_SECONDS):
            try:
                with write_transaction(self.engine) as conn:
                    renewed = conn.execute(
                        update(SyncLease)
                        .where(
                            SyncLease.audience_id == self.audience_id,
                            SyncLease.token == self.token,
                        )
                        .values(expires_at=datetime.now(UTC) + LEASE_TTL)
                    ).rowcount
                if not renewed:
                    self.lost = True
                    logger.error("lost the lease of audience %s", self.audience_id)
                    return
            except Exception:
                logger.warning("could not renew the lease of audience %s", self.audience_id)

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with write_transaction(self.engine) as conn:
            conn.execute(
                delete(SyncLease).where(
                    SyncLease.audience_id == self.audience_id, SyncLease.token == self.token
                )
            )


def _stale(row: SyncLease, now: datetime) -> bool:
    if row.expires_at <= now:
        return True
    return row.holder_host == HOST and not process_alive(row.holder_pid, row.holder_started)


def acquire(engine: Engine, audience_id: int, audience_key: str) -> Lease:
    """Take the audience's lease or raise LeaseHeldError. Closes runs a dead holder left."""
    token = secrets.token_hex(16)
    now = datetime.now(UTC)
    mine = {
        "token": token,
        "holder_host": HOST,
        "holder_pid": MY_PID,
        "holder_started": MY_START,
        "acquired_at": now,
        "expires_at": now + LEASE_TTL,
    }
    try:
        with write_transaction(engine) as conn:
            row = conn.execute(
                select(SyncLease).where(SyncLease.audience_id == audience_id).with_for_update()
            ).first()
            if row is None:
                conn.execute(insert(SyncLease).values(audience_id=audience_id, **mine))
            elif _stale(SyncLease(**row._mapping), now):
                logger.warning(
                    "audience %s: taking over the lease of dead or expired holder %s pid %s",
                    audience_key,
                    row.holder_host,
                    row.holder_pid,
                )
                conn.execute(
                    update(SyncLease)
                    .where(SyncLease.audience_id == audience_id, SyncLease.token == row.token)
                    .values(**mine)
                )
            else:
                raise LeaseHeldError(
                    f"audience {audience_key!r} is being synced right now by "
                    f"{row.holder_host} pid {row.holder_pid}; try again when it finishes"
                )
            # Whoever held this audience before us is gone: close the runs it left open.
            conn.execute(
                update(SyncRun)
                .where(SyncRun.audience_id == audience_id, SyncRun.status == RUN_RUNNING)
                .values(
                    status=RUN_INTERRUPTED,
                    finished_at=now,
                    error="the process running it stopped before it finished",
                )
            )
    except IntegrityError:
        raise LeaseHeldError(
            f"audience {audience_key!r} is being synced right now by another process"
        ) from None
    lease = Lease(engine, audience_id, token)
    lease._thread.start()
    return lease


@contextmanager
def held(engine: Engine, audience_id: int, audience_key: str) -> Iterator[Lease]:
    lease = acquire(engine, audience_id, audience_key)
    try:
        yield lease
    finally:
        lease.release()


def close_orphaned_runs(engine: Engine) -> int:
    """Mark runs 'interrupted' whose audience has no live lease (their process died)."""
    now = datetime.now(UTC)
    with write_transaction(engine) as conn:
        running = conn.execute(
            select(SyncRun.id, SyncRun.audience_id).where(SyncRun.status == RUN_RUNNING)
        ).all()
        if not running:
            return 0
        leases = {
            row.audience_id: SyncLease(**row._mapping)
            for row in conn.execute(select(SyncLease)).all()
        }
        orphaned = [
            run.id
            for run in running
            if run.audience_id not in leases or _stale(leases[run.audience_id], now)
        ]
        if orphaned:
            conn.execute(
                update(SyncRun)
                .where(SyncRun.id.in_(orphaned), SyncRun.status == RUN_RUNNING)
                .values(
                    status=RUN_INTERRUPTED,
                    finished_at=now,
                    error="the process running it stopped before it finished",
                )
            )
    return len(orphaned)
