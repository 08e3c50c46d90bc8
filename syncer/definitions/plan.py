"""``syncer plan`` and ``syncer apply``: make the state database say what audiences.yml says.

``plan`` reads the file (``files.load_file``), reads each model's columns from its source,
compiles every entry (rules to SQL with bound values; SQL checked as ``audience create``
checks it), and compares the result with the audiences stored: a frozen ``Plan`` of what
would be created, updated, paused, resumed or deleted, and what is left alone. It writes
nothing. ``apply`` makes the same plan and carries it out in one transaction: a file with a
mistake anywhere changes nothing.

Keys never change. An entry's key is its ``key:`` or the key of its name; a renamed entry
without a pinned key is a new audience, and the old one stays (``plan`` shows it) until
``--prune``. Audiences the file does not name are never touched unless ``--prune`` retires
them. Audiences ``apply`` wrote are *managed*: ``audience update`` refuses them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from syncer import audiences
from syncer.audiences import AudienceView
from syncer.db import write_transaction
from syncer.definitions import files, rules
from syncer.errors import AudienceError, SourceError
from syncer.models import (
    AUDIENCE_ACTIVE,
    AUDIENCE_DELETED,
    AUDIENCE_MODELS,
    AUDIENCE_PAUSED,
    DELIVERIES,
    DELIVERY_CANCELLED,
    DELIVERY_PENDING,
    Audience,
)
from syncer.settings import Settings, format_duration
from syncer.sources import Source, check_definition, describe_db_error, fenced, open_source

logger = logging.getLogger(__name__)

# What a plan does to an audience.
CREATE, UPDATE, PAUSE, RESUME, DELETE, UNCHANGED, NOT_IN_FILE = (
    "create",
    "update",
    "pause",
    "resume",
    "delete",
    "unchanged",
    "not in file",
)


@dataclass(frozen=True, kw_only=True)
class Desired:
    """An audience as the file wants it, compiled."""

    key: str
    name: str
    source: str
    sql: str
    params: Mapping[str, Any] | None
    rules: Any  # the rules as written (JSON-able), or None for SQL
    every_seconds: int | None
    cron: str | None
    paused: bool
    max_removed_percent: int | None
    min_removed: int | None

    @property
    def params_json(self) -> str | None:
        return None if self.params is None else json.dumps(self.params, sort_keys=True)

    @property
    def rules_json(self) -> str | None:
        return None if self.rules is None else json.dumps(self.rules, sort_keys=True)


@dataclass(frozen=True, kw_only=True)
class AudienceChange:
    action: str  # CREATE, UPDATE, PAUSE, RESUME, DELETE, UNCHANGED, NOT_IN_FILE
    key: str
    name: str
    changes: tuple[str, ...] = ()  # what differs, for people: "sql", "every 3h -> every 1h"
    desired: Desired | None = None  # None: not in the file
    current: AudienceView | None = None
    preview: Any = None  # syncer.preview.Preview for a new or changed definition

    def as_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "key": self.key,
            "name": self.name,
            "changes": list(self.changes),
            "preview": None if self.preview is None else self.preview.as_json(),
        }


@dataclass(frozen=True, kw_only=True)
class ModelChange:
    action: str  # CREATE, UPDATE, UNCHANGED, DELETE
    name: str
    info: rules.ModelInfo | None = None

    def as_json(self) -> dict[str, Any]:
        return {"action": self.action, "name": self.name}


@dataclass(frozen=True, kw_only=True)
class Plan:
    file: str
    models: tuple[ModelChange, ...]
    audiences: tuple[AudienceChange, ...]
    prune: bool = False

    @property
    def pending(self) -> tuple[AudienceChange, ...]:
        return tuple(c for c in self.audiences if c.action not in (UNCHANGED, NOT_IN_FILE))

    def as_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "prune": self.prune,
            "models": [m.as_json() for m in self.models],
            "audiences": [c.as_json() for c in self.audiences],
        }


@dataclass(kw_only=True)
class _Sources:
    """The sources a plan reads, opened once each and closed at the end."""

    settings: Settings
    stack: ExitStack
    opened: dict[str, Source] = field(default_factory=dict)

    def get(self, name: str) -> Source:
        if name not in self.opened:
            source = open_source(self.settings, name)
            self.stack.callback(source.engine.dispose)
            self.opened[name] = source
        return self.opened[name]


def make_plan(
    state: Engine,
    settings: Settings,
    path: str,
    *,
    prune: bool = False,
    adopt: bool = False,
    with_preview: bool = True,
) -> Plan:
    """What ``apply`` would do. Reads the file, the sources and the state database; writes
    nothing. Raises AudienceError (``file:line: where: what``) for a mistake in the file.

    ``adopt``: an entry whose key an audience made by hand (``audience create``) has takes it
    over; without it that is refused. ``prune`` with a file that declares no audiences is
    refused: an empty or truncated file would retire every audience, for ever."""
    loaded = files.load_file(path)
    if prune and not loaded.spec.audiences:
        raise loaded.error(
            (),
            "the file declares no audiences, and --prune would delete every audience there "
            "is; delete audiences one by one with syncer audience delete",
        )
    with ExitStack() as stack:
        sources = _Sources(settings=settings, stack=stack)
        infos = _describe_models(loaded, settings, sources)
        desired = [
            _compile_entry(loaded, index, entry, infos, settings, sources)
            for index, entry in enumerate(loaded.spec.audiences)
        ]
    stored = {view.key: view for view in audiences.list_all(state, include_deleted=True)}
    changes = [
        _compare(loaded, index, want, stored.get(want.key), adopt=adopt)
        for index, want in enumerate(desired)
    ]
    named = {want.key for want in desired}
    for key, view in sorted(stored.items()):
        if key in named or view.status == AUDIENCE_DELETED:
            continue
        action = DELETE if prune else NOT_IN_FILE
        why = "managed by a file" if view.managed else "not managed by a file"
        changes.append(
            AudienceChange(
                action=action,
                key=key,
                name=view.name,
                changes=(why if prune else f"{why}; kept (--prune deletes it)",),
                current=view,
            )
        )
    if with_preview:
        changes = [_with_preview(state, settings, change) for change in changes]
    return Plan(
        file=loaded.shown,
        models=_model_changes(state, infos, prune=prune),
        audiences=tuple(changes),
        prune=prune,
    )


def apply(
    state: Engine, settings: Settings, path: str, *, prune: bool = False, adopt: bool = False
) -> Plan:
    """Make the plan and carry it out in one transaction; returns the plan carried out."""
    plan = make_plan(state, settings, path, prune=prune, adopt=adopt, with_preview=False)
    now = datetime.now(UTC)
    try:
        with write_transaction(state) as conn:
            _store_models(conn, plan.models, now, prune=prune)
            for change in plan.audiences:
                _carry_out(conn, change, now)
    except IntegrityError:
        raise AudienceError(
            "another command created an audience with one of these keys meanwhile; "
            "nothing was applied: run syncer plan again"
        ) from None
    for change in plan.pending:
        logger.info("apply: %s %s", change.action, change.key)
    return plan


def preview_entry(
    state: Engine, settings: Settings, path: str, name: str, *, sample_size: int
) -> Any:
    """``audience preview --file FILE --name NAME``: one entry of the file (by its name or its
    key), compiled as ``apply`` would, previewed against the stored audience of its key (if
    there is one). Writes nothing."""
    from syncer.preview import preview

    loaded = files.load_file(path)
    wanted = " ".join(name.split())
    found = [
        index
        for index, entry in enumerate(loaded.spec.audiences)
        if wanted in (entry.name, files.entry_key(entry))
    ]
    if not found:
        names = ", ".join(entry.name for entry in loaded.spec.audiences[:10]) or "none"
        raise AudienceError(f"{loaded.shown}: no audience named {name!r} (audiences: {names})")
    index = found[0]
    with ExitStack() as stack:
        sources = _Sources(settings=settings, stack=stack)
        infos = _describe_models(loaded, settings, sources)
        want = _compile_entry(loaded, index, loaded.spec.audiences[index], infos, settings, sources)
    stored = {view.key: view for view in audiences.list_all(state)}
    return preview(
        state,
        settings,
        sql=want.sql,
        params=want.params,
        source_name=want.source,
        audience=stored.get(want.key),
        sample_size=sample_size,
    )


# --- reading the file against the sources ------------------------------------------------------


def _describe_models(
    loaded: files.LoadedFile, settings: Settings, sources: _Sources
) -> dict[str, rules.ModelInfo]:
    infos: dict[str, rules.ModelInfo] = {}
    for name, spec in loaded.spec.models.items():
        where = ("models", name)
        if spec.source not in settings.sources:
            known = ", ".join(sorted(settings.sources))
            raise loaded.error(
                (*where, "source"),
                f"unknown source {spec.source!r}; add [sources.{spec.source}] to "
                f"settings.toml (known: {known})",
            )
        source = sources.get(spec.source)
        try:
            with source.engine.connect() as conn:
                if spec.table is not None:
                    # The catalog, read by syncer itself (SQLite's fence would refuse its
                    # PRAGMAs); what the compiled query may read is checked when it runs,
                    # fenced, below (check_definition).
                    infos[name] = rules.describe_model(conn, name, spec)
                else:
                    with fenced(conn, source) as reader:
                        infos[name] = rules.describe_model(reader.conn, name, spec)
        except rules.RuleError as exc:
            raise loaded.error((*where, *exc.path), exc.message) from None
        except AudienceError as exc:  # the source may not run audience SQL at all
            raise loaded.error((*where, "source"), str(exc)) from None
        except SQLAlchemyError as exc:  # down, or refusing this login: not the file's mistake
            raise SourceError(
                f"source {spec.source!r} (model {name}) could not be read: {describe_db_error(exc)}"
            ) from None
    return infos


def _compile_entry(
    loaded: files.LoadedFile,
    index: int,
    entry: files.AudienceEntry,
    infos: Mapping[str, rules.ModelInfo],
    settings: Settings,
    sources: _Sources,
) -> Desired:
    where: tuple[str | int, ...] = ("audiences", index)
    key = files.entry_key(entry)
    params: Mapping[str, Any] | None = None
    rules_json: Any = None
    if entry.rules is not None:
        parent_name = loaded.spec.parent_of(entry)
        assert parent_name is not None  # the loader checked the file names it
        parent = infos[parent_name]
        source_name = parent.spec.source
        related = {
            name: info
            for name, info in infos.items()
            if info.spec.is_related and info.spec.source == source_name
        }
        source = sources.get(source_name)
        try:
            query = rules.compile_rules(entry.rules, parent, related)
        except rules.RuleError as exc:
            raise loaded.error((*where, *exc.path), exc.message) from None
        sql, params = rules.compiled_sql(query, source.engine.dialect)
        rules_json = rules.rules_data(entry.rules)
        check_where: tuple[str | int, ...] = (*where, "rules")
    else:
        source_name = loaded.spec.source_of(entry)
        if source_name not in settings.sources:
            known = ", ".join(sorted(settings.sources))
            raise loaded.error(
                (*where, "source"),
                f"unknown source {source_name!r}; add [sources.{source_name}] to "
                f"settings.toml (known: {known})",
            )
        source = sources.get(source_name)
        assert entry.sql is not None  # an entry has rules or sql (the loader checked)
        sql = entry.sql
        check_where = (*where, "sql")
    try:
        sql = check_definition(source, sql, params)
    except AudienceError as exc:
        raise loaded.error(check_where, str(exc)) from None
    schedule, guard = entry.schedule, entry.guard_overrides
    return Desired(
        key=key,
        name=entry.name,
        source=source_name,
        sql=sql,
        params=dict(params) if params else None,
        rules=rules_json,
        every_seconds=schedule.every_seconds,
        cron=schedule.cron,
        paused=entry.paused,
        max_removed_percent=guard.max_removed_percent,
        min_removed=guard.min_removed,
    )


# --- comparing with what is stored -------------------------------------------------------------


def _compare(
    loaded: files.LoadedFile,
    index: int,
    want: Desired,
    have: AudienceView | None,
    *,
    adopt: bool,
) -> AudienceChange:
    if have is None:
        return AudienceChange(action=CREATE, key=want.key, name=want.name, desired=want)
    if have.status == AUDIENCE_DELETED:
        raise loaded.error(
            ("audiences", index, "name"),
            f"the key {want.key!r} belonged to a deleted audience and is never reused; "
            "choose another name, or pin another key with key:",
        )
    changes: list[str] = []
    if have.name != want.name:
        changes.append(f"name: {have.name!r} -> {want.name!r}")
    if have.source != want.source:
        changes.append(f"source: {have.source} -> {want.source}")
    if have.sql != want.sql or (have.params or None) != want.params:
        changes.append("definition (rules)" if want.rules is not None else "definition (sql)")
    elif (have.rules or None) != want.rules:
        changes.append("rules (same SQL)")
    if (have.schedule.every_seconds, have.schedule.cron) != (want.every_seconds, want.cron):
        changes.append(
            f"schedule: {_schedule(have.schedule.every_seconds, have.schedule.cron)}"
            f" -> {_schedule(want.every_seconds, want.cron)}"
        )
    if (have.guard.max_removed_percent, have.guard.min_removed) != (
        want.max_removed_percent,
        want.min_removed,
    ):
        changes.append("guard")
    if not have.managed:
        if not adopt:
            entry = loaded.spec.audiences[index]
            raise loaded.error(
                ("audiences", index, "key" if entry.key is not None else "name"),
                f"audience {want.key!r} exists and was made by hand, not by a file; "
                "--adopt lets this file take it over (its definition and schedule become "
                "the file's), or give the entry another name or key",
            )
        changes.append("managed by this file from now on")
    status_change = None
    if want.paused and have.status == AUDIENCE_ACTIVE:
        status_change = PAUSE
    elif not want.paused and have.status == AUDIENCE_PAUSED:
        status_change = RESUME
    if changes:
        if status_change:
            changes.append(f"then {status_change}")
        action = UPDATE
    else:
        action = status_change or UNCHANGED
    return AudienceChange(
        action=action,
        key=want.key,
        name=want.name,
        changes=tuple(changes),
        desired=want,
        current=have,
    )


def _schedule(every_seconds: int | None, cron: str | None) -> str:
    if cron:
        return f"cron {cron}"
    return f"every {format_duration(every_seconds)}" if every_seconds else "default"


def _with_preview(state: Engine, settings: Settings, change: AudienceChange) -> AudienceChange:
    """Members, entering and leaving for a new or changed definition (nothing written)."""
    want = change.desired
    if want is None or change.action not in (CREATE, UPDATE):
        return change
    have = change.current
    if have is not None and have.sql == want.sql and (have.params or None) == want.params:
        return change
    from syncer.preview import preview

    found = preview(
        state,
        settings,
        sql=want.sql,
        params=want.params,
        source_name=want.source,
        audience=have,
    )
    return AudienceChange(
        action=change.action,
        key=change.key,
        name=change.name,
        changes=change.changes,
        desired=want,
        current=have,
        preview=found,
    )


def _model_changes(
    state: Engine, infos: Mapping[str, rules.ModelInfo], *, prune: bool
) -> tuple[ModelChange, ...]:
    with state.connect() as conn:
        stored = {row.name: row for row in conn.execute(select(AUDIENCE_MODELS)).all()}
    result = []
    for name, info in infos.items():
        row = stored.get(name)
        if row is None:
            action = CREATE
        elif tuple(_model_values(info).values()) == tuple(
            getattr(row, column) for column in _model_values(info)
        ):
            action = UNCHANGED
        else:
            action = UPDATE
        result.append(ModelChange(action=action, name=name, info=info))
    if prune:
        result += [ModelChange(action=DELETE, name=n) for n in sorted(set(stored) - set(infos))]
    return tuple(result)


def _model_values(info: rules.ModelInfo) -> dict[str, Any]:
    spec = info.spec
    return {
        "source_name": spec.source,
        "table_name": spec.table,
        "sql": spec.sql,
        "primary_key": spec.primary_key,
        "foreign_key": spec.foreign_key,
        "timestamp_column": spec.timestamp,
        "columns": json.dumps([[name, str(type_)] for name, type_ in info.columns.items()]),
    }


# --- carrying it out (inside apply's one transaction) ------------------------------------------


def _store_models(
    conn: Connection, models: Sequence[ModelChange], now: datetime, *, prune: bool
) -> None:
    for model in models:
        if model.action == DELETE and prune:
            conn.execute(delete(AUDIENCE_MODELS).where(AUDIENCE_MODELS.c.name == model.name))
        elif model.action in (CREATE, UPDATE):
            assert model.info is not None
            values = {**_model_values(model.info), "updated_at": now}
            if model.action == CREATE:
                conn.execute(insert(AUDIENCE_MODELS).values(name=model.name, **values))
            else:
                conn.execute(
                    update(AUDIENCE_MODELS)
                    .where(AUDIENCE_MODELS.c.name == model.name)
                    .values(**values)
                )


def _carry_out(conn: Connection, change: AudienceChange, now: datetime) -> None:
    if change.action in (UNCHANGED, NOT_IN_FILE):
        return
    if change.action == DELETE:
        assert change.current is not None
        _retire(conn, change.current.id, now)
        return
    want = change.desired
    assert want is not None
    status = AUDIENCE_PAUSED if want.paused else AUDIENCE_ACTIVE
    values: dict[str, Any] = {
        "name": want.name,
        "source_name": want.source,
        "definition_sql": want.sql,
        "definition_params": want.params_json,
        "definition_rules": want.rules_json,
        "every_seconds": want.every_seconds,
        "cron": want.cron,
        "status": status,
        "managed": True,
        "guard_max_removed_percent": want.max_removed_percent,
        "guard_min_removed": want.min_removed,
        "updated_at": now,
    }
    if change.action == CREATE:
        conn.execute(insert(Audience).values(key=want.key, created_at=now, **values))
        return
    conn.execute(
        update(Audience)
        .where(Audience.key == want.key, Audience.status != AUDIENCE_DELETED)
        .values(**values)
    )


def _retire(conn: Connection, audience_id: int, now: datetime) -> None:
    """``--prune``: as ``audience delete`` without --unset: the key is retired for ever and
    what the audience still owed is cancelled."""
    conn.execute(
        update(Audience)
        .where(Audience.id == audience_id)
        .values(status=AUDIENCE_DELETED, deleted_at=now, updated_at=now)
    )
    d = DELIVERIES.c
    conn.execute(
        update(DELIVERIES)
        .where(d.audience_id == audience_id, d.status == DELIVERY_PENDING)
        .values(status=DELIVERY_CANCELLED, last_error="the audience was deleted (apply --prune)")
    )


# --- for people -------------------------------------------------------------------------------

_SIGNS = {CREATE: "+", UPDATE: "~", PAUSE: "~", RESUME: "~", DELETE: "-", UNCHANGED: " "}


def format_plan(plan: Plan, *, applied: bool = False) -> str:
    """``plan`` / ``apply`` as text: one line per audience and what changes, with counts."""
    lines = []
    for model in plan.models:
        if model.action != UNCHANGED:
            lines.append(f"model {model.name}: {model.action}")
    for change in plan.audiences:
        if change.action == UNCHANGED:
            continue
        sign = _SIGNS.get(change.action, "?")
        detail = f" ({'; '.join(change.changes)})" if change.changes else ""
        lines.append(f"{sign} {change.key}: {change.action}{detail}")
        if change.preview is not None:
            p = change.preview
            line = f"    {p.members} members, {p.entering} entering, {p.leaving} leaving"
            if getattr(p, "held", False):
                line += "; the removal guard would hold its next run"
            lines.append(line)
    unchanged = sum(1 for c in plan.audiences if c.action == UNCHANGED)
    pending = len(plan.pending)
    if applied:
        summary = f"applied {plan.file}: {pending} audience changes, {unchanged} unchanged"
    elif pending:
        summary = (
            f"plan for {plan.file}: {pending} audience changes, {unchanged} unchanged; "
            "nothing written (run: syncer apply)"
        )
    else:
        summary = f"plan for {plan.file}: no changes ({unchanged} unchanged)"
    return "\n".join([*lines, summary])
