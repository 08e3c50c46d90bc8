"""Alerts: one JSON POST to each ``[alerts] webhook_urls`` per problem, not repeated while open.

A *problem* is something an operator should hear about once, not once a minute:

- ``run:<audience id>``: the audience's latest run failed, was partial or was held by the
  removal guard (``run_failed`` / ``run_partial`` / ``run_held``). Closed by a run that
  succeeds.
- ``url:<destination id>``: deliveries to a workflow URL failed for good (``url_failed``).
  Open while some did within the last ``repeat_after``; closed when none has for that long.
- ``owed:<destination id>``: deliveries to a workflow URL owed longer than
  ``owed_longer_than`` (``deliveries_owed``). Closed when nothing is owed that long.

Each problem is a row of ``alert_problems``. An open problem is posted when it opens, when its
event changes (a failed audience now held), and again once ``repeat_after`` has passed since
its last post; a problem that was posted is posted once more, as ``resolved``, when it closes.
The row is claimed in the database before posting (``last_sent_at``), so two processes never
post the same thing; a post no webhook accepted gives the claim back, for the next check.

Posting never blocks a run for long and never raises: each POST is bounded by
``[alerts] timeout_seconds`` (syncer's own transport: the whole call, answer included, its body
capped), is tried at most ``POST_ATTEMPTS`` times with jittered backoff (timeouts, connection
errors, 429 and 5xx), and redirects are not followed. What fails is logged as one warning and
kept in ``last_error``, naming the webhook's host only: webhook URLs are secrets, as workflow
URLs are.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from syncer import __version__, logs, loops
from syncer.db import first_line, write_transaction
from syncer.models import (
    ALERT_DELIVERIES_OWED,
    ALERT_PROBLEMS,
    ALERT_RUN_FAILED,
    ALERT_RUN_HELD,
    ALERT_RUN_PARTIAL,
    ALERT_URL_FAILED,
    DELIVERIES,
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    RUN_FAILED,
    RUN_HELD,
    RUN_PARTIAL,
    RUN_SUCCEEDED,
    Destination,
)
from syncer.settings import AlertSettings, Settings, format_duration, url_host
from syncer.transport import Http1Transport
from syncer.tray import parse_retry_after

if TYPE_CHECKING:
    from syncer.sync import RunResult

logger = logging.getLogger(__name__)

ALERT_RESOLVED = "resolved"  # posted once when a problem that was posted closes
RUN_EVENTS = {
    RUN_FAILED: ALERT_RUN_FAILED,
    RUN_PARTIAL: ALERT_RUN_PARTIAL,
    RUN_HELD: ALERT_RUN_HELD,
}
POST_ATTEMPTS = 3  # per webhook and alert: the first try and two retries
BACKOFF_BASE_SECONDS = 0.5  # before the second try; doubled before the third; jittered
MAX_BACKOFF_SECONDS = 5.0  # Retry-After is honoured up to this
MAX_ERROR_CHARS = 300  # of a run's error in a payload, and of a post's error in last_error
_USER_AGENT = f"syncer/{__version__}"


@dataclass(frozen=True, kw_only=True)
class PostOutcome:
    """What one webhook made of one alert: accepted, or why not (its host, never its URL)."""

    host: str
    accepted: bool
    error: str | None = None


# -- posting in the background -----------------------------------------------------------------

MAX_QUEUED = 1000  # alerts waiting to be posted; past it one is dropped (and logged)
DRAIN_SECONDS = 60.0  # how long `syncer sync` waits at its end for alerts still being posted


class _Poster:
    """One thread that posts alerts one after another, so that a webhook that hangs costs the
    alerts their time, never a run's: ``submit`` returns at once. Made when first needed."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None]] = queue.Queue(maxsize=MAX_QUEUED)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="syncer-alerts", daemon=True
                )
                self._thread.start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            logger.warning("alerts: %d alerts wait to be posted; dropping one", MAX_QUEUED)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job()  # after_run and check_deliveries never raise
            finally:
                self._queue.task_done()

    def drain(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the alerts submitted so far; True when all are done."""
        deadline = time.monotonic() + seconds
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


_POSTER = _Poster()


def submit_after_run(
    state: Engine, settings: Settings, *, audience_id: int, audience_key: str, result: RunResult
) -> None:
    """``after_run`` in the background: the caller (a run) goes on at once."""
    if settings.alerts.webhook_urls:
        _POSTER.submit(
            lambda: after_run(
                state, settings, audience_id=audience_id, audience_key=audience_key, result=result
            )
        )


def submit_check_deliveries(state: Engine, settings: Settings) -> None:
    """``check_deliveries`` in the background."""
    if settings.alerts.webhook_urls:
        _POSTER.submit(lambda: check_deliveries(state, settings))


def drain(seconds: float = DRAIN_SECONDS) -> None:
    """Before a command exits: let the alerts it raised be posted, for ``seconds`` at most
    (what is left is raised again by the next run or check: nothing was claimed for it)."""
    if not _POSTER.drain(seconds):
        logger.warning(
            "alerts: still posting after %.0fs; leaving the rest to the next run", seconds
        )


# -- what the lead calls ----------------------------------------------------------------------


def after_run(
    state: Engine,
    settings: Settings,
    *,
    audience_id: int,
    audience_key: str,
    result: RunResult,
) -> None:
    """Alert on a run that failed, was partial or was held; resolve the audience's problem when
    a run succeeds. Other statuses (interrupted, skipped) change nothing. Never raises."""
    alerts = settings.alerts
    if not alerts.webhook_urls:
        return
    problem = f"run:{audience_id}"
    try:
        error = _cut(_scrubbed(result.error, settings))
        base = {
            "audience_key": audience_key,
            "audience_id": audience_id,
            "run_id": result.run_id,
            "status": result.status,
            "members": result.members,
            "added": result.added,
            "removed": result.removed,
            "sent": result.sent,
            "failed": result.failed,
            "error": error,
        }
        event = RUN_EVENTS.get(result.status)
        if event is not None:
            _raise_problem(
                state,
                alerts,
                problem=problem,
                event=event,
                fields=base,
                text=_run_text(event, audience_key, result, error),
            )
        elif result.status == RUN_SUCCEEDED:
            _resolve_problem(
                state,
                alerts,
                problem=problem,
                fields=base,
                text=(
                    f"Resolved: audience {audience_key} runs again (run {result.run_id} "
                    f"succeeded: {result.members} members, +{result.added} -{result.removed}, "
                    f"sent {result.sent})."
                ),
            )
    except Exception as exc:
        logger.warning("alerts: audience %s: %s", audience_key, _describe(exc))
        logs.trace(logger, exc)


def check_deliveries(state: Engine, settings: Settings) -> None:
    """Alert on workflow URLs whose deliveries failed for good lately, or are owed longer
    than ``owed_longer_than``; resolve those problems that cleared. Never raises; stops at the
    first alert no webhook takes (the next check goes on)."""
    alerts = settings.alerts
    if not alerts.webhook_urls:
        return
    try:
        now = datetime.now(UTC)
        failed_since = now - timedelta(seconds=alerts.repeat_after_seconds)
        owed_before = now - timedelta(seconds=alerts.owed_longer_than_seconds)
        with state.connect() as conn:
            hosts = {
                row.id: row.host for row in conn.execute(select(Destination.id, Destination.host))
            }
            failed = _failed_lately(conn, failed_since)
            owed = _owed_long(conn, owed_before)
    except Exception as exc:
        logger.warning("alerts: could not read the deliveries: %s", _describe(exc))
        logs.trace(logger, exc)
        return
    for destination_id, host in sorted(hosts.items()):
        try:
            posted = _check_url(
                state, alerts, destination_id, host, failed.get(destination_id)
            ) and _check_owed(state, alerts, destination_id, host, owed.get(destination_id))
        except Exception as exc:
            logger.warning("alerts: deliveries to %s: %s", host, _describe(exc))
            logs.trace(logger, exc)
            continue
        if not posted:
            # No webhook takes alerts now: the rest waits for the next check rather than
            # holding a worker of serve through every post's tries.
            logger.info("alerts: the webhooks took nothing; the next check tries again")
            return


# -- the deliveries' problems -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Failed:
    count: int
    newest: datetime
    error: str | None


@dataclass(frozen=True, kw_only=True)
class _Owed:
    count: int
    oldest: datetime


def _failed_lately(conn: Connection, since: datetime) -> dict[int, _Failed]:
    """Per destination: deliveries that failed for good since ``since`` (when they were last
    tried; one given up for its age without a try counts from when it was owed)."""
    d = DELIVERIES.c
    at = func.coalesce(d.last_attempt_at, d.owed_since)
    rows = conn.execute(
        select(d.destination_id, func.count(), func.max(at), func.max(d.id))
        .where(d.status == DELIVERY_FAILED, at > since)
        .group_by(d.destination_id)
    ).all()
    found: dict[int, _Failed] = {}
    for destination_id, count, newest, newest_id in rows:
        error = conn.execute(select(d.last_error).where(d.id == newest_id)).scalar()
        found[destination_id] = _Failed(count=count, newest=_aware(newest), error=error)
    return found


def _owed_long(conn: Connection, before: datetime) -> dict[int, _Owed]:
    """Per destination: deliveries pending since before ``before``, and the oldest's time."""
    d = DELIVERIES.c
    rows = conn.execute(
        select(d.destination_id, func.count(), func.min(d.owed_since))
        .where(d.status == DELIVERY_PENDING, d.owed_since < before)
        .group_by(d.destination_id)
    ).all()
    return {
        destination_id: _Owed(count=count, oldest=_aware(oldest))
        for destination_id, count, oldest in rows
    }


def _check_url(
    state: Engine, alerts: AlertSettings, destination_id: int, host: str, failed: _Failed | None
) -> bool:
    problem = f"url:{destination_id}"
    window = format_duration(alerts.repeat_after_seconds)
    fields: dict[str, Any] = {"url_host": host}
    if failed is None:
        return _resolve_problem(
            state,
            alerts,
            problem=problem,
            fields=fields,
            text=f"Resolved: no delivery to {host} has failed for good in the last {window}.",
        )
    error = _cut(failed.error)
    fields |= {"failed": failed.count, "error": error, "newest_failed_at": _iso(failed.newest)}
    return _raise_problem(
        state,
        alerts,
        problem=problem,
        event=ALERT_URL_FAILED,
        fields=fields,
        text=(
            f"Deliveries to {host} failed for good: {failed.count} in the last {window}"
            + (f" (last error: {error})" if error else "")
            + ". Check that workflow URL in [tray] workflow_urls; see "
            "`syncer deliveries --status failed`, then `syncer retry` to send them again."
        ),
    )


def _check_owed(
    state: Engine, alerts: AlertSettings, destination_id: int, host: str, owed: _Owed | None
) -> bool:
    problem = f"owed:{destination_id}"
    threshold = format_duration(alerts.owed_longer_than_seconds)
    fields: dict[str, Any] = {"url_host": host}
    if owed is None:
        return _resolve_problem(
            state,
            alerts,
            problem=problem,
            fields=fields,
            text=f"Resolved: nothing is owed to {host} for longer than {threshold}.",
        )
    fields |= {"owed": owed.count, "owed_since": _iso(owed.oldest)}
    return _raise_problem(
        state,
        alerts,
        problem=problem,
        event=ALERT_DELIVERIES_OWED,
        fields=fields,
        text=(
            f"{owed.count} deliveries to {host} have been owed for longer than {threshold} "
            f"(the oldest since {_iso(owed.oldest)}). Is the workflow URL up? See "
            "`syncer deliveries --status pending`; they are retried until [tray] max_age."
        ),
    )


def _run_text(event: str, key: str, result: RunResult, error: str | None) -> str:
    counts = f"{result.members} members, +{result.added} -{result.removed}"
    if event == ALERT_RUN_HELD:
        return (
            f"Audience {key}: run {result.run_id} held by the removal guard: it would remove "
            f"{result.removed} and add {result.added} (members {result.members}); nothing was "
            "sent. If the source is broken, fix it and the next run un-holds by itself; if "
            f"the removal is real: `syncer audience approve {key}`."
        )
    if event == ALERT_RUN_PARTIAL:
        return (
            f"Audience {key}: run {result.run_id} partly delivered ({counts}; sent "
            f"{result.sent}, failed {result.failed})"
            + (f": {error}" if error else "")
            + f". What failed is retried; see `syncer deliveries {key} --status failed`."
        )
    return (
        f"Audience {key}: run {result.run_id} failed"
        + (f": {error}" if error else "")
        + f". See `syncer history {key}`; the next run tries again."
    )


# -- problems in the database -----------------------------------------------------------------


def _raise_problem(
    state: Engine,
    alerts: AlertSettings,
    *,
    problem: str,
    event: str,
    fields: Mapping[str, Any],
    text: str,
) -> bool:
    """The problem is there: open it (or keep it open), and post it if it is due. False when
    it was posted and no webhook took it."""
    now = datetime.now(UTC)
    repeat_cutoff = now - timedelta(seconds=alerts.repeat_after_seconds)
    p = ALERT_PROBLEMS.c
    try:
        with write_transaction(state) as conn:
            row = conn.execute(
                select(p.event, p.opened_at, p.last_sent_at, p.resolved_at)
                .where(p.problem == problem)
                .with_for_update()
            ).first()
            if row is None:
                conn.execute(
                    insert(ALERT_PROBLEMS).values(
                        problem=problem,
                        event=event,
                        opened_at=now,
                        last_sent_at=now,
                        sent_count=0,
                    )
                )
                opened_at, previous = now, None
            elif row.resolved_at is not None:
                conn.execute(
                    update(ALERT_PROBLEMS)
                    .where(p.problem == problem)
                    .values(
                        event=event,
                        opened_at=now,
                        last_sent_at=now,
                        sent_count=0,
                        resolved_at=None,
                        last_error=None,
                    )
                )
                opened_at, previous = now, None
            else:
                opened_at, previous = row.opened_at, row.last_sent_at
                due = row.event != event or previous is None or previous <= repeat_cutoff
                conn.execute(
                    update(ALERT_PROBLEMS)
                    .where(p.problem == problem)
                    .values(event=event, **({"last_sent_at": now} if due else {}))
                )
                if not due:
                    return True
    except IntegrityError:
        return True  # another process opened it at the same moment, and posts it
    payload = _payload(event, problem=problem, opened_at=opened_at, at=now, text=text, **fields)
    outcomes = _post(alerts, payload)
    accepted = any(o.accepted for o in outcomes)
    with write_transaction(state) as conn:
        values: dict[str, Any] = {"last_error": _errors(outcomes)}
        if accepted:
            values["sent_count"] = p.sent_count + 1
        else:
            values["last_sent_at"] = previous  # not posted: the next check tries again
        conn.execute(
            update(ALERT_PROBLEMS)
            .where(p.problem == problem, p.last_sent_at == now)  # still this post's claim
            .values(**values)
        )
    return accepted


def _resolve_problem(
    state: Engine,
    alerts: AlertSettings,
    *,
    problem: str,
    fields: Mapping[str, Any],
    text: str,
) -> bool:
    """The problem is gone: close it if open, and say so if it was ever posted. False when
    that was posted and no webhook took it."""
    now = datetime.now(UTC)
    p = ALERT_PROBLEMS.c
    is_open = (p.problem == problem) & p.resolved_at.is_(None)
    with state.connect() as conn:  # most of the time nothing is open: no write lock for that
        if conn.execute(select(p.problem).where(is_open)).first() is None:
            return True
    with write_transaction(state) as conn:
        row = conn.execute(
            select(p.event, p.opened_at, p.sent_count).where(is_open).with_for_update()
        ).first()
        if row is None:
            return True
        conn.execute(update(ALERT_PROBLEMS).where(p.problem == problem).values(resolved_at=now))
    if not row.sent_count:
        return True  # nobody heard of it
    payload = _payload(
        ALERT_RESOLVED,
        problem=problem,
        resolves=row.event,
        opened_at=row.opened_at,
        at=now,
        text=text,
        **fields,
    )
    outcomes = _post(alerts, payload)
    if not all(o.accepted for o in outcomes):
        with write_transaction(state) as conn:
            conn.execute(
                update(ALERT_PROBLEMS)
                .where(p.problem == problem)
                .values(last_error=_errors(outcomes))
            )
    return any(o.accepted for o in outcomes)


# -- the payload ------------------------------------------------------------------------------

PAYLOAD_FIELDS = (
    "event",
    "audience_key",
    "audience_id",
    "run_id",
    "status",
    "members",
    "added",
    "removed",
    "sent",
    "failed",
    "url_host",
    "error",
    "problem",
    "opened_at",
    "at",
)


def _payload(event: str, *, text: str, opened_at: datetime, at: datetime, **fields: Any) -> bytes:
    """A Slack-compatible ``text`` and the structured fields (every one of PAYLOAD_FIELDS,
    null where it does not apply; more where an event has them)."""
    body: dict[str, Any] = dict.fromkeys(PAYLOAD_FIELDS)
    body |= fields
    body |= {
        "text": _slack_escaped(f"syncer: {text}"),
        "event": event,
        "opened_at": _iso(opened_at),
        "at": _iso(at),
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _slack_escaped(text: str) -> str:
    """Slack reads ``<...>`` in a text as a link or a mention (``<!channel>``): an error
    message quoted in an alert must not ping anyone."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _cut(text: str | None) -> str | None:
    if text is None:
        return None
    line = " ".join(text.split())
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def _scrubbed(text: str | None, settings: Settings) -> str | None:
    """``text`` with any configured workflow or webhook URL shown as its host (a run's error
    should hold none; this makes sure)."""
    if text is None:
        return None
    for url in (*settings.tray.workflow_urls, *settings.alerts.webhook_urls):
        text = text.replace(url, url_host(url))
    return text


def _errors(outcomes: Sequence[PostOutcome]) -> str | None:
    failed = [f"{o.host}: {o.error}" for o in outcomes if not o.accepted]
    return _cut("; ".join(failed)) if failed else None


def _describe(exc: BaseException) -> str:
    text = " ".join(first_line(exc).split()) or type(exc).__name__
    return text[:MAX_ERROR_CHARS]


# -- posting ----------------------------------------------------------------------------------


def _post(alerts: AlertSettings, body: bytes) -> list[PostOutcome]:
    """POST ``body`` to every webhook at once; what each made of it. Bounded in time (see
    ``_post_all``); never raises. In a thread of its own if this one runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        outcomes = loops.run(_post_all(alerts, body))
    else:
        found: list[list[PostOutcome]] = []
        thread = threading.Thread(
            target=lambda: found.append(loops.run(_post_all(alerts, body))),
            name="syncer-alerts",
            daemon=True,
        )
        thread.start()
        thread.join(_bound_seconds(alerts) + 1.0)
        outcomes = (
            found[0]
            if found
            else [
                PostOutcome(host=url_host(url), accepted=False, error="no answer in time")
                for url in alerts.webhook_urls
            ]
        )
    for outcome in outcomes:
        if not outcome.accepted:
            logger.warning("alerts: %s did not take an alert: %s", outcome.host, outcome.error)
    return outcomes


def _bound_seconds(alerts: AlertSettings) -> float:
    """The most posting one alert may take: every try to its deadline, and the waits."""
    waits = sum(
        min(BACKOFF_BASE_SECONDS * 2.0**n * 1.5, MAX_BACKOFF_SECONDS)
        for n in range(POST_ATTEMPTS - 1)
    )
    return POST_ATTEMPTS * alerts.timeout_seconds + waits


async def _post_all(alerts: AlertSettings, body: bytes) -> list[PostOutcome]:
    transport = Http1Transport(max_connections=max(1, len(alerts.webhook_urls)))
    try:
        return list(
            await asyncio.gather(
                *(_post_one(transport, alerts, url, body) for url in alerts.webhook_urls)
            )
        )
    finally:
        await transport.aclose()


async def _post_one(
    transport: Http1Transport, alerts: AlertSettings, url: str, body: bytes
) -> PostOutcome:
    host = url_host(url)
    timeout = alerts.timeout_seconds
    error = "not tried"
    for attempt in range(POST_ATTEMPTS):
        request = httpx.Request(
            "POST",
            url,
            headers={"Content-Type": "application/json", "User-Agent": _USER_AGENT},
            content=body,
            extensions={"timeout": {**httpx.Timeout(timeout).as_dict(), "total": timeout}},
        )
        retry_after: float | None = None
        try:
            async with asyncio.timeout(timeout + 1.0):  # the transport keeps ``total`` itself
                response = await transport.handle_async_request(request)
        except (TimeoutError, httpx.TimeoutException):
            error = f"timeout: no complete answer within {timeout:g} s"
        except httpx.TransportError as exc:
            error = f"connection error: {_describe(exc).replace(url, host)}"
        except Exception as exc:  # whatever else: this webhook's failure, never the caller's
            return PostOutcome(host=host, accepted=False, error=_describe(exc).replace(url, host))
        else:
            status = response.status_code
            if 200 <= status < 300:
                return PostOutcome(host=host, accepted=True)
            error = f"HTTP {status}"
            if 300 <= status < 400:
                return PostOutcome(
                    host=host, accepted=False, error=f"{error} (redirect not followed)"
                )
            if status != 429 and status < 500:
                return PostOutcome(host=host, accepted=False, error=error)
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if attempt + 1 < POST_ATTEMPTS:
            wait = BACKOFF_BASE_SECONDS * 2.0**attempt * random.uniform(0.5, 1.5)
            if retry_after is not None:
                wait = max(wait, retry_after)
            await asyncio.sleep(min(wait, MAX_BACKOFF_SECONDS))
    return PostOutcome(host=host, accepted=False, error=f"{error} ({POST_ATTEMPTS} tries)")
