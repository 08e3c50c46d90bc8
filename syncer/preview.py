"""Preview and dry run: what a run would do, without doing it.

A preview evaluates a definition exactly as a run does (steps 2 and 3 of the flow: stage in a
temporary table of one state connection, diff in SQL against the current snapshot), reads
counts and a few ids from those temporary tables, and then drops them. It takes no lease,
opens no run, and writes nothing to the snapshot, the outbox or the audiences; it sends
nothing. Python holds the counts and the samples, never the audience.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, exists, false, or_, select, true

from syncer import audiences, diff, guard
from syncer.audiences import AudienceView
from syncer.errors import SyncerError
from syncer.models import MEMBERSHIPS, SyncRun
from syncer.settings import Settings
from syncer.sources import open_source

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_SIZE = 10
MAX_SAMPLE_SIZE = 1000
# SQL given on its own (``audience preview --sql``) is diffed as a new audience's first run:
# against the snapshot of an audience id that no audience has (ids start at 1), i.e. nobody.
NO_AUDIENCE_ID = 0


@dataclass(frozen=True, kw_only=True)
class Preview:
    """What a run would find: its members, who would enter and leave, and whether the removal
    guard would hold it."""

    audience_key: str | None
    members: int
    entering: int
    leaving: int
    skipped: int  # blank, invalid or deleted users, as a run counts them
    sample: tuple[str, ...]  # up to sample_size member ids, sorted
    sample_entering: tuple[str, ...]
    sample_leaving: tuple[str, ...]
    held: bool  # the removal guard would hold this run (False without an audience)
    approved: bool  # `audience approve` lets its next run through the guard
    initial: bool  # no run of it has committed yet: everyone would be entering

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = (
            {} if self.audience_key is None else {"audience_key": self.audience_key}
        )
        return data | {
            "members": self.members,
            "entering": self.entering,
            "leaving": self.leaving,
            "skipped": self.skipped,
            "sample": list(self.sample),
            "sample_entering": list(self.sample_entering),
            "sample_leaving": list(self.sample_leaving),
            "held": self.held,
            "approved": self.approved,
            "initial": self.initial,
        }


@dataclass(frozen=True, kw_only=True)
class DryRun:
    """One audience of ``sync --dry-run``: its preview, or why it could not be made."""

    audience_key: str
    preview: Preview | None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        if self.preview is None:
            return {"audience_key": self.audience_key, "error": self.error}
        return self.preview.as_json()


def preview(
    state: Engine,
    settings: Settings,
    *,
    sql: str,
    params: Mapping[str, Any] | None,
    source_name: str,
    audience: AudienceView | None,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
) -> Preview:
    """Evaluate ``sql`` on ``source_name`` as a run would and diff it against ``audience``'s
    current snapshot (without an audience: against nobody, so everyone is entering).

    Raises what a run's evaluation raises: AudienceError for SQL that is not one read-only
    query, SourceError when it fails on its source. Nothing is written either way.
    """
    source = open_source(settings, source_name)
    audience_id = NO_AUDIENCE_ID if audience is None else audience.id
    try:
        with state.connect() as conn:
            try:
                staged = diff.stage(conn, source, sql, params)
                changes = diff.compute(conn, audience_id)
                with conn.begin():
                    samples = _samples(conn, audience_id, sample_size)
                    initial = audience is None or not _committed_before(conn, audience_id)
            finally:
                diff.discard(conn, "a preview")
    finally:
        source.engine.dispose()
    members = staged.members - changes.suppressed
    held = False
    if audience is not None:
        limits = guard.thresholds(settings.guard, audience.guard)
        before = guard.members_before(
            members_after=members, added=changes.added, removed=changes.removed
        )
        held = audience.removal_approved_at is None and limits.holds(
            members_before=before, removed=changes.removed
        )
    return Preview(
        audience_key=None if audience is None else audience.key,
        members=members,
        entering=changes.added,
        leaving=changes.removed,
        skipped=staged.skipped + changes.suppressed,
        sample=samples[0],
        sample_entering=samples[1],
        sample_leaving=samples[2],
        held=held,
        approved=audience is not None and audience.removal_approved_at is not None,
        initial=initial,
    )


def preview_audience(
    state: Engine,
    settings: Settings,
    audience: AudienceView,
    *,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
) -> Preview:
    """An audience's definition as its next run would evaluate it."""
    return preview(
        state,
        settings,
        sql=audience.sql,
        params=audience.params,
        source_name=audience.source,
        audience=audience,
        sample_size=sample_size,
    )


def dry_run(
    state: Engine,
    settings: Settings,
    keys: Sequence[str] = (),
    *,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
) -> list[DryRun]:
    """A preview of each audience ``sync`` would run (the given keys, else every active one).

    Unknown keys are refused before anything is evaluated. One audience whose source fails is
    that audience's error; the others are still previewed.
    """
    views = audiences.to_run(state, keys)
    results = []
    for view in views:
        try:
            found = preview_audience(state, settings, view, sample_size=sample_size)
        except SyncerError as exc:
            logger.info("audience %s could not be previewed: %s", view.key, exc)
            results.append(DryRun(audience_key=view.key, preview=None, error=str(exc)))
        else:
            results.append(DryRun(audience_key=view.key, preview=found))
    return results


def _samples(conn: Connection, audience_id: int, size: int) -> list[tuple[str, ...]]:
    """Up to ``size`` ids each of the members, those entering and those leaving, in id order.

    Members are the staged ids that are current members or entering: a deleted user the
    source still returns is staged but dropped from the changes, and is never shown."""
    staged, changes, m = diff.STAGED, diff.CHANGES, MEMBERSHIPS
    is_current = exists().where(diff.current_members(audience_id), m.c.user_id == staged.c.user_id)
    is_entering = exists().where(changes.c.user_id == staged.c.user_id, changes.c.entered == true())
    members = (
        select(staged.c.user_id)
        .where(or_(is_entering, is_current))
        .order_by(staged.c.user_id)
        .limit(size)
    )
    entering, leaving = (
        select(changes.c.user_id)
        .where(changes.c.entered == value)
        .order_by(changes.c.user_id)
        .limit(size)
        for value in (true(), false())
    )
    return [tuple(conn.execute(query).scalars()) for query in (members, entering, leaving)]


def _committed_before(conn: Connection, audience_id: int) -> bool:
    return (
        conn.execute(
            select(SyncRun.id)
            .where(SyncRun.audience_id == audience_id, SyncRun.committed_at.is_not(None))
            .limit(1)
        ).first()
        is not None
    )
