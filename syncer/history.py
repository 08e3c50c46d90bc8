"""Sync history: runs newest first, with what each found and what became of its deliveries.

``sent`` and ``failed`` are counted from ``deliveries`` for the run, so they stay true when a
later run finishes what an earlier one could not (``failed`` counts deliveries given up on
and deliveries still owed after a failed attempt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, case, func, select

from syncer.errors import AudienceError
from syncer.models import (
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    DELIVERY_SENT,
    Audience,
    Delivery,
    SyncRun,
)


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    run_id: int
    audience_key: str
    kind: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    members: int | None
    added: int | None
    removed: int | None
    skipped_ids: int | None
    sent: int
    failed: int
    pending: int
    error: str | None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("started_at", "finished_at"):
            value = data[name]
            data[name] = value.isoformat().replace("+00:00", "Z") if value else None
        return data


@dataclass(frozen=True, kw_only=True)
class LastRun:
    """An audience's newest run, as listings show it (``audience list --json``, the console)."""

    run_id: int
    status: str
    finished_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        finished = self.finished_at
        return {
            "run_id": self.run_id,
            "status": self.status,
            "finished_at": finished.isoformat().replace("+00:00", "Z") if finished else None,
        }


def last_runs(engine: Engine, audience_ids: Sequence[int]) -> dict[int, LastRun]:
    """The newest run of each of ``audience_ids`` (running ones included), in one query;
    audiences that never ran are absent."""
    if not audience_ids:
        return {}
    newest = (
        select(func.max(SyncRun.id))
        .where(SyncRun.audience_id.in_(audience_ids))
        .group_by(SyncRun.audience_id)
    )
    query = select(SyncRun.audience_id, SyncRun.id, SyncRun.status, SyncRun.finished_at).where(
        SyncRun.id.in_(newest)
    )
    with engine.connect() as conn:
        return {
            row.audience_id: LastRun(run_id=row.id, status=row.status, finished_at=row.finished_at)
            for row in conn.execute(query)
        }


def runs(engine: Engine, key: str | None = None, *, limit: int = 20) -> list[RunRecord]:
    if limit <= 0:
        raise AudienceError("--limit must be a positive number")
    query = (
        select(
            SyncRun.id,
            Audience.key,
            SyncRun.kind,
            SyncRun.status,
            SyncRun.started_at,
            SyncRun.finished_at,
            SyncRun.members,
            SyncRun.added,
            SyncRun.removed,
            SyncRun.skipped_ids,
            SyncRun.error,
        )
        .join(Audience, Audience.id == SyncRun.audience_id)
        .order_by(SyncRun.id.desc())
        .limit(limit)
    )
    with engine.connect() as conn:
        if key is not None:
            if conn.execute(select(Audience.id).where(Audience.key == key)).first() is None:
                raise AudienceError(f"no audience with key {key!r}; see: syncer audience list")
            query = query.where(Audience.key == key)
        rows = conn.execute(query).all()
        counts = _delivery_counts(engine, [r.id for r in rows])
    return [
        RunRecord(
            run_id=r.id,
            audience_key=r.key,
            kind=r.kind,
            status=r.status,
            started_at=r.started_at,
            finished_at=r.finished_at,
            members=r.members,
            added=r.added,
            removed=r.removed,
            skipped_ids=r.skipped_ids,
            error=r.error,
            **counts.get(r.id, {"sent": 0, "failed": 0, "pending": 0}),
        )
        for r in rows
    ]


def _delivery_counts(engine: Engine, run_ids: list[int]) -> dict[int, dict[str, int]]:
    if not run_ids:
        return {}
    D = Delivery
    tried_and_owed = and_(D.status == DELIVERY_PENDING, D.attempts > 0)
    query = (
        select(
            D.run_id,
            func.sum(case((D.status == DELIVERY_SENT, 1), else_=0)),
            func.sum(case((D.status == DELIVERY_FAILED, 1), (tried_and_owed, 1), else_=0)),
            func.sum(case((D.status == DELIVERY_PENDING, 1), else_=0)),
        )
        .where(D.run_id.in_(run_ids))
        .group_by(D.run_id)
    )
    with engine.connect() as conn:
        return {
            run_id: {"sent": int(sent or 0), "failed": int(failed or 0), "pending": int(p or 0)}
            for run_id, sent, failed, p in conn.execute(query).all()
        }


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain aligned columns, for terminals."""
    if not rows:
        return "(none)"
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    )


def format_runs(records: list[RunRecord]) -> str:
    return format_table(
        [
            "RUN",
            "AUDIENCE",
            "KIND",
            "STATUS",
            "STARTED (UTC)",
            "SECONDS",
            "MEMBERS",
            "ADDED",
            "REMOVED",
            "SENT",
            "FAILED",
        ],
        [
            [
                str(r.run_id),
                r.audience_key,
                r.kind,
                r.status,
                r.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                f"{(r.finished_at - r.started_at).total_seconds():.1f}" if r.finished_at else "-",
                _n(r.members),
                _n(r.added),
                _n(r.removed),
                str(r.sent),
                str(r.failed),
            ]
            for r in records
        ],
    )


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)
