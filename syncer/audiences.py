"""Audiences: names, keys, definitions, schedules, and their life cycle.

The key is ``parameterize(underscore(name), "_")``, fixed at creation, unique forever: a
deleted audience keeps its row (status ``deleted``) so that its key is never reused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import inflection
from sqlalchemy import Engine, RowMapping, insert, select, update
from sqlalchemy.exc import IntegrityError

from syncer.db import write_transaction
from syncer.errors import AudienceError, ConfigError
from syncer.guard import GuardOverrides
from syncer.models import (
    AUDIENCE_ACTIVE,
    AUDIENCE_DELETED,
    AUDIENCE_PAUSED,
    AUDIENCES,
    DELIVERIES,
    DELIVERY_CANCELLED,
    DELIVERY_PENDING,
    KEY_LENGTH,
    Audience,
)
from syncer.settings import (
    DEFAULT_SOURCE,
    MAX_EVERY_SECONDS,
    MAX_MIN_REMOVED,
    MIN_EVERY_SECONDS,
    Settings,
    format_duration,
    parse_duration,
    validate_cron,
)
from syncer.sources import check_definition, normalize_sql, open_source

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 255


def audience_key(name: str) -> str:
    """``Order Completed Last 30days`` -> ``order_completed_last_30days``."""
    return str(inflection.parameterize(inflection.underscore(name), "_"))


@dataclass(frozen=True, kw_only=True)
class Schedule:
    every_seconds: int | None = None
    cron: str | None = None

    def describe(self, default_every_seconds: int) -> str:
        if self.cron:
            return f"cron {self.cron}"
        if self.every_seconds:
            return f"every {format_duration(self.every_seconds)}"
        return f"every {format_duration(default_every_seconds)} (default)"


def parse_schedule(every: str | None, cron: str | None) -> Schedule:
    if every and cron:
        raise AudienceError("give either --every or --cron, not both")
    try:
        if every is not None:
            return Schedule(
                every_seconds=parse_duration(
                    every, what="--every", at_least=MIN_EVERY_SECONDS, at_most=MAX_EVERY_SECONDS
                )
            )
        if cron is not None:
            return Schedule(cron=validate_cron(cron, what="--cron"))
    except ConfigError as exc:
        raise AudienceError(str(exc)) from None
    return Schedule()


@dataclass(frozen=True, kw_only=True)
class AudienceView:
    """An audience as commands show it."""

    id: int
    key: str
    name: str
    source: str
    sql: str
    status: str
    schedule: Schedule
    created_at: datetime
    updated_at: datetime
    # SQL compiled from rules: its bound values, and the rules (None: hand-written SQL).
    params: Mapping[str, Any] | None = None
    rules: Any = None
    managed: bool = False  # syncer apply owns it (audiences.yml)
    guard: GuardOverrides = field(default_factory=lambda: GuardOverrides())
    removal_approved_at: datetime | None = None

    @classmethod
    def of(cls, row: RowMapping) -> AudienceView:
        return cls(
            id=row["id"],
            key=row["key"],
            name=row["name"],
            source=row["source_name"],
            sql=row["definition_sql"],
            status=row["status"],
            schedule=Schedule(every_seconds=row["every_seconds"], cron=row["cron"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            params=json.loads(row["definition_params"]) if row["definition_params"] else None,
            rules=json.loads(row["definition_rules"]) if row["definition_rules"] else None,
            managed=bool(row["managed"]),
            guard=GuardOverrides(
                max_removed_percent=row["guard_max_removed_percent"],
                min_removed=row["guard_min_removed"],
            ),
            removal_approved_at=row["removal_approved_at"],
        )


def _validated_name(name: str) -> tuple[str, str]:
    cleaned = " ".join(name.split())
    if not cleaned:
        raise AudienceError(
            "the audience name is empty; give a name like 'Order Completed Last 30days'"
        )
    if len(cleaned) > MAX_NAME_LENGTH:
        raise AudienceError(f"the audience name is longer than {MAX_NAME_LENGTH} characters")
    key = audience_key(cleaned)
    if len(key) > KEY_LENGTH:
        raise AudienceError(
            f"the key made from this name would be {len(key)} characters, over {KEY_LENGTH}; "
            "choose a shorter name"
        )
    if not key:
        raise AudienceError(
            f"the audience name {name!r} has no letters or digits to make a key from"
        )
    return cleaned, key


def _check_sql(settings: Settings, source_name: str, sql: str) -> str:
    # Parsed in the source's dialect before anything connects (or, for some warehouses' dialects,
    # looks for credentials): a refusal is the SQL's, not a connection's.
    normalize_sql(sql, settings.source(source_name).url.get_backend_name())
    source = open_source(settings, source_name)
    try:
        return check_definition(source, sql)
    finally:
        source.engine.dispose()


def create(
    state: Engine,
    settings: Settings,
    *,
    name: str,
    sql: str,
    source: str = DEFAULT_SOURCE,
    schedule: Schedule | None = None,
) -> AudienceView:
    """Validate everything, then store the audience. Its next run is the initial sync."""
    name, key = _validated_name(name)
    settings.source(source)
    with state.connect() as conn:
        taken = conn.execute(select(Audience.status).where(Audience.key == key)).scalar()
    if taken is not None:
        raise _key_taken(key, taken)
    sql = _check_sql(settings, source, sql)
    schedule = schedule or Schedule()
    now = datetime.now(UTC)
    try:
        with write_transaction(state) as conn:
            conn.execute(
                insert(Audience).values(
                    key=key,
                    name=name,
                    source_name=source,
                    definition_sql=sql,
                    every_seconds=schedule.every_seconds,
                    cron=schedule.cron,
                    status=AUDIENCE_ACTIVE,
                    created_at=now,
                    updated_at=now,
                )
            )
    except IntegrityError:
        raise _key_taken(key, AUDIENCE_ACTIVE) from None
    logger.info("created audience %s", key)
    return get(state, key)


def _key_taken(key: str, status: str) -> AudienceError:
    if status == AUDIENCE_DELETED:
        return AudienceError(
            f"the key {key!r} belonged to a deleted audience and is never reused; choose another name"
        )
    return AudienceError(f"an audience with key {key!r} already exists; choose another name")


def get(state: Engine, key: str, *, include_deleted: bool = False) -> AudienceView:
    with state.connect() as conn:
        row = conn.execute(select(AUDIENCES).where(AUDIENCES.c.key == key)).mappings().first()
    if row is None or (row["status"] == AUDIENCE_DELETED and not include_deleted):
        raise AudienceError(f"no audience with key {key!r}; see: syncer audience list")
    return AudienceView.of(row)


def get_by_id(state: Engine, audience_id: int) -> AudienceView:
    with state.connect() as conn:
        row = (
            conn.execute(select(AUDIENCES).where(AUDIENCES.c.id == audience_id)).mappings().first()
        )
    if row is None or row["status"] == AUDIENCE_DELETED:
        raise AudienceError(f"no audience with id {audience_id}")
    return AudienceView.of(row)


def to_run(state: Engine, keys: Sequence[str] = ()) -> list[AudienceView]:
    """The audiences a sync runs: the given keys (any status but deleted), else every active
    one. An unknown key is refused before anything runs."""
    if keys:
        return [get(state, key) for key in keys]
    return [view for view in list_all(state) if view.status == AUDIENCE_ACTIVE]


def list_all(state: Engine, *, include_deleted: bool = False) -> list[AudienceView]:
    query = select(AUDIENCES).order_by(AUDIENCES.c.key)
    if not include_deleted:
        query = query.where(AUDIENCES.c.status != AUDIENCE_DELETED)
    with state.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [AudienceView.of(row) for row in rows]


def update_definition(
    state: Engine,
    settings: Settings,
    key: str,
    *,
    sql: str | None = None,
    schedule: Schedule | None = None,
    guard: Mapping[str, int | None] | None = None,
) -> AudienceView:
    """Change the SQL, the schedule and/or the guard's thresholds (``guard``: the thresholds
    to set, by name; None sets one back to the [guard] setting). The key never changes."""
    current = get(state, key)
    if current.managed:
        raise AudienceError(
            f"audience {key!r} is managed by an audiences.yml file (syncer apply): change it "
            "there and apply it again"
        )
    values: dict[str, object] = {}
    if sql is not None:
        values["definition_sql"] = _check_sql(settings, current.source, sql)
        values["definition_params"] = None
        values["definition_rules"] = None
    if schedule is not None:
        values["every_seconds"] = schedule.every_seconds
        values["cron"] = schedule.cron
    for name, value in (guard or {}).items():
        values[f"guard_{name}"] = value
    if not values:
        raise AudienceError(
            "nothing to update; give --sql, --every, --cron, --max-removed-percent or --min-removed"
        )
    values["updated_at"] = datetime.now(UTC)
    _set(state, key, values)
    return get(state, key)


def approve(state: Engine, key: str) -> AudienceView:
    """Let the audience's next run through the removal guard, once (a real mass removal)."""
    get(state, key)
    _set(state, key, {"removal_approved_at": datetime.now(UTC)})
    return get(state, key)


GUARD_DEFAULT = "default"  # `audience update --min-removed default`: the [guard] setting again


def validate_guard(
    max_removed_percent: int | str | None, min_removed: int | str | None
) -> dict[str, int | None]:
    """The guard thresholds ``audience update`` sets, checked as [guard] is: a number, or
    ``default`` for the [guard] setting (None: left as it is)."""
    given: dict[str, int | None] = {}
    for name, value in (("max_removed_percent", max_removed_percent), ("min_removed", min_removed)):
        if value == GUARD_DEFAULT:
            given[name] = None
        elif isinstance(value, int):
            given[name] = value
    max_removed_percent = given.get("max_removed_percent")
    min_removed = given.get("min_removed")
    if max_removed_percent is not None and not 0 <= max_removed_percent <= 100:
        raise AudienceError(
            f"the removal guard's max_removed_percent must be from 0 to 100, got "
            f"{max_removed_percent}"
        )
    if min_removed is not None and not 0 <= min_removed <= MAX_MIN_REMOVED:
        raise AudienceError(
            f"the removal guard's min_removed must be from 0 to {MAX_MIN_REMOVED}, got "
            f"{min_removed}"
        )
    return given


def set_status(state: Engine, key: str, status: str) -> AudienceView:
    """Pause, resume or delete an audience (a deleted key stays reserved forever)."""
    assert status in (AUDIENCE_ACTIVE, AUDIENCE_PAUSED, AUDIENCE_DELETED)
    get(state, key)
    now = datetime.now(UTC)
    values: dict[str, object] = {"status": status, "updated_at": now}
    if status == AUDIENCE_DELETED:
        values["deleted_at"] = now
    _set(state, key, values)
    return get(state, key, include_deleted=True)


def cancel_owed(state: Engine, audience_id: int) -> None:
    """A deleted audience's deliveries still owed will not be sent."""
    d = DELIVERIES.c
    with write_transaction(state) as conn:
        conn.execute(
            update(DELIVERIES)
            .where(d.audience_id == audience_id, d.status == DELIVERY_PENDING)
            .values(status=DELIVERY_CANCELLED, last_error="the audience was deleted")
        )


def _set(state: Engine, key: str, values: dict[str, object]) -> None:
    with write_transaction(state) as conn:
        conn.execute(
            update(Audience)
            .where(Audience.key == key, Audience.status != AUDIENCE_DELETED)
            .values(values)
        )


def shown_sql(view: AudienceView) -> str:
    """The SQL an audience runs, for ``audience show --sql``: SQL compiled from rules keeps its
    placeholders, and the values bound to them follow as comments."""
    if not view.params:
        return view.sql
    values = "\n".join(
        f"--   :{name} = {json.dumps(value, ensure_ascii=False)}"
        for name, value in sorted(view.params.items())
    )
    return f"{view.sql}\n-- bound values:\n{values}"
