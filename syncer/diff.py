"""Staging and the SQL diff: the new snapshot against current membership, never in Python.

All of it runs on one state-database connection, because the staged ids and the computed
changes live in temporary tables of that connection:

- ``syncer_staged(user_id)``: this run's members, one row each (duplicates collapse);
- ``syncer_changes(user_id, entered)``: who entered (true) and who left (false).

``commit_snapshot`` then records the new snapshot, the changes and the outbox in one
transaction.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    ColumnElement,
    CompoundSelect,
    Connection,
    Integer,
    MetaData,
    Select,
    Table,
    and_,
    case,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    literal_column,
    select,
    true,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from syncer import privacy
from syncer.dialects import Deadline
from syncer.models import (
    DELIVERIES,
    DELIVERY_CANCELLED,
    DELIVERY_PENDING,
    DELIVERY_SENT,
    DELIVERY_SUPERSEDED,
    KIND_IDENTIFY,
    MEMBERSHIPS,
    MYSQL,
    USER_ID_LENGTH,
    Audience,
    AudienceDestination,
    SyncRun,
    exact_string,
    owed,
)
from syncer.sources import (
    Params,
    Source,
    drop_definer_function,
    fenced,
    id_text,
    is_valid_id,
    normalize_sql,
    run_error,
)

logger = logging.getLogger(__name__)

STREAM_BATCH = 10_000

_temp = MetaData()
STAGED = Table(
    "syncer_staged",
    _temp,
    Column("user_id", exact_string(USER_ID_LENGTH), primary_key=True),
    prefixes=["TEMPORARY"],
    sqlite_with_rowid=False,
)
# PostgreSQL loads ``syncer_staged`` as a plain heap and adds the primary key afterwards: a
# B-tree built once from all the ids is several times faster than one grown row by row.
STAGED_HEAP = Table(
    "syncer_staged",
    MetaData(),
    Column("user_id", exact_string(USER_ID_LENGTH), nullable=False),
    prefixes=["TEMPORARY"],
)
CHANGES = Table(
    "syncer_changes",
    _temp,
    Column("user_id", exact_string(USER_ID_LENGTH), primary_key=True),
    Column("entered", Boolean(create_constraint=False), nullable=False),
    prefixes=["TEMPORARY"],
    sqlite_with_rowid=False,
)
M = MEMBERSHIPS
D = DELIVERIES


@dataclass(frozen=True, kw_only=True)
class Staged:
    members: int
    skipped: int


@dataclass(frozen=True, kw_only=True)
class Diff:
    added: int
    removed: int
    suppressed: int = 0  # deleted users the source still returns: never synced in
    deletions_seen: int = 0  # the newest user deletion this diff accounted for


@dataclass(frozen=True, kw_only=True)
class Loaded:
    rows: int  # rows written to syncer_staged (on PostgreSQL before duplicates collapse)
    skipped: int  # NULL, blank or over-long ids left out


COUNT_ROWS: Any = {"preserve_rowcount": True}  # the driver's row count, even for an INSERT
SKIP_SEQUENCE = "syncer_skipped"  # PostgreSQL: counts the rows an in-place staging skips


def reset_temp_tables(conn: Connection) -> None:
    with conn.begin():
        for table in (CHANGES, STAGED):
            table.drop(conn, checkfirst=True)
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"DROP SEQUENCE IF EXISTS {SKIP_SEQUENCE}")
            drop_definer_function(conn)


def discard(conn: Connection, after: str) -> None:
    """After a failure (or a preview): roll back what the connection was doing (on PostgreSQL
    a failed statement poisons its transaction) and drop its temporary tables. If even that
    fails, the connection is thrown away instead of going back to the pool: the next user of
    the pool must get a clean one, and the failure reported is the first one."""
    try:
        conn.rollback()
        reset_temp_tables(conn)
    except Exception as exc:
        logger.warning("discarding a state database connection after %s: %s", after, exc)
        conn.invalidate()


def stage(conn: Connection, source: Source | None, sql: str, params: Params = None) -> Staged:
    """Evaluate the definition on its source and load the ids into ``syncer_staged``.

    Without a source the audience is being retired: its new snapshot is empty. ``params``:
    the bound values of SQL compiled from rules.
    """
    if source is not None:
        sql = normalize_sql(sql, source.dialect)  # again: it may predate the check
    reset_temp_tables(conn)
    dialect = conn.dialect.name
    with conn.begin():
        (STAGED_HEAP if dialect == "postgresql" else STAGED).create(conn)
    if source is None:
        loaded = Loaded(rows=0, skipped=0)
    elif source.same_as_state:
        loaded = _stage_in_place(conn, source, sql, params)
    else:
        loaded = _stage_streamed(conn, source, sql, params)
    members = loaded.rows
    if dialect == "postgresql":
        members -= _key_postgres_stage(conn)
    elif dialect != "sqlite":  # MySQL: INSERT IGNORE's row counts are not to be trusted
        with conn.begin():
            members = conn.execute(select(func.count()).select_from(STAGED)).scalar_one()
    return Staged(members=int(members), skipped=loaded.skipped)


def _key_postgres_stage(conn: Connection) -> int:
    """Give the heap-loaded ``syncer_staged`` its primary key (collapsing duplicate ids first,
    the rare case) and statistics for the anti-joins. Returns how many duplicates it dropped."""
    add_key = "ALTER TABLE syncer_staged ADD PRIMARY KEY (user_id)"
    duplicates = 0
    with conn.begin():
        try:
            with conn.begin_nested():
                conn.exec_driver_sql(add_key)
        except IntegrityError:
            duplicates = conn.exec_driver_sql(
                "DELETE FROM syncer_staged a USING syncer_staged b "
                "WHERE a.user_id = b.user_id AND a.ctid > b.ctid"
            ).rowcount
            conn.exec_driver_sql(add_key)
        conn.exec_driver_sql("ANALYZE syncer_staged")
    return duplicates


def _stage_in_place(conn: Connection, source: Source, sql: str, params: Params) -> Loaded:
    """Source and state are one database: ``INSERT … SELECT``, no round trip through Python.

    The rows left out are counted in the same scan where the database allows it (SQLite,
    PostgreSQL): the load keeps ``CASE WHEN valid THEN true ELSE <count one; false> END``,
    whose ELSE branch runs for the invalid rows alone."""
    try:
        with (
            _skip_counter(conn) as counter,
            fenced(conn, source, commit=True, staging=True) as reader,
        ):
            query = reader.member_query(sql, reader.id_column(sql, params), params)
            keep = query.valid
            if counter is not None:
                keep = case((query.valid, true()), else_=counter.condition)
            members = select(query.user_id.label("user_id")).where(keep)
            if conn.dialect.name == "sqlite":
                # The primary key collapses duplicates: no sort for DISTINCT first.
                load = insert(STAGED).prefix_with("OR IGNORE").from_select(["user_id"], members)
            elif conn.dialect.name == "postgresql":  # the heap; duplicates go with the key
                load = insert(STAGED).from_select(["user_id"], members)
            else:  # MySQL. DISTINCT would follow the source column's collation (often case-blind).
                load = insert(STAGED).prefix_with("IGNORE").from_select(["user_id"], members)
            rows = conn.execute(load, execution_options=COUNT_ROWS).rowcount
            if counter is None:
                skipped = conn.execute(
                    select(func.count()).select_from(query.rows).where(~query.valid)
                ).scalar_one()
            else:
                skipped = counter.counted()
    except SQLAlchemyError as exc:
        raise run_error(source, exc) from None
    return Loaded(rows=rows, skipped=int(skipped))


@dataclass(frozen=True, kw_only=True)
class _SkipCounter:
    condition: ColumnElement[bool]  # always false; counts each row it is evaluated for
    counted: Callable[[], int]


_SQLITE_SKIP_FUNCTION = "syncer_skipped_id"


@contextlib.contextmanager
def _skip_counter(conn: Connection) -> Iterator[_SkipCounter | None]:
    """A counting condition, or None where the database offers none (MySQL: a second scan
    counts). SQLite: a function of this connection, calling back into Python for the invalid
    rows only. PostgreSQL: ``nextval`` of a temporary sequence (allowed in a read-only
    transaction; created before it, which may not create one; dropped by
    ``reset_temp_tables``)."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        with conn.begin():
            conn.exec_driver_sql(f"CREATE TEMPORARY SEQUENCE {SKIP_SEQUENCE}")

        def sequence_value() -> int:
            last, called = conn.exec_driver_sql(
                f"SELECT last_value, is_called FROM {SKIP_SEQUENCE}"
            ).one()
            return int(last) if called else 0

        condition = literal_column(f"nextval('{SKIP_SEQUENCE}')", Integer) < 0
        yield _SkipCounter(condition=condition, counted=sequence_value)
        return
    if dialect != "sqlite":
        yield None
        return
    raw = conn.connection.dbapi_connection
    assert isinstance(raw, sqlite3.Connection)
    skipped = [0]

    def count_one() -> int:
        skipped[0] += 1
        return 0

    raw.create_function(_SQLITE_SKIP_FUNCTION, 0, count_one)  # not deterministic: never hoisted
    try:
        yield _SkipCounter(
            condition=getattr(func, _SQLITE_SKIP_FUNCTION)() != 0, counted=lambda: skipped[0]
        )
    finally:
        raw.create_function(_SQLITE_SKIP_FUNCTION, 0, None)


def _stage_streamed(conn: Connection, source: Source, sql: str, params: Params) -> Loaded:
    """Different databases: stream ids from the source in batches into the state database.

    Rows come straight from the driver's cursor (``fetchmany``: plain tuples, no result-row
    objects) and go to the state database in one transaction."""
    skipped = 0
    try:
        with source.engine.connect() as src, fenced(src, source) as reader:
            query = reader.member_query(sql, reader.id_column(sql, params), params)
            with (
                _driver_cursor(src, query.raw, reader.deadline) as cursor,
                conn.begin(),
                _bulk_load(conn) as load,
            ):
                while batch := cursor.fetchmany(STREAM_BATCH):
                    reader.check_deadline()
                    good, bad = _valid_rows(batch)
                    skipped += bad
                    if good:
                        load.add(good)
    except SQLAlchemyError as exc:
        raise run_error(source, exc) from None
    except source.engine.dialect.loaded_dbapi.Error as exc:  # from the driver's own cursor
        raise run_error(source, exc) from None
    return Loaded(rows=load.rows, skipped=skipped)


@contextlib.contextmanager
def _driver_cursor(
    src: Connection, query: Select[Any], deadline: Deadline | None = None
) -> Iterator[Any]:
    """The query's rows straight from the driver, arriving as they are fetched."""
    compiled = query.compile(dialect=src.dialect)
    params: Any = compiled.params
    if compiled.positiontup is not None:
        params = tuple(compiled.params[name] for name in compiled.positiontup)
    raw: Any = src.connection.dbapi_connection
    # Server-side cursors where the driver buffers everything otherwise; fetchmany() sets how
    # many rows each round trip brings.
    if src.dialect.name == "postgresql":
        cursor = raw.cursor(name="syncer_source")
    elif src.dialect.name in MYSQL:
        cursor = raw.cursor(src.dialect.loaded_dbapi.cursors.SSCursor)
    elif src.dialect.name in ("sqlite", "duckdb"):
        cursor = raw.cursor()  # both stream from the cursor as it is read
    else:
        # Any other dialect: SQLAlchemy executes it, as the dialect needs (its own parameter
        # handling), with a server-side cursor where the dialect has one.
        result = src.execution_options(stream_results=True).execute(query)
        cancel = getattr(result.cursor, "cancel", None)
        if deadline is not None and callable(cancel):
            deadline.cancellers.append(cancel)
        try:
            yield _Tuples(result)
        finally:
            result.close()
        return
    try:
        cursor.execute(str(compiled), params)
        yield cursor
    finally:
        cursor.close()


class _Tuples:
    """A SQLAlchemy result read as a driver's cursor: ``fetchmany`` gives plain tuples."""

    def __init__(self, result: Any) -> None:
        self._result = result

    def fetchmany(self, size: int) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self._result.fetchmany(size)]


def _valid_rows(batch: Sequence[Any]) -> tuple[Sequence[tuple[str]], int]:
    """The rows whose id is valid, as ``(id,)`` text tuples, and how many were not.

    The usual batch is checked whole, at C speed, and its tuples kept as the driver made them:
    when the smallest id sorts at or after ``"!"`` no id is empty or starts with a blank
    character (all of them sort before it), so none is blank; with the longest id short enough,
    every id is valid (and none holds a NUL, which PostgreSQL text cannot store). Otherwise
    (NULL, numeric or bytes ids raise TypeError on the way) each id is
    checked by ``is_valid_id``; bytes are their UTF-8 text (``id_text``), or not valid."""
    ids = [row[0] for row in batch]
    try:
        if min(ids) >= "!" and max(map(len, ids)) <= USER_ID_LENGTH and "\x00" not in "".join(ids):
            return batch, 0
    except TypeError:
        pass
    good = [
        (user_id,)
        for value in ids
        if (user_id := id_text(value)) is not None and is_valid_id(user_id)
    ]
    return good, len(batch) - len(good)


_COPY_ESCAPED = re.compile(r"[\\\t\r]")  # and line breaks: see _plain_copy_block


def _plain_copy_block(rows: Sequence[tuple[str]]) -> str | None:
    """The rows as COPY text lines, or None if an id holds a character that format escapes
    (a backslash, tab or line break)."""
    block = "\n".join([row[0] for row in rows])
    if block.count("\n") != len(rows) - 1 or _COPY_ESCAPED.search(block):
        return None
    return block + "\n"


class _Load:
    """Rows going into ``syncer_staged``: ``add`` a batch; ``rows`` written once it is done."""

    def __init__(self, add: Callable[[Sequence[tuple[str]]], int | None]) -> None:
        self._add = add  # returns how many rows it wrote, or None when the count comes later
        self.rows = 0

    def add(self, rows: Sequence[tuple[str]]) -> None:
        self.rows += self._add(rows) or 0


@contextlib.contextmanager
def _bulk_load(conn: Connection) -> Iterator[_Load]:
    """Bulk-load ``(id,)`` rows into ``syncer_staged`` the fastest way the state database
    allows. PostgreSQL: one COPY for the whole stream, into the heap (keyed afterwards).
    SQLite: ``INSERT OR IGNORE`` per batch. MySQL: ``INSERT IGNORE`` per batch (its row count
    is not kept: ``stage`` counts the table)."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        raw: Any = conn.connection.dbapi_connection
        with raw.cursor() as cursor:
            with cursor.copy("COPY syncer_staged (user_id) FROM STDIN") as copy:

                def copy_rows(rows: Sequence[tuple[str]]) -> None:
                    block = _plain_copy_block(rows)
                    if block is None:  # rare: ids COPY's text format must escape
                        for row in rows:
                            copy.write_row(row)
                    else:
                        copy.write(block)

                load = _Load(copy_rows)
                yield load
            load.rows = int(cursor.rowcount)
    elif dialect == "sqlite":
        sql = "INSERT OR IGNORE INTO syncer_staged (user_id) VALUES (?)"
        yield _Load(lambda rows: conn.exec_driver_sql(sql, rows, COUNT_ROWS).rowcount)
    else:
        insert_ignore = insert(STAGED).prefix_with("IGNORE")

        def insert_rows(rows: Sequence[tuple[str]]) -> None:
            conn.execute(insert_ignore, [{"user_id": row[0]} for row in rows])

        yield _Load(insert_rows)


def current_members(audience_id: int) -> ColumnElement[bool]:
    return and_(M.c.audience_id == audience_id, M.c.exited_run_id.is_(None))


def compute(conn: Connection, audience_id: int) -> Diff:
    """Anti-joins both ways into ``syncer_changes``."""
    with conn.begin():
        CHANGES.create(conn)
        current = select(M.c.user_id).where(current_members(audience_id))
        staged = select(STAGED.c.user_id)
        entered: Select[Any] | CompoundSelect[Any]
        left: Select[Any] | CompoundSelect[Any]
        if conn.dialect.name == "sqlite":
            entered, left = _merged_differences(staged, current)
        else:
            is_member = exists().where(
                current_members(audience_id), M.c.user_id == STAGED.c.user_id
            )
            entered = staged.where(~is_member)
            left = current.where(~exists().where(STAGED.c.user_id == M.c.user_id))
        for ids, value in ((entered, true()), (left, false())):
            found = ids.subquery()
            conn.execute(
                insert(CHANGES).from_select(["user_id", "entered"], select(found.c.user_id, value))
            )
        seen = privacy.latest_deletion(conn)
        # Deleted users are purged from memberships, so they can only show up as entering.
        suppressed = _drop_deleted_users(conn, privacy.suppressed_hashes(conn), entering_only=True)
        return _counted(conn, suppressed=suppressed, deletions_seen=seen)


def _merged_differences(
    staged: Select[Any], current: Select[Any]
) -> tuple[CompoundSelect[Any], CompoundSelect[Any]]:
    """SQLite: ``EXCEPT`` both ways, ordered by user id. SQLite has no merge join (an anti-join
    looks every id up in the other B-tree: ~0.7 s a million against ``memberships``), but it
    merges a compound SELECT whose ORDER BY both sides' indexes already give (``syncer_staged``
    by its key, the current members by the ``exited_run_id`` index): ~0.15 s a million, each
    way. Neither side holds a user twice (the staged key; one open stay per user)."""
    return (
        staged.except_(current).order_by("user_id"),
        current.except_(staged).order_by("user_id"),
    )


def _counted(conn: Connection, *, suppressed: int, deletions_seen: int) -> Diff:
    counts: dict[bool, int] = dict(
        conn.execute(select(CHANGES.c.entered, func.count()).group_by(CHANGES.c.entered)).all()
    )
    return Diff(
        added=int(counts.get(True, 0)),
        removed=int(counts.get(False, 0)),
        suppressed=suppressed,
        deletions_seen=deletions_seen,
    )


def _drop_deleted_users(conn: Connection, hashes: set[str], *, entering_only: bool) -> int:
    """Drop changes of deleted users: hash the ids in batches (deletions keep only hashes)."""
    if not hashes:
        return 0
    salt_value = privacy.salt_of(conn)
    query = select(CHANGES.c.user_id, CHANGES.c.entered)
    if entering_only:
        query = query.where(CHANGES.c.entered == true())
    rows = conn.execute(query, execution_options={"yield_per": STREAM_BATCH})
    dropped = [
        (user_id, entered)
        for user_id, entered in rows
        if privacy.user_hash(salt_value, user_id) in hashes
    ]
    ids = [user_id for user_id, _ in dropped]
    for start in range(0, len(ids), 500):
        conn.execute(delete(CHANGES).where(CHANGES.c.user_id.in_(ids[start : start + 500])))
    return sum(1 for _, entered in dropped if entered)


def _recheck_deletions(conn: Connection, diff: Diff) -> Diff:
    """A user deleted while this run was diffing must not be stored or sent now: the
    deletion and this commit are serialized (``privacy.lock_deletions``), so whatever was
    deleted after the diff is dropped here, on whichever side of the change it stands."""
    privacy.lock_deletions(conn)
    latest = privacy.latest_deletion(conn)
    if latest <= diff.deletions_seen:
        return diff
    late = privacy.suppressed_hashes(conn, after_id=diff.deletions_seen)
    dropped = _drop_deleted_users(conn, late, entering_only=False)
    return _counted(conn, suppressed=diff.suppressed + dropped, deletions_seen=latest)


def commit_snapshot(
    conn: Connection,
    *,
    audience_id: int,
    run_id: int,
    destination_ids: list[int],
    staged: Staged,
    diff: Diff,
    approval: datetime | None = None,
) -> Diff:
    """One transaction: the new snapshot, the run's changes, and the outbox.

    Destinations that already hold the audience get the changes; destinations that never got
    it (a new audience, or a URL added to settings) get its full current membership.
    ``approval``: the audience's removal approval this run saw, used up by this commit (an
    approval given after it was read stays for the next run).
    """
    now = datetime.now(UTC)
    dialect = conn.dialect.name
    opts = {"sqlite_begin": "IMMEDIATE"} if dialect == "sqlite" else {}
    conn.execution_options(**opts)
    with conn.begin():
        diff = _recheck_deletions(conn, diff)
        if approval is not None:
            conn.execute(
                update(Audience)
                .where(Audience.id == audience_id, Audience.removal_approved_at == approval)
                .values(removal_approved_at=None)
            )
        known = set(
            conn.execute(
                select(AudienceDestination.destination_id).where(
                    AudienceDestination.audience_id == audience_id
                )
            ).scalars()
        )
        existing = [d for d in destination_ids if d in known]
        new = [d for d in destination_ids if d not in known]
        dropped = sorted(known - set(destination_ids))
        if dropped:
            _forget_destinations(conn, audience_id, dropped)

        left = select(CHANGES.c.user_id).where(CHANGES.c.entered == false())
        conn.execute(
            update(M)
            .where(
                M.c.audience_id == audience_id,
                M.c.exited_run_id.is_(None),
                M.c.user_id.in_(left.scalar_subquery()),
            )
            .values(exited_run_id=run_id)
        )
        conn.execute(
            insert(M).from_select(
                ["audience_id", "user_id", "entered_run_id"],
                select(literal(audience_id), CHANGES.c.user_id, literal(run_id)).where(
                    CHANGES.c.entered == true()
                ),
            )
        )
        if diff.added + diff.removed and existing and _has_pending(conn, audience_id):
            # Last value wins: an older undelivered change is never sent after this one.
            conn.execute(
                update(D)
                .where(
                    D.c.status == DELIVERY_PENDING,
                    D.c.audience_id == audience_id,
                    D.c.user_id.in_(select(CHANGES.c.user_id).scalar_subquery()),
                )
                .values(status=DELIVERY_SUPERSEDED)
            )
        for destination_id in existing:
            _enqueue(
                conn,
                select(CHANGES.c.user_id, CHANGES.c.entered),
                audience_id=audience_id,
                run_id=run_id,
                destination_id=destination_id,
                now=now,
            )
        for destination_id in new:
            for backfill in (
                select(M.c.user_id, true()).where(
                    M.c.audience_id == audience_id, M.c.exited_run_id.is_(None)
                ),
                _stale_members(audience_id, destination_id),
            ):
                _enqueue(
                    conn,
                    backfill,
                    audience_id=audience_id,
                    run_id=run_id,
                    destination_id=destination_id,
                    now=now,
                )
            conn.execute(
                insert(AudienceDestination).values(
                    audience_id=audience_id, destination_id=destination_id, since_run_id=run_id
                )
            )
        conn.execute(
            update(SyncRun)
            .where(SyncRun.id == run_id)
            .values(
                members=staged.members - diff.suppressed,
                added=diff.added,
                removed=diff.removed,
                skipped_ids=staged.skipped + diff.suppressed,
                # The transaction's last statement: the time of its commit, give or take the
                # commit itself (``now``, its start, is minutes earlier for a large backfill).
                committed_at=datetime.now(UTC),
            )
        )
    conn.execution_options(sqlite_begin="")
    return diff


def pending_approval(conn: Connection, audience_id: int) -> datetime | None:
    """When ``audience approve`` let the audience's next run through the guard, if it did."""
    approved: datetime | None = conn.execute(
        select(Audience.removal_approved_at).where(Audience.id == audience_id)
    ).scalar()
    return approved


def _forget_destinations(conn: Connection, audience_id: int, dropped: list[int]) -> None:
    """URLs no longer in settings: what they were owed is cancelled, and should one come back
    it is given the audience anew (a backfill), as any new URL is."""
    conn.execute(update(D).where(owed(audience_id, dropped)).values(status=DELIVERY_CANCELLED))
    conn.execute(
        delete(AudienceDestination).where(
            AudienceDestination.audience_id == audience_id,
            AudienceDestination.destination_id.in_(dropped),
        )
    )


def _stale_members(audience_id: int, destination_id: int) -> Select[tuple[str, bool]]:
    """Users a returning URL was last told were members and who have left since: false."""
    last_sent = (
        select(func.max(D.c.id).label("id"))
        .where(
            D.c.status == DELIVERY_SENT,
            D.c.audience_id == audience_id,
            D.c.destination_id == destination_id,
        )
        .group_by(D.c.user_id)
        .subquery()
    )
    is_member = exists().where(
        M.c.audience_id == audience_id,
        M.c.user_id == D.c.user_id,
        M.c.exited_run_id.is_(None),
    )
    return (
        select(D.c.user_id, false())
        .select_from(D.join(last_sent, D.c.id == last_sent.c.id))
        .where(
            D.c.trait_value == true(),
            ~is_member,
            ~D.c.user_id.startswith(privacy.HASHED_PREFIX),  # deleted users: told already
        )
    )


def _has_pending(conn: Connection, audience_id: int) -> bool:
    return (
        conn.execute(
            select(D.c.id)
            .where(D.c.status == DELIVERY_PENDING, D.c.audience_id == audience_id)
            .limit(1)
        ).first()
        is not None
    )


def _enqueue(
    conn: Connection,
    changes: Select[tuple[str, bool]],
    *,
    audience_id: int,
    run_id: int,
    destination_id: int,
    now: datetime,
) -> None:
    """Queue one identify per (user, value) row of ``changes`` for one destination."""
    sub = changes.subquery()
    user_col, value_col = list(sub.c)
    conn.execute(
        insert(D).from_select(
            [
                "run_id",
                "audience_id",
                "destination_id",
                "user_id",
                "kind",
                "trait_value",
                "status",
                "attempts",
                "created_at",
                "owed_since",
                "next_attempt_at",
            ],
            select(
                literal(run_id),
                literal(audience_id),
                literal(destination_id),
                user_col,
                literal(KIND_IDENTIFY),
                value_col,
                literal(DELIVERY_PENDING),
                literal(0),
                literal(now, D.c.created_at.type),
                literal(now, D.c.owed_since.type),
                literal(now, D.c.next_attempt_at.type),
            ).select_from(sub),
        )
    )
