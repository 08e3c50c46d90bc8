"""The jobs ``syncer serve`` schedules, referenced by text (``"syncer.jobs:run_audience"``).

They take ids only. What they need besides (the state database, the settings, the shutdown
flag) is bound once when the service starts. A job never raises: what goes wrong is logged in
one line (and a run's failure is recorded on its run), so one audience's trouble neither
reaches APScheduler's threads nor keeps the other audiences from their runs and retries.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from sqlalchemy import Engine

from syncer import alerts, audiences, leases, logs, loops, privacy
from syncer.delivery import (
    Audience,
    Target,
    audiences_owed,
    deliver_audience,
    register_destinations,
)
from syncer.errors import AudienceError, LeaseHeldError
from syncer.models import AUDIENCE_ACTIVE
from syncer.settings import Settings
from syncer.sync import RUN_SKIPPED, run_error_text
from syncer.sync import run_audience as run_one

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ServiceContext:
    state: Engine
    settings: Settings
    stopping: threading.Event


_context: ServiceContext | None = None


def bind(context: ServiceContext) -> None:
    global _context
    _context = context


def _bound() -> ServiceContext:
    if _context is None:
        raise RuntimeError("syncer.jobs used before the service bound its context")
    return _context


def run_audience(audience_id: int) -> None:
    """A scheduled run of one audience (skipped if another process is running it)."""
    ctx = _bound()
    if ctx.stopping.is_set():
        return
    try:
        _run_audience(ctx, audience_id)
    except Exception as exc:
        # Before the run was opened (a run's own failure is recorded on it by sync).
        logger.error(
            "audience %d: the scheduled run could not be made: %s",
            audience_id,
            run_error_text(exc, ctx.settings),
        )
        logs.trace(logger, exc)


def _run_audience(ctx: ServiceContext, audience_id: int) -> None:
    try:
        view = audiences.get_by_id(ctx.state, audience_id)
    except AudienceError:
        return  # deleted since it was scheduled
    if view.status != AUDIENCE_ACTIVE:
        return
    result = run_one(ctx.state, ctx.settings, view, stop=ctx.stopping)
    if result.status == RUN_SKIPPED:
        logger.info("audience %s: not run now: %s", view.key, result.error)


def retry_owed() -> None:
    """Send deliveries whose retry time has come, between the audiences' own runs,
    and the user deletions owed. One audience's failure does not keep the others' from
    being retried."""
    ctx = _bound()
    try:
        targets = register_destinations(ctx.state, ctx.settings.tray.workflow_urls)
        if not targets:
            return
        owing = audiences_owed(ctx.state, [t.id for t in targets])
    except Exception as exc:
        logger.error("retrying owed deliveries: %s", run_error_text(exc, ctx.settings))
        logs.trace(logger, exc)
        return
    try:
        privacy.forward_deletes(ctx.state, ctx.settings, stop=ctx.stopping, due_only=True)
    except LeaseHeldError:
        pass  # a `syncer users delete` is sending them
    except Exception as exc:
        logger.error("retrying owed user deletions: %s", run_error_text(exc, ctx.settings))
        logs.trace(logger, exc)
    for audience in owing:
        if ctx.stopping.is_set():
            return
        try:
            _retry_audience(ctx, audience, targets)
        except Exception as exc:
            logger.error(
                "audience %s: retrying owed deliveries: %s",
                audience.key,
                run_error_text(exc, ctx.settings),
            )
            logs.trace(logger, exc)


def _retry_audience(ctx: ServiceContext, audience: Audience, targets: list[Target]) -> None:
    try:
        lease = leases.acquire(ctx.state, audience.id, audience.key)
    except LeaseHeldError:
        return  # its run is under way and delivers what is owed
    try:
        totals = loops.run(
            deliver_audience(
                ctx.state,
                audience,
                targets,
                ctx.settings.tray,
                stop=ctx.stopping,
                due_only=True,
            )
        )
    finally:
        lease.release()
    if totals.sent or totals.failed:
        logger.info(
            "audience %s: retried owed deliveries: sent %d, failed %d, still owed %d",
            audience.key,
            totals.sent,
            totals.failed,
            totals.retry_later,
        )


def check_alerts() -> None:
    """Alert on workflow URLs failing for good or owed too long (never raises)."""
    ctx = _bound()
    if not ctx.stopping.is_set():
        alerts.check_deliveries(ctx.state, ctx.settings)
