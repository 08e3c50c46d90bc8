"""The jobs ``syncer serve`` schedules, referenced by text (``"syncer.jobs:run_audience"``).

They take ids only. What they need besides (the state database, the settings, the shutdown
flag) is bound once when the service starts.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass

from sqlalchemy import Engine

from syncer import audiences, leases, loops, privacy
from syncer.delivery import audiences_owed, deliver_audience, register_destinations
from syncer.errors import AudienceError, LeaseHeldError
from syncer.models import AUDIENCE_ACTIVE
from syncer.settings import Settings
from syncer.sync import RUN_SKIPPED
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
    and the user deletions owed."""
    ctx = _bound()
    targets = register_destinations(ctx.state, ctx.settings.tray.workflow_urls)
    if not targets:
        return
    with contextlib.suppress(LeaseHeldError):  # a `syncer users delete` is sending them
        privacy.forward_deletes(ctx.state, ctx.settings, stop=ctx.stopping, due_only=True)
    for audience in audiences_owed(ctx.state, [t.id for t in targets]):
        if ctx.stopping.is_set():
            return
        try:
            lease = leases.acquire(ctx.state, audience.id, audience.key)
        except LeaseHeldError:
            continue  # its run is under way and delivers what is owed
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
