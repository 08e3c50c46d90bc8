"""``syncer serve``: the scheduling service, safe with restarts, overlaps and several processes.

- Leadership: exactly one ``serve`` schedules (it holds the ``scheduler`` row of
  ``service_leases``); the others stand by and take over within seconds of its death.
- The leader runs an APScheduler 3 ``BackgroundScheduler`` with an in-memory job store (never a
  shared one): its jobs are derived from the ``audiences`` table, reconciled every few seconds,
  so creating, updating, pausing or deleting an audience from another process takes effect
  without a restart.
- Catch-up: an audience whose slot passed while nothing ran runs once on start (coalesced);
  a new audience gets its initial sync at once.
- No overlap: each run takes its audience's lease in the database; the scheduler only asks.
- Owed deliveries are retried in the background, between the audiences' own runs.
- SIGTERM/SIGINT: no new run starts, in-flight deliveries finish (what is not sent stays owed)
  within ``[schedule] shutdown_grace``, then the process exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import FrameType
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_SUBMITTED, JobEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine, func, select

from syncer import jobs, leases, workers
from syncer.models import AUDIENCE_ACTIVE, AUDIENCES, SyncRun
from syncer.settings import Settings

logger = logging.getLogger(__name__)

RECONCILE_SECONDS = 2.0
STANDBY_POLL_SECONDS = 2.0
RETRY_OWED_SECONDS = 15
RUN_WORKERS = 4
RETRY_JOB_ID = "retry-owed-deliveries"


@dataclass(frozen=True, kw_only=True)
class Plan:
    """How one audience is scheduled; a change of any field reschedules it."""

    audience_id: int
    key: str
    every_seconds: int | None
    cron: str | None
    updated_at: datetime


def audience_job_id(audience_id: int) -> str:
    return f"audience-{audience_id}"


class Service:
    def __init__(self, settings: Settings, state: Engine) -> None:
        self.settings = settings
        self.state = state
        self.timezone = ZoneInfo(settings.schedule.timezone)
        self.stopping = threading.Event()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    # -- process life -------------------------------------------------------------------

    def run(self) -> int:
        """Stand by or lead until SIGTERM/SIGINT; returns the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        jobs.bind(
            jobs.ServiceContext(state=self.state, settings=self.settings, stopping=self.stopping)
        )
        logger.info("syncer serve started (pid %d)", os.getpid())
        standing_by = False
        while not self.stopping.is_set():
            lease = leases.try_lead(self.state)
            if lease is None:
                if not standing_by:
                    holder = leases.leader(self.state)
                    logger.info(
                        "standing by: %s pid %s schedules",
                        getattr(holder, "holder_host", "?"),
                        getattr(holder, "holder_pid", "?"),
                    )
                    standing_by = True
                self.stopping.wait(STANDBY_POLL_SECONDS)
                continue
            standing_by = False
            logger.info("leading: this process schedules the audiences")
            try:
                self._lead(lease)
            finally:
                if not lease.lost.is_set():
                    lease.release()
        logger.info("syncer serve stopped")
        return 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping.is_set():
            logger.info(
                "%s: no new runs; letting in-flight work finish (up to %ds)",
                signal.Signals(signum).name,
                self.settings.schedule.shutdown_grace_seconds,
            )
        self.stopping.set()

    # -- leading ------------------------------------------------------------------------

    def _lead(self, lease: leases.Lease) -> None:
        scheduler = BackgroundScheduler(
            timezone=self.timezone,
            executors={"default": ThreadPoolExecutor(RUN_WORKERS)},
            job_defaults={
                "coalesce": True,  # missed slots run once, not once per slot
                "misfire_grace_time": None,  # however late: never silently dropped
                "max_instances": 1,
            },
        )
        scheduler.add_listener(
            self._count_jobs, EVENT_JOB_SUBMITTED | EVENT_JOB_EXECUTED | EVENT_JOB_ERROR
        )
        scheduler.start()
        scheduler.add_job(
            "syncer.jobs:retry_owed",
            IntervalTrigger(seconds=RETRY_OWED_SECONDS, timezone=self.timezone),
            id=RETRY_JOB_ID,
            name="retry owed deliveries",
            replace_existing=True,
        )
        plans: dict[int, Plan] = {}
        try:
            while not self.stopping.is_set() and not lease.lost.is_set():
                try:
                    self._reconcile(scheduler, plans)
                except Exception:
                    logger.exception("could not read the audiences; trying again")
                self.stopping.wait(RECONCILE_SECONDS)
        finally:
            scheduler.shutdown(wait=False)
            self._drain(lease)

    def _count_jobs(self, event: JobEvent) -> None:
        with self._in_flight_lock:
            self._in_flight += 1 if event.code == EVENT_JOB_SUBMITTED else -1

    def _drain(self, lease: leases.Lease) -> None:
        """Wait for runs in flight, up to the grace period; then leave them to the next run."""
        deadline = time.monotonic() + self.settings.schedule.shutdown_grace_seconds
        while time.monotonic() < deadline:
            with self._in_flight_lock:
                if self._in_flight <= 0:
                    return
            time.sleep(0.1)
        if self.stopping.is_set():
            logger.warning(
                "shutdown grace of %ds is over with %d runs still going; exiting: their "
                "snapshots are either committed or untouched, and what they owe stays owed",
                self.settings.schedule.shutdown_grace_seconds,
                self._in_flight,
            )
            leases.abandon(self.state)
            if not lease.lost.is_set():
                lease.release()
            logging.shutdown()
            os._exit(0)

    def _reconcile(self, scheduler: BackgroundScheduler, plans: dict[int, Plan]) -> None:
        """Make the scheduler's jobs match the active audiences."""
        with self.state.connect() as conn:
            rows = conn.execute(
                select(
                    AUDIENCES.c.id,
                    AUDIENCES.c.key,
                    AUDIENCES.c.every_seconds,
                    AUDIENCES.c.cron,
                    AUDIENCES.c.updated_at,
                ).where(AUDIENCES.c.status == AUDIENCE_ACTIVE)
            ).all()
        wanted = {
            row.id: Plan(
                audience_id=row.id,
                key=row.key,
                every_seconds=row.every_seconds,
                cron=row.cron,
                updated_at=row.updated_at,
            )
            for row in rows
        }
        for audience_id in set(plans) - set(wanted):
            if scheduler.get_job(audience_job_id(audience_id)):
                scheduler.remove_job(audience_job_id(audience_id))
            logger.info("unscheduled audience %s", plans.pop(audience_id).key)
        for audience_id, plan in wanted.items():
            if plans.get(audience_id) == plan:
                continue
            trigger, first = self._trigger(plan)
            scheduler.add_job(
                "syncer.jobs:run_audience",
                trigger,
                args=[audience_id],
                id=audience_job_id(audience_id),
                name=plan.key,
                replace_existing=True,
                next_run_time=first,
            )
            plans[audience_id] = plan
            logger.info(
                "scheduled audience %s (%s), next run %s",
                plan.key,
                f"cron {plan.cron}" if plan.cron else f"every {self._every(plan)}s",
                first.isoformat(),
            )

    def _every(self, plan: Plan) -> int:
        return plan.every_seconds or self.settings.schedule.default_every_seconds

    def _trigger(self, plan: Plan) -> tuple[Any, datetime]:
        """The trigger, and the first run: now if never run or a slot was missed."""
        now = datetime.now(self.timezone)
        last = self._last_started(plan.audience_id)
        if plan.cron:
            cron = CronTrigger.from_crontab(plan.cron, timezone=self.timezone)
            if last is None:
                return cron, now
            due = cron.get_next_fire_time(None, last.astimezone(self.timezone))
            return cron, now if due is None or due <= now else due
        every = timedelta(seconds=self._every(plan))
        first = now if last is None else max(now, last.astimezone(self.timezone) + every)
        return IntervalTrigger(
            seconds=self._every(plan), start_date=first, timezone=self.timezone
        ), first

    def _last_started(self, audience_id: int) -> datetime | None:
        with self.state.connect() as conn:
            last: datetime | None = conn.execute(
                select(func.max(SyncRun.started_at)).where(SyncRun.audience_id == audience_id)
            ).scalar()
        return last


def serve(settings: Settings, state: Engine) -> int:
    # Delivery passes come again and again: their helper processes are kept warm between them.
    workers.keep_warm()
    try:
        return Service(settings, state).run()
    finally:
        workers.keep_warm(False)
