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
- With ``[alerts] webhook_urls``, the leader checks every minute for deliveries failing for good
  or owed too long (``syncer.alerts``).
- One audience never stops the others: an audience whose schedule cannot be scheduled (a
  stored value out of any clock's range, a cron that does not parse) is reported once and
  skipped until its row changes; a job's failure is that job's (its run is ``failed``).
- Leadership is kept only while this process schedules: when its scheduler breaks, or it
  cannot read the audiences for ``LEADER_FAILING_SECONDS``, it gives the lease up so that a
  standby takes over, and stands by itself for a while before it tries to lead again.
- SIGTERM/SIGINT: no new run starts, in-flight deliveries finish (what is not sent stays owed)
  within ``[schedule] shutdown_grace``, then the process exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
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
from sqlalchemy import Engine, String, func, select, type_coerce

from syncer import alerts, jobs, leases, logs, workers
from syncer.models import AUDIENCE_ACTIVE, AUDIENCES, SyncRun
from syncer.settings import Settings

logger = logging.getLogger(__name__)

RECONCILE_SECONDS = 2.0
STANDBY_POLL_SECONDS = 2.0
RETRY_OWED_SECONDS = 15
RUN_WORKERS = 4
RETRY_JOB_ID = "retry-owed-deliveries"
ALERTS_CHECK_SECONDS = 60
ALERTS_JOB_ID = "check-delivery-alerts"
# A leader that cannot read the audiences this long (seconds) is not scheduling: it steps down.
LEADER_FAILING_SECONDS = 30.0
# After stepping down, this long (seconds) to stand by before trying to lead again: a standby
# takes the lease over first.
STEP_DOWN_SECONDS = 30.0


@dataclass(frozen=True, kw_only=True)
class Plan:
    """How one audience is scheduled; a change of any field reschedules it."""

    audience_id: int
    key: str
    every_seconds: int | None  # as stored: checked when it is scheduled
    cron: str | None
    updated_at: object  # as the driver gives it: compared only, so a mangled one is no error


def audience_job_id(audience_id: int) -> str:
    return f"audience-{audience_id}"


class UnschedulableError(Exception):
    """An audience's stored schedule cannot be turned into runs."""


class GuardedScheduler(BackgroundScheduler):  # type: ignore[misc]  # APScheduler is untyped
    """APScheduler's background scheduler, whose thread does not die of an error.

    APScheduler 3 computes the next run of each due job in its own thread, and an exception
    there ends that thread silently: nothing runs again, the background retry included. Here
    the failure is kept in ``failure`` instead, for the leader to see and step down.
    """

    failure: str | None = None

    def _process_jobs(self) -> float | None:
        try:
            wait: float | None = super()._process_jobs()
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            logs.trace(logger, exc)
            return None  # wait to be shut down
        return wait


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
        unreachable = False
        while not self.stopping.is_set():
            try:
                lease = leases.try_lead(self.state)
            except Exception as exc:
                if not unreachable:
                    logger.warning(
                        "cannot reach the state database (%s); trying again",
                        leases.describe_error(exc),
                    )
                    logs.trace(logger, exc)
                    unreachable = True
                self.stopping.wait(STANDBY_POLL_SECONDS)
                continue
            unreachable = False
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
                functioning = self._lead(lease)
            finally:
                if not lease.lost.is_set():
                    lease.release()
            if not functioning:
                self.stopping.wait(STEP_DOWN_SECONDS)
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

    def _lead(self, lease: leases.Lease) -> bool:
        """Schedule until stopped, the lease lost, or this leader no longer functions (then
        False: the caller gives the lease up for a standby to take)."""
        scheduler = GuardedScheduler(
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
        plans: dict[int, Plan] = {}
        unschedulable: dict[int, Plan] = {}  # reported once; tried again when the row changes
        reconciled = time.monotonic()
        failing: str | None = None
        try:
            while not self.stopping.is_set() and not lease.lost.is_set():
                if scheduler.failure is not None:
                    logger.error(
                        "the scheduler stopped working (%s); giving up leadership so that "
                        "another syncer serve takes over",
                        scheduler.failure,
                    )
                    return False
                try:
                    self._ensure_retry_job(scheduler)
                    self._ensure_alerts_job(scheduler)
                    self._reconcile(scheduler, plans, unschedulable)
                except Exception as exc:
                    if failing is None:
                        failing = leases.describe_error(exc)
                        logger.warning("could not read the audiences (%s); trying again", failing)
                        logs.trace(logger, exc)
                    if time.monotonic() - reconciled >= LEADER_FAILING_SECONDS:
                        logger.error(
                            "could not read the audiences for %ds (%s); giving up leadership "
                            "so that another syncer serve takes over",
                            LEADER_FAILING_SECONDS,
                            leases.describe_error(exc),
                        )
                        return False
                else:
                    if failing is not None:
                        logger.info("reading the audiences again")
                    failing = None
                    reconciled = time.monotonic()
                self.stopping.wait(RECONCILE_SECONDS)
            return True
        finally:
            scheduler.shutdown(wait=False)
            self._drain(lease)

    def _ensure_retry_job(self, scheduler: BackgroundScheduler) -> None:
        if scheduler.get_job(RETRY_JOB_ID) is None:
            scheduler.add_job(
                "syncer.jobs:retry_owed",
                IntervalTrigger(seconds=RETRY_OWED_SECONDS, timezone=self.timezone),
                id=RETRY_JOB_ID,
                name="retry owed deliveries",
                replace_existing=True,
            )

    def _ensure_alerts_job(self, scheduler: BackgroundScheduler) -> None:
        """With [alerts] webhook_urls: the leader looks for failing and owed deliveries."""
        if self.settings.alerts.webhook_urls and scheduler.get_job(ALERTS_JOB_ID) is None:
            scheduler.add_job(
                "syncer.jobs:check_alerts",
                IntervalTrigger(seconds=ALERTS_CHECK_SECONDS, timezone=self.timezone),
                id=ALERTS_JOB_ID,
                name="alert on failing and owed deliveries",
                replace_existing=True,
                next_run_time=datetime.now(self.timezone),  # a new leader looks at once
            )

    def _count_jobs(self, event: JobEvent) -> None:
        with self._in_flight_lock:
            self._in_flight += 1 if event.code == EVENT_JOB_SUBMITTED else -1

    def _drain(self, lease: leases.Lease) -> None:
        """Wait for runs in flight, up to the grace period; then leave them to the next run."""
        deadline = time.monotonic() + self.settings.schedule.shutdown_grace_seconds
        while time.monotonic() < deadline:
            with self._in_flight_lock:
                if self._in_flight <= 0:
                    # and the alerts of those runs, in what is left of the grace period
                    alerts.drain(max(0.0, deadline - time.monotonic()))
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

    def _reconcile(
        self,
        scheduler: BackgroundScheduler,
        plans: dict[int, Plan],
        unschedulable: dict[int, Plan],
    ) -> None:
        """Make the scheduler's jobs match the active audiences.

        An audience whose plan cannot be scheduled is reported once and left out (any job it
        had is removed) until its row changes; the others are scheduled all the same."""
        with self.state.connect() as conn:
            rows = conn.execute(
                select(
                    AUDIENCES.c.id,
                    AUDIENCES.c.key,
                    AUDIENCES.c.every_seconds,
                    AUDIENCES.c.cron,
                    type_coerce(AUDIENCES.c.updated_at, String).label("updated_at"),
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
        for audience_id in set(unschedulable) - set(wanted):
            del unschedulable[audience_id]
        for audience_id in set(plans) - set(wanted):
            self._remove_job(scheduler, audience_id)
            logger.info("unscheduled audience %s", plans.pop(audience_id).key)
        changed = [
            plan
            for audience_id, plan in wanted.items()
            if plans.get(audience_id) != plan and unschedulable.get(audience_id) != plan
        ]
        if not changed:
            return
        last_started = self._last_started([plan.audience_id for plan in changed])
        for plan in changed:
            audience_id = plan.audience_id
            try:
                trigger, first = self._trigger(plan, last_started)
                scheduler.add_job(
                    "syncer.jobs:run_audience",
                    trigger,
                    args=[audience_id],
                    id=audience_job_id(audience_id),
                    name=plan.key,
                    replace_existing=True,
                    next_run_time=first,
                )
            except Exception as exc:
                logs.trace(logger, exc)
                plans.pop(audience_id, None)
                self._remove_job(scheduler, audience_id)
                unschedulable[audience_id] = plan
                logger.error(
                    "audience %s cannot be scheduled (%s); the other audiences run, and it is "
                    "tried again once its schedule is changed (syncer audience update %s "
                    "--every D | --cron C)",
                    plan.key,
                    f"{type(exc).__name__}: {exc}"
                    if not isinstance(exc, UnschedulableError)
                    else exc,
                    plan.key,
                )
                continue
            unschedulable.pop(audience_id, None)
            plans[audience_id] = plan
            logger.info(
                "scheduled audience %s (%s), next run %s",
                plan.key,
                f"cron {plan.cron}" if plan.cron else f"every {self._every(plan)}s",
                first.isoformat(),
            )

    @staticmethod
    def _remove_job(scheduler: BackgroundScheduler, audience_id: int) -> None:
        if scheduler.get_job(audience_job_id(audience_id)):
            scheduler.remove_job(audience_job_id(audience_id))

    def _every(self, plan: Plan) -> int:
        return plan.every_seconds or self.settings.schedule.default_every_seconds

    def _trigger(
        self, plan: Plan, last_started: Mapping[int, datetime] | None = None
    ) -> tuple[Any, datetime]:
        """The trigger, and the first run: now if never run or a slot was missed.

        ``last_started``: when audiences last ran, read beforehand (a database error is no
        fault of the plan); read here if not given. Raises if the plan cannot be scheduled,
        including when the run after the first could not be computed: APScheduler computes
        it in its own thread, where an error stops every job."""
        if last_started is None:
            last_started = self._last_started([plan.audience_id])
        last = last_started.get(plan.audience_id)
        now = datetime.now(self.timezone)
        trigger: Any
        if plan.cron:
            trigger = CronTrigger.from_crontab(plan.cron, timezone=self.timezone)
            due = (
                None
                if last is None
                else trigger.get_next_fire_time(None, last.astimezone(self.timezone))
            )
            first = now if due is None or due <= now else due
        else:
            seconds = self._every(plan)
            if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds <= 0:
                raise UnschedulableError(f"every_seconds = {seconds!r} is not a positive integer")
            every = timedelta(seconds=seconds)
            first = now if last is None else max(now, last.astimezone(self.timezone) + every)
            trigger = IntervalTrigger(seconds=seconds, start_date=first, timezone=self.timezone)
        following = trigger.get_next_fire_time(first, first)
        if following is not None and following <= first:
            raise UnschedulableError(f"its run after {first.isoformat()} comes before it")
        return trigger, first

    def _last_started(self, audience_ids: list[int]) -> dict[int, datetime]:
        """When each audience's latest run started (those that ever ran)."""
        with self.state.connect() as conn:
            rows = conn.execute(
                select(SyncRun.audience_id, func.max(SyncRun.started_at))
                .where(SyncRun.audience_id.in_(audience_ids))
                .group_by(SyncRun.audience_id)
            ).all()
        return {int(audience_id): started for audience_id, started in rows if started is not None}


def serve(settings: Settings, state: Engine) -> int:
    # Delivery passes come again and again: their helper processes are kept warm between them.
    workers.keep_warm()
    try:
        return Service(settings, state).run()
    finally:
        workers.keep_warm(False)
