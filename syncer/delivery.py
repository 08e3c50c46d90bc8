"""The outbox: send what each workflow URL is owed, record every outcome.

Each destination has its own pipeline (a reader paging pending rows in id order, and
``max_concurrency`` senders), so a slow or failing URL does not hold back the others.
Outcomes are written back in small batches by one recorder; a row only becomes ``sent``
after Tray answered 2xx, so a crash can repeat the calls in flight, never lose one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import groupby
from typing import NamedTuple

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    Integer,
    String,
    and_,
    any_,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError

from syncer import workers
from syncer.db import retry_deadlocks, write_transaction
from syncer.errors import DeliveryError, PermanentDeliveryError
from syncer.leases import HOST
from syncer.models import (
    AUDIENCES,
    DELIVERIES,
    DELIVERY_FAILED,
    DELIVERY_PAGES,
    DELIVERY_PENDING,
    DELIVERY_SENT,
    DESTINATION_HASH_KEY,
    MYSQL,
    SYNCER_SETTINGS,
    Destination,
    owed,
)
from syncer.settings import (
    TraySettings,
    format_duration,
    normalize_workflow_url,
    url_host,
    workflow_url_hash,
)
from syncer.tray import (
    IdentifyBodies,
    TrayClient,
    delete_body,
    delete_message_id,
    identify_message_id,
)

logger = logging.getLogger(__name__)

# Rows per page of a pass (delivery_pages): small enough that processes sharing a pass end
# together, large enough that claiming a page costs next to nothing per row.
PAGE_SIZE = 500
HELPERS_MIN_OWED = 2_000
BREAKER_MIN_FAILURES = 8
TRIES_PER_PASS = 3
MAX_PASS_DELAY_SECONDS = 3600.0
STOP_POLL_SECONDS = 0.1
UPDATE_CHUNK = 500
# Free pages a claim on MySQL/MariaDB reads at once: more than the processes that can take
# one of them in the meantime (at most MAX_DELIVERY_PROCESSES).
MYSQL_PAGES_LOOKED_AT = 64
BATCH_WAIT_SECONDS = 0.05
# Calls started but not yet recorded, in rounds of max_concurrency: the calls in flight, the
# answers being committed and those waiting for the next commit. With two rounds, senders
# stalled on every commit (measured: 20-25 % fewer calls per second on PostgreSQL).
EXPOSED_ROUNDS = 3
D = DELIVERIES
P = DELIVERY_PAGES

Progress = Callable[[int, int], None]


@dataclass(frozen=True, kw_only=True)
class Target:
    """A workflow URL (normalised, from settings: only ever held in memory) and its row in
    ``destinations``, which stores the host and a keyed hash of the URL."""

    id: int
    url: str = field(repr=False)  # a bearer secret: never in a repr, a log line or a traceback

    @property
    def host(self) -> str:
        return url_host(self.url)


def register_destinations(engine: Engine, urls: Sequence[str]) -> list[Target]:
    """Make sure every configured URL has a ``destinations`` row, found by the keyed hash of
    its normalised form; return them in order. The URL itself is never written."""
    if not urls:
        return []
    normal = [normalize_workflow_url(url, what="workflow URL") for url in urls]
    try:
        return _register(engine, normal)
    except IntegrityError:  # another process registered one of them (or the key) just now
        return _register(engine, normal)


def _register(engine: Engine, urls: Sequence[str]) -> list[Target]:
    now = datetime.now(UTC)
    with write_transaction(engine) as conn:
        key = _destination_hash_key(conn)
        hashes = {url: workflow_url_hash(key, url) for url in urls}
        known = dict(
            conn.execute(
                select(Destination.url_hash, Destination.id).where(
                    Destination.url_hash.in_(hashes.values())
                )
            ).all()
        )
        for url, url_hash in hashes.items():
            if url_hash not in known:
                known[url_hash] = conn.execute(
                    insert(Destination)
                    .values(host=url_host(url), url_hash=url_hash, first_seen_at=now)
                    .returning(Destination.id)
                ).scalar_one()
    return [Target(id=known[hashes[url]], url=url) for url in urls]


def _destination_hash_key(conn: Connection) -> str:
    """The installation's key of ``destinations.url_hash`` (migration 0006 makes it; made
    here if it is missing, as before the first destination)."""
    value = conn.execute(
        select(SYNCER_SETTINGS.c.value).where(SYNCER_SETTINGS.c.name == DESTINATION_HASH_KEY)
    ).scalar()
    if value:
        return str(value)
    value = secrets.token_hex(32)
    conn.execute(insert(SYNCER_SETTINGS).values(name=DESTINATION_HASH_KEY, value=value))
    return value


@dataclass(frozen=True, kw_only=True)
class Audience:
    id: int
    key: str


class Outcome(NamedTuple):
    """What became of one delivery row in this pass (a tuple: one is made for every call)."""

    delivery_id: int
    status: str
    attempts: int
    status_code: int | None
    error: str | None
    at: datetime


@dataclass(kw_only=True)
class DeliveryTotals:
    """A pass's outcome: sent, failed for good, and what is still owed afterwards."""

    sent: int = 0
    failed: int = 0
    retry_later: int = 0

    @property
    def not_delivered(self) -> int:
        return self.failed + self.retry_later


class _Pending(NamedTuple):
    """An owed row as a page read it (a tuple: one is made for every call)."""

    id: int
    run_id: int | None
    deletion_id: int | None
    user_id: str
    value: bool | None  # None on a user deletion
    created_at: datetime
    owed_since: datetime
    attempts: int


@dataclass(kw_only=True)
class _Recorder:
    """Writes outcomes back, one batch at a time, from a single writer task.

    A batch is written once ``batch`` outcomes are waiting, a sender is held back by the
    exposure limit, or ``BATCH_WAIT_SECONDS`` passed: few, larger transactions (each costs
    about a millisecond whatever its size), and never more than one of ours waiting for the
    database's write lock."""

    engine: Engine
    tray: TraySettings
    claimer: str  # written to deliveries.claimed_by with each outcome
    # Called after each write with what is recorded so far: (outcomes, their totals).
    progress: Callable[[int, DeliveryTotals], None] | None = None
    batch: int = 64
    outcomes: list[Outcome] = field(default_factory=list)
    totals: DeliveryTotals = field(default_factory=DeliveryTotals)
    done: int = 0
    # Calls started whose outcome is not committed yet: what a crash would send again.
    exposed: int = 0
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _written: asyncio.Condition = field(default_factory=asyncio.Condition)
    _closing: bool = False
    _error: BaseException | None = None
    # The recorder's own connection, held for the pass: a batch is one short transaction.
    _conn: Connection | None = None

    async def expose(self, limit: int) -> None:
        """Wait until another call may start without more than ``limit`` exposed calls."""
        if self.exposed >= limit or self._error is not None:
            self._arrived.set()  # write what is waiting now
            async with self._written:
                await self._written.wait_for(
                    lambda: self.exposed < limit or self._error is not None
                )
            if self._error is not None:
                raise DeliveryError("recording outcomes failed") from self._error
        self.exposed += 1

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.done += 1
        if outcome.status == DELIVERY_SENT:
            self.totals.sent += 1
        elif outcome.status == DELIVERY_FAILED:
            self.totals.failed += 1
        if len(self.outcomes) >= self.batch:
            self._arrived.set()

    async def run(self) -> None:
        """The writer: commit what has arrived, until closed and everything is written."""
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), BATCH_WAIT_SECONDS)
                self._arrived.clear()
                batch, self.outcomes = self.outcomes, []
                if batch:
                    await asyncio.to_thread(self.write, batch)
                    self.exposed -= len(batch)
                    async with self._written:
                        self._written.notify_all()
                    if self.progress:
                        self.progress(self.done, self.totals)
                if self._closing and not self.outcomes:
                    return
        except BaseException as exc:
            self._error = exc
            async with self._written:
                self._written.notify_all()
            raise
        finally:
            if self._conn is not None:
                await asyncio.to_thread(self._conn.close)

    async def close(self) -> None:
        self._closing = True
        self._arrived.set()

    def write(self, outcomes: list[Outcome]) -> None:
        """Record outcomes with one UPDATE per (status, attempts, code, error) group.

        ``attempts`` is a delivery's total over all passes; one still owed waits for a pass
        delay that grows with it (see ``pass_delay``)."""
        if not outcomes:
            return
        if self._conn is None:
            self._conn = self.engine.connect()
        retry_deadlocks(lambda: self._write(outcomes), what="recording delivery outcomes")

    def _write(self, outcomes: list[Outcome]) -> None:
        def key(o: Outcome) -> tuple[str, int, int, str]:
            return (o.status, o.attempts, o.status_code or 0, o.error or "")

        now = datetime.now(UTC)
        assert self._conn is not None
        with write_transaction(self.engine, self._conn) as conn:
            for (status, attempts, _code, _error), group in groupby(
                sorted(outcomes, key=key), key=key
            ):
                rows = list(group)
                first = rows[0]
                values: dict[str, object] = {
                    "claimed_by": self.claimer,
                    "status": status,
                    "attempts": attempts,
                    "last_attempt_at": max(o.at for o in rows),
                    "last_status_code": first.status_code,
                    "last_error": first.error,
                }
                if status == DELIVERY_SENT:
                    values["delivered_at"] = values["last_attempt_at"]
                if status == DELIVERY_PENDING:
                    values["next_attempt_at"] = now + pass_delay(attempts, self.tray)
                ids = [o.delivery_id for o in rows]
                for start in range(0, len(ids), UPDATE_CHUNK):
                    conn.execute(
                        update(D)
                        .where(
                            id_among(conn.dialect.name, D.c.id, ids[start : start + UPDATE_CHUNK]),
                            # Not ``status = 'pending'``: that lets the planner walk the status
                            # index over every owed row instead of looking up these ids.
                            func.coalesce(D.c.status, "") == DELIVERY_PENDING,
                        )
                        .values(values)
                    )


def id_among(dialect: str, column: ColumnElement[int], ids: Sequence[int]) -> ColumnElement[bool]:
    """``column IN ids`` as one bound value where the database can take a list whole (an array
    on PostgreSQL, a JSON text on SQLite): the statement's text stays the same whatever the
    number of ids, so the driver and the database reuse its parsed form."""
    if dialect == "postgresql":
        return column == any_(literal(list(ids), postgresql.ARRAY(BigInteger())))
    if dialect == "sqlite":
        listed = func.json_each(literal(json.dumps(list(ids)), String())).table_valued("value")
        return column.in_(select(listed.c.value))
    return column.in_(ids)


def expire_overdue(
    engine: Engine, audience_id: int | None, destination_ids: Sequence[int], tray: TraySettings
) -> int:
    """Deliveries still owed past ``max_age`` are given up: failed, with the reason."""
    cutoff = datetime.now(UTC) - timedelta(seconds=tray.max_age_seconds)
    with write_transaction(engine) as conn:
        return (
            conn.execute(
                update(D)
                .where(owed(audience_id, destination_ids), D.c.owed_since < cutoff)
                .values(
                    status=DELIVERY_FAILED,
                    last_error=f"not delivered within max_age ({format_duration(tray.max_age_seconds)})",
                )
            ).rowcount
            or 0
        )


def postpone(engine: Engine, audience_id: int | None, destination_id: int, until: datetime) -> None:
    """A URL that keeps failing: everything owed to it waits for the next pass together."""

    def postpone_owed() -> None:
        with write_transaction(engine) as conn:
            conn.execute(
                update(D)
                .where(owed(audience_id, [destination_id]), D.c.next_attempt_at < until)
                .values(next_attempt_at=until)
            )

    retry_deadlocks(postpone_owed, what="postponing a failing URL's deliveries")


def count_pending(
    engine: Engine, audience_id: int | None, destination_ids: Sequence[int], due: datetime | None
) -> int:
    query = select(func.count()).select_from(D).where(owed(audience_id, destination_ids))
    if due is not None:
        query = query.where(D.c.next_attempt_at <= due)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


class RateLimit:
    """At most ``rate`` calls a second to one URL: calls start at least 1/rate apart
    (a token bucket holding one token, so no second ever sees more than ``rate``)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = 1.0
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self.tokens = min(1.0, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


@dataclass(kw_only=True)
class _Breaker:
    """Opens after ``threshold`` deliveries in a row to one URL ended still owed."""

    threshold: int
    streak: int = 0
    open: bool = False

    def record(self, outcome: Outcome) -> bool:
        """Count an outcome; True the moment the breaker opens."""
        self.streak = self.streak + 1 if outcome.status == DELIVERY_PENDING else 0
        if not self.open and self.streak >= self.threshold:
            self.open = True
            return True
        return False


def audiences_owed(engine: Engine, destination_ids: Sequence[int]) -> list[Audience]:
    """Audiences with deliveries whose retry time has come (for the background retry)."""
    query = (
        select(AUDIENCES.c.id, AUDIENCES.c.key)
        .where(
            exists().where(
                D.c.status == DELIVERY_PENDING,
                D.c.audience_id == AUDIENCES.c.id,
                D.c.destination_id.in_(destination_ids),
                D.c.next_attempt_at <= datetime.now(UTC),
            )
        )
        .order_by(AUDIENCES.c.id)
    )
    with engine.connect() as conn:
        return [Audience(id=row.id, key=row.key) for row in conn.execute(query).all()]


_claims = itertools.count(1)


def new_claimer() -> str:
    """A name for one delivery pass of one process: ``host:pid:n`` (``deliveries.claimed_by``)."""
    return f"{HOST[:40]}:{os.getpid()}:{next(_claims)}"


def _pages_of(audience_id: int | None, destination_ids: Sequence[int]) -> ColumnElement[bool]:
    return and_(
        P.c.audience_id.is_(None) if audience_id is None else P.c.audience_id == audience_id,
        P.c.destination_id.in_(destination_ids),
    )


def cut_pages(
    engine: Engine,
    audience_id: int | None,
    destination_ids: Sequence[int],
    due: datetime | None,
    size: int,
) -> int:
    """Cut what is owed (and due) into pages of ``size`` rows in id order, one set per URL.
    Returns how many rows the pages hold.

    Pages left by an earlier pass are dropped first: they are void, since only the lease
    holder and its helper processes deliver an audience."""
    now = datetime.now(UTC)
    with write_transaction(engine) as conn:
        conn.execute(delete(P).where(_pages_of(audience_id, destination_ids)))
        # Integer division of the row number: ``/`` on SQLite and PostgreSQL, ``DIV`` on MySQL.
        divide = "DIV" if conn.dialect.name in MYSQL else "/"
        number = func.row_number().over(order_by=D.c.id) - 1
        for destination_id in destination_ids:
            rows = select(D.c.id, number.self_group().op(divide)(size).label("page")).where(
                owed(audience_id, [destination_id])
            )
            if due is not None:
                rows = rows.where(D.c.next_attempt_at <= due)
            numbered = rows.subquery()
            conn.execute(
                insert(P).from_select(
                    ["audience_id", "destination_id", "first_id", "last_id", "owed", "created_at"],
                    select(
                        literal(audience_id, Integer()),
                        literal(destination_id, Integer()),
                        func.min(numbered.c.id),
                        func.max(numbered.c.id),
                        func.count(),
                        literal(now, P.c.created_at.type),
                    ).group_by(numbered.c.page),
                )
            )
        total = conn.execute(
            select(func.coalesce(func.sum(P.c.owed), 0)).where(
                _pages_of(audience_id, destination_ids)
            )
        ).scalar_one()
    return int(total)


def drop_pages(engine: Engine, audience_id: int | None, destination_ids: Sequence[int]) -> None:
    """The end of a pass: its pages go; what they held and was not sent stays owed."""
    with write_transaction(engine) as conn:
        conn.execute(delete(P).where(_pages_of(audience_id, destination_ids)))


def _claim_page(
    engine: Engine,
    audience_id: int | None,
    destination_id: int,
    due: datetime | None,
    claimer: str,
) -> list[_Pending] | None:
    """Claim the next unclaimed page of this URL and read its rows still owed, in id order;
    None when every page is taken.

    ``FOR UPDATE SKIP LOCKED`` on PostgreSQL: processes claiming at the same moment get
    different pages instead of waiting for each other. SQLite has a single writer, so there the
    claims simply take turns. MySQL/MariaDB: see ``_take_free_page``."""
    free = (
        select(P.c.id)
        .where(_pages_of(audience_id, [destination_id]), P.c.claimed_by.is_(None))
        .order_by(P.c.id)
    )
    while True:
        with write_transaction(engine) as conn:
            if conn.dialect.name in MYSQL:
                candidates = conn.execute(free.limit(MYSQL_PAGES_LOOKED_AT)).scalars().all()
                page = next(
                    (got for i in candidates if (got := _take_free_page(conn, i, claimer))), None
                )
                if page is None and len(candidates) == MYSQL_PAGES_LOOKED_AT:
                    continue  # all taken since this transaction's snapshot: look again
            else:
                page = conn.execute(
                    update(P)
                    .where(
                        P.c.id == free.limit(1).with_for_update(skip_locked=True).scalar_subquery()
                    )
                    .values(claimed_by=claimer)
                    .returning(P.c.first_id, P.c.last_id)
                ).first()
            if page is None:
                return None
            query = (
                select(
                    D.c.id,
                    D.c.run_id,
                    D.c.deletion_id,
                    D.c.user_id,
                    D.c.trait_value,
                    D.c.created_at,
                    D.c.owed_since,
                    D.c.attempts,
                )
                .where(owed(audience_id, [destination_id]), D.c.id.between(page[0], page[1]))
                .order_by(D.c.id)
            )
            if due is not None:
                query = query.where(D.c.next_attempt_at <= due)
            return list(map(_Pending._make, conn.execute(query)))


def _take_free_page(conn: Connection, page_id: int, claimer: str) -> tuple[int, int] | None:
    """Claim page ``page_id`` if it is still free; its (first_id, last_id) if this did.

    On MySQL/MariaDB, whose InnoDB takes a lock on every row a ``FOR UPDATE`` reads on its way,
    other URLs' pages too: with ``SKIP LOCKED`` a claim skipped pages that another URL's claim
    had only looked at, and its pass ended with pages unsent. So the free pages are read
    without locks, and each is taken by its id only while still unclaimed (an update locks
    that row alone, and reads its latest claim)."""
    taken = conn.execute(
        update(P).where(P.c.id == page_id, P.c.claimed_by.is_(None)).values(claimed_by=claimer)
    ).rowcount
    if not taken:
        return None
    first, last = conn.execute(select(P.c.first_id, P.c.last_id).where(P.c.id == page_id)).one()
    return first, last


def backoff_seconds(attempt: int, tray: TraySettings, retry_after: float | None) -> float:
    """Full-jitter exponential backoff; a server's Retry-After is a floor."""
    ceiling = min(tray.backoff_max_seconds, tray.backoff_base_seconds * 2 ** min(attempt - 1, 32))
    delay = random.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def pass_delay(attempts: int, tray: TraySettings) -> timedelta:
    """How long a delivery still owed after ``attempts`` tries waits for the next pass:
    ``backoff_max_seconds``, doubling with every pass, at most an hour."""
    passes = max(1, -(-attempts // TRIES_PER_PASS))
    seconds = tray.backoff_max_seconds * 2 ** min(passes - 1, 20)
    return timedelta(seconds=min(seconds, MAX_PASS_DELAY_SECONDS))


async def _send_with_retries(
    client: TrayClient,
    url: str,
    body: bytes,
    tray: TraySettings,
    row: _Pending,
    limit: RateLimit | None = None,
    stop: threading.Event | None = None,
) -> Outcome:
    """Up to TRIES_PER_PASS tries with jittered backoff; then owed to a later pass, or
    failed for good once it reached ``max_attempts`` tries or ``max_age``."""
    tries = 0
    while True:
        tries += 1
        attempts = row.attempts + tries
        if limit is not None:
            await limit.wait()
        try:
            code = await client.post(url, body)
            return Outcome(
                delivery_id=row.id,
                status=DELIVERY_SENT,
                attempts=attempts,
                status_code=code,
                error=None,
                at=datetime.now(UTC),
            )
        except PermanentDeliveryError as exc:
            return Outcome(
                delivery_id=row.id,
                status=DELIVERY_FAILED,
                attempts=attempts,
                status_code=exc.status_code,
                error=str(exc),
                at=datetime.now(UTC),
            )
        except DeliveryError as exc:
            now = datetime.now(UTC)
            if attempts >= tray.max_attempts or now - row.owed_since >= timedelta(
                seconds=tray.max_age_seconds
            ):
                return Outcome(
                    delivery_id=row.id,
                    status=DELIVERY_FAILED,
                    attempts=attempts,
                    status_code=exc.status_code,
                    error=f"gave up after {attempts} attempts: {exc}",
                    at=now,
                )
            delay = backoff_seconds(tries, tray, exc.retry_after)
            if (
                tries >= TRIES_PER_PASS
                or delay > tray.backoff_max_seconds
                or not await _pause(delay, stop)
            ):
                # Still owed: stays pending for a later pass, with what went wrong.
                return Outcome(
                    delivery_id=row.id,
                    status=DELIVERY_PENDING,
                    attempts=attempts,
                    status_code=exc.status_code,
                    error=str(exc),
                    at=now,
                )


async def _pause(seconds: float, stop: threading.Event | None) -> bool:
    """Sleep before a retry; False as soon as a shutdown asks to stop."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if stop is not None and stop.is_set():
            return False
        await asyncio.sleep(min(left, STOP_POLL_SECONDS))
    return stop is None or not stop.is_set()


def _body(bodies: IdentifyBodies | None, row: _Pending) -> bytes:
    """An identify body of the pass's audience, or (``bodies`` None) a user deletion's."""
    if bodies is None:
        assert row.deletion_id is not None
        return delete_body(
            user_id=row.user_id,
            message_id=delete_message_id(row.deletion_id),
            timestamp=row.created_at,
        )
    assert row.run_id is not None and row.value is not None
    return bodies.body(
        user_id=row.user_id,
        value=row.value,
        message_id=identify_message_id(bodies.audience_id, row.run_id, row.user_id),
        timestamp=row.created_at,
    )


@dataclass(frozen=True, kw_only=True)
class PassPlan:
    """What one process does in a delivery pass (pickled to helper processes)."""

    audience: Audience | None
    targets: tuple[Target, ...]
    tray: TraySettings  # this process's share of max_concurrency and max_requests_per_second
    due: datetime | None
    claimer: str


def share_out(tray: TraySettings) -> list[TraySettings]:
    """Split ``max_concurrency`` and ``max_requests_per_second`` between the pass's processes,
    so that together they never exceed what the settings allow for one URL."""
    processes = max(1, min(tray.delivery_processes, tray.max_concurrency))
    base, extra = divmod(tray.max_concurrency, processes)
    rate = tray.max_requests_per_second
    return [
        replace(
            tray,
            max_concurrency=base + (1 if n < extra else 0),
            max_requests_per_second=rate / processes if rate else None,
            delivery_processes=1,
        )
        for n in range(processes)
    ]


async def deliver_audience(
    engine: Engine,
    audience: Audience | None,
    targets: Sequence[Target],
    tray: TraySettings,
    *,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    due_only: bool = False,
) -> DeliveryTotals:
    """Send the pending identifies of this audience (None: the user deletions) to each
    configured URL. The caller holds the audience's lease (or the deletions' lease).

    ``due_only`` sends only rows whose backoff has passed (the background retry); a run sends
    everything owed. When ``stop`` is set (shutdown), no new call starts: what was not sent
    stays pending. A URL that keeps failing is left alone for the rest of this pass.
    With ``[tray] delivery_processes`` above 1, helper processes share the pass, each claiming
    pages of rows (see syncer.workers).
    """
    if not targets:
        return DeliveryTotals()
    target_ids = [t.id for t in targets]
    audience_id = audience.id if audience else None
    due = datetime.now(UTC) if due_only else None
    totals = DeliveryTotals()
    totals.failed += await asyncio.to_thread(expire_overdue, engine, audience_id, target_ids, tray)
    total = await asyncio.to_thread(cut_pages, engine, audience_id, target_ids, due, PAGE_SIZE)
    if total == 0:
        return totals
    # Helper processes only pay for their start-up (about 0.8 s of CPU) on a large pass.
    shares = (
        share_out(tray)
        if total >= HELPERS_MIN_OWED
        else share_out(replace(tray, delivery_processes=1))
    )
    plans = [
        PassPlan(
            audience=audience,
            targets=tuple(targets),
            tray=share,
            due=due,
            claimer=new_claimer(),
        )
        for share in shares
    ]
    done = [0] * len(plans)

    def report(n: int) -> Callable[[int, DeliveryTotals], None]:
        def update(count: int, _recorded: DeliveryTotals) -> None:
            done[n] = count
            if progress:
                progress(sum(done), total)

        return update

    if progress:
        progress(0, total)
    try:
        async with workers.Helpers(engine.url, plans[1:], report=report, stop=stop) as helpers:
            own = await run_pass(engine, plans[0], progress=report(0), stop=stop)
            for part in [own, *await helpers.results()]:
                totals.sent += part.sent
                totals.failed += part.failed
    finally:
        await asyncio.to_thread(drop_pages, engine, audience_id, target_ids)
    totals.retry_later = await asyncio.to_thread(
        count_pending, engine, audience_id, target_ids, None
    )
    if progress:
        progress(sum(done), total)
    return totals


async def run_pass(
    engine: Engine,
    plan: PassPlan,
    *,
    progress: Callable[[int, DeliveryTotals], None] | None = None,
    stop: threading.Event | None = None,
) -> DeliveryTotals:
    """One process's part of a pass: claim pages, send, record; give back what is left."""
    tray, audience = plan.tray, plan.audience
    audience_id = audience.id if audience else None
    label = audience.key if audience else "user deletions"
    recorder = _Recorder(
        engine=engine,
        tray=tray,
        claimer=plan.claimer,
        progress=progress,
        batch=tray.max_concurrency,
    )
    bodies = IdentifyBodies(audience.key, audience.id) if audience else None
    # A crash sends again the calls started but not yet recorded: at most EXPOSED_ROUNDS
    # rounds of the concurrency limit.
    max_exposed = EXPOSED_ROUNDS * tray.max_concurrency * len(plan.targets)

    async def pipeline(client: TrayClient, target: Target) -> None:
        queue: asyncio.Queue[_Pending | None] = asyncio.Queue(maxsize=PAGE_SIZE)
        breaker = _Breaker(threshold=max(BREAKER_MIN_FAILURES, tray.max_concurrency))
        limit = RateLimit(tray.max_requests_per_second) if tray.max_requests_per_second else None

        def halted() -> bool:
            return breaker.open or (stop is not None and stop.is_set())

        async def reader() -> None:
            while (
                not halted()
                and (
                    page := await asyncio.to_thread(
                        _claim_page, engine, audience_id, target.id, plan.due, plan.claimer
                    )
                )
                is not None
            ):
                for row in page:
                    await queue.put(row)
            for _ in range(tray.max_concurrency):
                await queue.put(None)

        async def sender() -> None:
            while (row := await queue.get()) is not None:
                if halted():
                    continue  # stays pending: owed to the next pass
                body = _body(bodies, row)
                await recorder.expose(max_exposed)
                outcome = await _send_with_retries(client, target.url, body, tray, row, limit, stop)
                recorder.add(outcome)
                if breaker.record(outcome):
                    await asyncio.to_thread(
                        postpone,
                        engine,
                        audience_id,
                        target.id,
                        datetime.now(UTC) + pass_delay(outcome.attempts, tray),
                    )
                    logger.warning(
                        "audience %s: workflow URL #%d (host %s) keeps failing (%s); what it "
                        "is owed waits for the next pass",
                        label,
                        target.id,
                        target.host,
                        outcome.error,
                    )

        await asyncio.gather(reader(), *(sender() for _ in range(tray.max_concurrency)))

    started = time.monotonic()
    writing = asyncio.create_task(recorder.run())
    try:
        async with TrayClient(
            timeout_seconds=tray.timeout_seconds,
            max_connections=tray.max_concurrency * len(plan.targets),
            shared_secret=tray.shared_secret,
        ) as client:
            await asyncio.gather(*(pipeline(client, t) for t in plan.targets))
    finally:
        await recorder.close()
        await writing
    logger.debug("%s: %d deliveries in %.1fs", label, recorder.done, time.monotonic() - started)
    return recorder.totals
