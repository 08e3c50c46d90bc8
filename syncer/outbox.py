"""The outbox as operators see it: ``syncer deliveries`` lists it, ``syncer retry`` sends what
failed again."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, and_, exists, or_, select, update
from sqlalchemy.orm import aliased

from syncer import audiences, leases, loops
from syncer.db import write_transaction
from syncer.delivery import Audience, DeliveryTotals, deliver_audience, register_destinations
from syncer.errors import AudienceError, LeaseHeldError
from syncer.models import (
    AUDIENCE_DELETED,
    AUDIENCES,
    DELIVERIES,
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    DELIVERY_SENT,
    DELIVERY_SUPERSEDED,
    KIND_IDENTIFY,
    AudienceDestination,
    Destination,
)
from syncer.privacy import holds_deleted_user
from syncer.settings import Settings

D = DELIVERIES


@dataclass(frozen=True, kw_only=True)
class DeliveryRecord:
    id: int
    run_id: int
    audience_key: str
    user_id: str
    destination_id: int
    destination_host: str
    kind: str
    value: bool | None
    status: str
    attempts: int
    created_at: datetime
    last_attempt_at: datetime | None
    delivered_at: datetime | None
    last_status_code: int | None
    last_error: str | None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("created_at", "last_attempt_at", "delivered_at"):
            if data[name] is not None:
                data[name] = data[name].isoformat().replace("+00:00", "Z")
        return data


def list_deliveries(
    engine: Engine, key: str | None = None, *, status: str | None = None, limit: int = 100
) -> list[DeliveryRecord]:
    """Deliveries, newest first. Workflow URLs are shown by host only."""
    if limit <= 0:
        raise AudienceError("--limit must be a positive number")
    query = (
        select(D, AUDIENCES.c.key, Destination.host)
        .join(AUDIENCES, AUDIENCES.c.id == D.c.audience_id)
        .join(Destination, Destination.id == D.c.destination_id)
        .order_by(D.c.id.desc())
        .limit(limit)
    )
    if key is not None:
        query = query.where(D.c.audience_id == audiences.get(engine, key, include_deleted=True).id)
    if status is not None:
        query = query.where(D.c.status == status)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        DeliveryRecord(
            id=r.id,
            run_id=r.run_id,
            audience_key=r.key,
            user_id=r.user_id,
            destination_id=r.destination_id,
            destination_host=r.host,
            kind=r.kind,
            value=r.trait_value,
            status=r.status,
            attempts=r.attempts,
            created_at=r.created_at,
            last_attempt_at=r.last_attempt_at,
            delivered_at=r.delivered_at,
            last_status_code=r.last_status_code,
            last_error=r.last_error,
        )
        for r in rows
    ]


def requeue_failed(engine: Engine, destination_ids: list[int], key: str | None = None) -> int:
    """Make failed identifies to configured URLs owed again (of audiences not deleted).

    A failed value is never sent once something newer stands for that user and URL: a newer
    change, or the URL's backfill after it was removed and added back. Those become
    superseded instead. A deleted user's identifies are never sent again: ``users delete``
    keeps only the hash in them, and they stay failed. (A failed delete is sent again by
    running ``users delete`` again: its row keeps only the hash.)
    """
    now = datetime.now(UTC)
    newer = aliased(D)
    has_newer = exists().where(
        newer.c.audience_id == D.c.audience_id,
        newer.c.user_id == D.c.user_id,
        newer.c.destination_id == D.c.destination_id,
        newer.c.id > D.c.id,
        newer.c.status.in_((DELIVERY_PENDING, DELIVERY_SENT, DELIVERY_FAILED)),
    )
    ad = AudienceDestination
    before_backfill = exists().where(
        ad.audience_id == D.c.audience_id,
        ad.destination_id == D.c.destination_id,
        ad.since_run_id > D.c.run_id,
    )
    live = select(AUDIENCES.c.id).where(AUDIENCES.c.status != AUDIENCE_DELETED)
    failed = and_(
        D.c.status == DELIVERY_FAILED,
        D.c.kind == KIND_IDENTIFY,
        D.c.destination_id.in_(destination_ids),
        D.c.audience_id.in_(live.scalar_subquery()),
        ~holds_deleted_user(D.c.user_id),
    )
    if key is not None:
        failed = and_(failed, D.c.audience_id == audiences.get(engine, key).id)
    with write_transaction(engine) as conn:
        conn.execute(
            update(D)
            .where(failed, or_(has_newer, before_backfill))
            .values(status=DELIVERY_SUPERSEDED)
        )
        return int(
            conn.execute(
                update(D)
                .where(failed)
                .values(
                    status=DELIVERY_PENDING,
                    attempts=0,
                    owed_since=now,
                    next_attempt_at=now,
                    last_error=None,
                )
            ).rowcount
            or 0
        )


@dataclass(frozen=True, kw_only=True)
class RetryResult:
    audience_key: str
    totals: DeliveryTotals | None
    error: str | None = None


def retry(
    engine: Engine, settings: Settings, key: str | None = None
) -> tuple[int, list[RetryResult]]:
    """``syncer retry``: requeue what failed, then send everything owed now."""
    if key is not None:
        audiences.get(engine, key)  # an unknown key is refused before anything is written
    targets = register_destinations(engine, settings.tray.require_urls())
    requeued = requeue_failed(engine, [t.id for t in targets], key)
    results = []
    for view in [audiences.get(engine, key)] if key else audiences.list_all(engine):
        try:
            lease = leases.acquire(engine, view.id, view.key)
        except LeaseHeldError as exc:
            results.append(RetryResult(audience_key=view.key, totals=None, error=str(exc)))
            continue
        try:
            totals = loops.run(
                deliver_audience(engine, Audience(id=view.id, key=view.key), targets, settings.tray)
            )
        finally:
            lease.release()
        if totals.sent or totals.not_delivered:
            results.append(RetryResult(audience_key=view.key, totals=totals))
    return requeued, results
