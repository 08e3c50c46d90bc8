"""One sync run of one audience, step by step, as DESIGN.md's "flow of one run" describes it.

1. take the audience's lease            (leases.acquire)
2. evaluate the definition and stage    (diff.stage)
3. diff staged against current, in SQL  (diff.compute)
4. commit snapshot + changes + outbox   (diff.commit_snapshot: one transaction)
5. deliver the outbox                   (delivery.deliver_audience)
6. finish the run, release the lease    (finish_run)

A crash before step 4 commits changes nothing; after it, nothing is lost: pending deliveries
are sent by the next run, and the dead run is marked 'interrupted' when its lease is taken over.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, insert, select, update

from syncer import alerts, audiences, diff, guard, leases, logs, loops
from syncer.audiences import AudienceView
from syncer.db import write_transaction
from syncer.delivery import (
    Audience,
    DeliveryTotals,
    Progress,
    Target,
    deliver_audience,
    register_destinations,
)
from syncer.errors import LeaseHeldError, SyncerError
from syncer.models import (
    AUDIENCE_DELETED,
    RUN_FAILED,
    RUN_HELD,
    RUN_INCREMENTAL,
    RUN_INITIAL,
    RUN_INTERRUPTED,
    RUN_PARTIAL,
    RUN_RUNNING,
    RUN_SUCCEEDED,
    SyncRun,
)
from syncer.settings import Settings, url_host
from syncer.sources import describe_db_error, open_source

logger = logging.getLogger(__name__)

RUN_SKIPPED = "skipped"  # reported, never stored: another process holds the lease
WAIT_POLL_SECONDS = 1.0
ERROR_LENGTH = 500  # a run's error, as history shows it


@dataclass(frozen=True, kw_only=True)
class RunResult:
    run_id: int | None
    audience_key: str
    kind: str | None
    status: str
    members: int = 0
    added: int = 0
    removed: int = 0
    skipped: int = 0
    sent: int = 0
    failed: int = 0
    seconds: float = 0.0
    error: str | None = None


def sync_audiences(
    state: Engine,
    settings: Settings,
    keys: Sequence[str] = (),
    *,
    progress_for: Callable[[str], Progress] | None = None,
    wait: bool = False,
) -> list[RunResult]:
    """Run the given audiences (default: every active one), one after another.

    An audience another process is running is skipped, or with ``wait`` waited for. One
    audience's failure (its source, the state database, a bug) is that audience's run
    failing: the loop goes on with the next one.
    """
    settings.tray.require_urls()
    views = audiences.to_run(state, keys)
    leases.close_orphaned_runs(state)
    results = []
    for view in views:
        progress = progress_for(view.key) if progress_for else None
        try:
            result = run_audience(state, settings, view, progress=progress, wait=wait)
        except Exception as exc:
            # Before its run could even be opened (the lease, the destinations): nothing of
            # it is in history, so the result says why.
            error = run_error_text(exc, settings)
            logger.error("audience %s could not be run: %s", view.key, error)
            logs.trace(logger, exc)
            result = RunResult(
                run_id=None, audience_key=view.key, kind=None, status=RUN_FAILED, error=error
            )
        results.append(result)
    alerts.submit_check_deliveries(state, settings)  # URLs failing for good, owed too long
    alerts.drain()  # the runs are done: their alerts get a bounded while to be posted
    return results


def run_audience(
    state: Engine,
    settings: Settings,
    audience: AudienceView,
    *,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    wait: bool = False,
    retiring: bool = False,
) -> RunResult:
    """One run: lease, evaluate + stage + diff + commit, deliver, finish.

    ``stop`` (a shutdown) ends delivery early; what was not sent stays owed. ``retiring``
    makes this the audience's last run, which tells every member ``false``.
    """
    targets = register_destinations(state, settings.tray.workflow_urls)
    while True:
        try:
            lease = leases.acquire(state, audience.id, audience.key)
            break
        except LeaseHeldError as exc:
            if not wait or (stop is not None and stop.is_set()):
                return RunResult(
                    run_id=None,
                    audience_key=audience.key,
                    kind=None,
                    status=RUN_SKIPPED,
                    error=str(exc),
                )
            time.sleep(WAIT_POLL_SECONDS)
    try:
        result = _run_leased(state, settings, audience, targets, progress, stop, retiring)
    finally:
        lease.release()
    logger.info(
        "audience %s run %s %s: %s, members %d, +%d -%d, sent %d, failed %d, %.1fs",
        result.audience_key,
        result.run_id,
        result.kind,
        result.status,
        result.members,
        result.added,
        result.removed,
        result.sent,
        result.failed,
        result.seconds,
        extra={"run": asdict(result)},
    )
    if result.error:
        # The reason, in the log too (not only in history): a source that failed, say.
        logger.warning(
            "audience %s run %s %s: %s",
            result.audience_key,
            result.run_id,
            result.status,
            result.error,
        )
    # Posted in the background, after the run is finished: a slow webhook delays no run.
    alerts.submit_after_run(
        state, settings, audience_id=audience.id, audience_key=audience.key, result=result
    )
    return result


def _run_leased(
    state: Engine,
    settings: Settings,
    audience: AudienceView,
    targets: list[Target],
    progress: Progress | None,
    stop: threading.Event | None,
    retiring: bool = False,
) -> RunResult:
    started = time.monotonic()
    run_id, kind = start_run(state, audience.id)
    try:
        try:
            staged, changes = evaluate_and_commit(
                state, settings, audience, run_id, targets, retiring=retiring
            )
        except RunHeld as held:
            return _hold_run(state, audience, run_id, kind, held, started)
        totals = loops.run(
            deliver_audience(
                state,
                Audience(id=audience.id, key=audience.key),
                targets,
                settings.tray,
                progress=progress,
                stop=stop,
            )
        )
    except Exception as exc:
        # The definition no longer runs on its source (a table dropped, a column added), the
        # state database refused something of this audience, or a bug: this audience's run
        # fails, with its error in history; the others go on.
        failure = run_error_text(exc, settings)
        logs.trace(logger, exc)
        finish_run(state, run_id, RUN_FAILED, error=failure)
        return RunResult(
            run_id=run_id,
            audience_key=audience.key,
            kind=kind,
            status=RUN_FAILED,
            error=failure,
            seconds=time.monotonic() - started,
        )
    except BaseException as exc:  # KeyboardInterrupt, SystemExit: recorded, then on their way
        finish_run(state, run_id, RUN_FAILED, error=run_error_text(exc, settings))
        raise
    error = _delivery_error(totals)
    if totals.not_delivered == 0:
        status = RUN_SUCCEEDED
    elif stop is not None and stop.is_set():
        status = RUN_INTERRUPTED
        error = f"stopped by a shutdown; {totals.retry_later} deliveries still owed, sent later"
    else:
        status = RUN_PARTIAL if totals.sent else RUN_FAILED
    finish_run(state, run_id, status, error=error)
    return RunResult(
        run_id=run_id,
        audience_key=audience.key,
        kind=kind,
        status=status,
        members=staged.members - changes.suppressed,
        added=changes.added,
        removed=changes.removed,
        skipped=staged.skipped + changes.suppressed,
        sent=totals.sent,
        failed=totals.not_delivered,
        seconds=time.monotonic() - started,
        error=error,
    )


class RunHeld(SyncerError):
    """The removal guard held the run: nothing was committed. Carries what it would have
    committed, for history."""

    def __init__(self, message: str, *, staged: diff.Staged, changes: diff.Diff) -> None:
        super().__init__(message)
        self.staged = staged
        self.changes = changes


def evaluate_and_commit(
    state: Engine,
    settings: Settings,
    audience: AudienceView,
    run_id: int,
    targets: list[Target],
    *,
    retiring: bool = False,
) -> tuple[diff.Staged, diff.Diff]:
    """Steps 2 to 4 on one state connection (the staged ids live in its temporary tables).

    Between the diff and the commit, the removal guard: a run that would remove too many
    members raises RunHeld, having committed nothing, unless the audience was approved
    (``audience approve``), which this commit then uses up.

    ``retiring``: the audience is being deleted with --unset; its last snapshot is empty, so
    every current member gets ``false`` (the guard does not apply: it is what was asked).
    """
    source = None if retiring else open_source(settings, audience.source)
    try:
        with state.connect() as conn:
            try:
                staged = diff.stage(conn, source, audience.sql, audience.params)
                changes = diff.compute(conn, audience.id)
                approval = None if retiring else _guard(conn, settings, audience, staged, changes)
                changes = diff.commit_snapshot(
                    conn,
                    audience_id=audience.id,
                    run_id=run_id,
                    destination_ids=[t.id for t in targets],
                    staged=staged,
                    diff=changes,
                    approval=approval,
                )
            except BaseException:
                diff.discard(conn, "a failed run")
                raise
            diff.reset_temp_tables(conn)
    finally:
        if source is not None:
            source.engine.dispose()
    return staged, changes


def _guard(
    conn: Connection,
    settings: Settings,
    audience: AudienceView,
    staged: diff.Staged,
    changes: diff.Diff,
) -> datetime | None:
    """Raise RunHeld when the guard holds this run. Returns the audience's approval (read now,
    not when the run started: an approval given meanwhile counts), which the commit uses up
    whether or not this run needed it: ``approve`` lets the next run through, once."""
    with conn.begin():
        approval = diff.pending_approval(conn, audience.id)
    limits = guard.thresholds(settings.guard, audience.guard)
    before = guard.members_before(
        members_after=staged.members - changes.suppressed,
        added=changes.added,
        removed=changes.removed,
    )
    if approval is None and limits.holds(members_before=before, removed=changes.removed):
        reason = limits.describe(members_before=before, removed=changes.removed)
        raise RunHeld(
            f"{reason}; nothing was committed or sent. If the source is right, let it "
            f"through once: syncer audience approve {audience.key}",
            staged=staged,
            changes=changes,
        )
    return approval


def _hold_run(
    state: Engine, audience: AudienceView, run_id: int, kind: str, held: RunHeld, started: float
) -> RunResult:
    """Record a held run with the counts it would have had; nothing else changes."""
    staged, changes = held.staged, held.changes
    members = staged.members - changes.suppressed
    with write_transaction(state) as conn:
        conn.execute(
            update(SyncRun)
            .where(SyncRun.id == run_id, SyncRun.status == RUN_RUNNING)
            .values(
                status=RUN_HELD,
                finished_at=datetime.now(UTC),
                error=str(held),
                members=members,
                added=changes.added,
                removed=changes.removed,
                skipped_ids=staged.skipped + changes.suppressed,
            )
        )
    return RunResult(
        run_id=run_id,
        audience_key=audience.key,
        kind=kind,
        status=RUN_HELD,
        members=members,
        added=changes.added,
        removed=changes.removed,
        skipped=staged.skipped + changes.suppressed,
        seconds=time.monotonic() - started,
        error=str(held),
    )


def retire_audience(
    state: Engine, settings: Settings, key: str, *, unset: bool, wait: bool = False
) -> RunResult | None:
    """``audience delete``: stop scheduling it and retire its key forever.

    With ``unset`` a last run first tells every current member ``false`` (the audience is
    marked deleted before, so no scheduled run can add members back meanwhile; running it
    again on a deleted audience finishes an unset a crash cut short). Without it, what the
    audience still owed is cancelled.
    """
    view = audiences.get(state, key, include_deleted=unset)
    if unset:
        settings.tray.require_urls()  # refused before anything is changed
    if view.status != AUDIENCE_DELETED:
        audiences.set_status(state, key, AUDIENCE_DELETED)
    if not unset:
        audiences.cancel_owed(state, view.id)
        return None
    return run_audience(state, settings, view, wait=wait, retiring=True)


def run_error_text(exc: BaseException, settings: Settings) -> str:
    """A failed run's error as history shows it: one line, the database's own message without
    statements or bound values, workflow URLs as their hosts."""
    if isinstance(exc, SyncerError):
        text = str(exc)
    elif (orig := getattr(exc, "orig", None)) is not None:  # SQLAlchemy's wrapper of a driver's
        text = f"{type(orig).__name__}: {describe_db_error(exc)}"
    else:
        text = f"{type(exc).__name__}: {exc}".rstrip(": ")
    for url in settings.tray.workflow_urls:
        text = text.replace(url, url_host(url))
    lines = text.strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:ERROR_LENGTH]


def _delivery_error(totals: DeliveryTotals) -> str | None:
    if not totals.not_delivered:
        return None
    return (
        f"{totals.not_delivered} deliveries not made ({totals.failed} failed for good, "
        f"{totals.retry_later} still owed and retried by the next run)"
    )


def start_run(state: Engine, audience_id: int) -> tuple[int, str]:
    """Open the run's row. Its kind is 'initial' until a run of this audience has committed."""
    with write_transaction(state) as conn:
        committed_before = conn.execute(
            select(SyncRun.id)
            .where(SyncRun.audience_id == audience_id, SyncRun.committed_at.is_not(None))
            .limit(1)
        ).first()
        kind = RUN_INCREMENTAL if committed_before else RUN_INITIAL
        run_id = conn.execute(
            insert(SyncRun)
            .values(
                audience_id=audience_id,
                kind=kind,
                status=RUN_RUNNING,
                started_at=datetime.now(UTC),
                host=leases.HOST,
                pid=os.getpid(),
            )
            .returning(SyncRun.id)
        ).scalar_one()
    return int(run_id), kind


def finish_run(state: Engine, run_id: int, status: str, *, error: str | None = None) -> None:
    with write_transaction(state) as conn:
        conn.execute(
            update(SyncRun)
            .where(SyncRun.id == run_id, SyncRun.status == RUN_RUNNING)
            .values(status=status, finished_at=datetime.now(UTC), error=error)
        )
