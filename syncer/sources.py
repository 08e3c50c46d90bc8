"""Source databases: where an audience's SQL runs, read-only and with a time limit.

An audience definition is one SELECT that returns user ids: a single column, or a column
named ``user_id``. It is always run wrapped as a subquery, so it cannot be a write, and on a
source of its own it runs on a read-only connection (SQLite opened read-only, PostgreSQL and
MySQL in a READ ONLY transaction) with a statement timeout.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Connection,
    Engine,
    Integer,
    Subquery,
    Text,
    and_,
    cast,
    column,
    func,
    literal,
    select,
    text,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import Select
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from syncer.db import create_source_engine
from syncer.errors import AudienceError, SourceError
from syncer.models import USER_ID_LENGTH
from syncer.settings import Settings, SourceSettings

USER_ID_COLUMN = "user_id"
_READ_STATEMENT = re.compile(r"^\s*(\(\s*)*(select|with|values)\b", re.IGNORECASE)
_SQLITE_PROGRESS_STEPS = 10_000


@dataclass(frozen=True, kw_only=True)
class Source:
    """A source database as a run sees it."""

    settings: SourceSettings
    engine: Engine
    same_as_state: bool

    @property
    def name(self) -> str:
        return self.settings.name


def open_source(settings: Settings, name: str) -> Source:
    source = settings.source(name)
    same = source.url == settings.database.url
    return Source(
        settings=source,
        engine=create_source_engine(source.url),
        same_as_state=same,
    )


def normalize_sql(sql: str) -> str:
    """Strip whitespace and trailing semicolons; refuse what is not one read statement."""
    cleaned = sql.strip()
    while cleaned.endswith(";"):
        cleaned = cleaned[:-1].rstrip()
    if not cleaned:
        raise AudienceError("the audience SQL is empty; give a SELECT that returns user ids")
    if not _READ_STATEMENT.match(cleaned):
        raise AudienceError(
            "the audience SQL must be one read-only SELECT (or WITH … SELECT) returning user ids"
        )
    return cleaned


@contextmanager
def read_only(
    conn: Connection, timeout_seconds: float, *, commit: bool = False
) -> Iterator[Connection]:
    """Run the block in a read-only transaction with a statement timeout.

    The transaction is rolled back, or committed with ``commit=True``: read-only transactions
    may still fill temporary tables (PostgreSQL and MySQL allow it), which is how a run stages
    ids when the source is the state database itself.
    """
    dialect = conn.dialect.name
    if dialect == "sqlite":
        raw = conn.connection.dbapi_connection
        assert isinstance(raw, sqlite3.Connection)
        deadline = time.monotonic() + timeout_seconds
        raw.set_progress_handler(lambda: int(time.monotonic() > deadline), _SQLITE_PROGRESS_STEPS)
        try:
            with _transaction(conn, commit):
                yield conn
        finally:
            raw.set_progress_handler(None, 0)
        return
    if dialect in ("mysql", "mariadb"):
        conn.exec_driver_sql("SET SESSION TRANSACTION READ ONLY")
        conn.commit()
        try:
            with _transaction(conn, commit):
                conn.exec_driver_sql(f"SET SESSION max_statement_time = {timeout_seconds:.3f}")
                yield conn
        finally:
            conn.exec_driver_sql("SET SESSION max_statement_time = 0")
            conn.exec_driver_sql("SET SESSION TRANSACTION READ WRITE")
            conn.commit()
        return
    with _transaction(conn, commit):
        if dialect == "postgresql":
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(timeout_seconds * 1000)}")
        yield conn


@contextmanager
def _transaction(conn: Connection, commit: bool) -> Iterator[None]:
    with conn.begin() as tx:
        yield
        if not commit:
            tx.rollback()


def id_column(conn: Connection, sql: str) -> str:
    """The column that holds user ids: the only one, or the one named ``user_id``.

    Every statement that embeds audience SQL carries a bound parameter: drivers send
    parameterless statements as simple queries, which PostgreSQL runs even when they hold
    several statements (``…) x; COMMIT; DELETE …``); with a parameter, it refuses them.
    """
    result = conn.execute(text(f"SELECT * FROM ({sql}) AS audience_query LIMIT :none"), {"none": 0})
    names = list(result.keys())
    result.close()
    if len(names) == 1:
        return str(names[0])
    lowered = {name.lower(): name for name in names}
    if USER_ID_COLUMN in lowered:
        return str(lowered[USER_ID_COLUMN])
    raise AudienceError(
        f"the audience SQL returns {len(names)} columns ({', '.join(names)}); "
        "return one column of user ids, or name the id column user_id"
    )


@dataclass(frozen=True, kw_only=True)
class MemberQuery:
    """A definition wrapped as a subquery, and the pieces a run selects from it."""

    rows: Subquery
    id: ColumnElement[Any]
    user_id: ColumnElement[str]  # the id as text
    valid: ColumnElement[bool]
    members: Select[str]
    raw: Select[Any]  # the ids as the source returns them, for streaming


def member_query(sql: str, id_name: str) -> MemberQuery:
    """The user ids of a definition as text; NULL, blank and over-long ids are not valid.

    Blank means nothing but spaces, tabs and line breaks (see ``is_valid_id``, its twin for ids
    streamed through Python).
    """
    rows = text(sql).columns(column(id_name)).subquery("audience_query")
    user_id = cast(rows.c[id_name], Text)
    valid = and_(
        rows.c[id_name].is_not(None),
        _NotBlank(user_id),
        _Characters(user_id) <= USER_ID_LENGTH,
    )
    return MemberQuery(
        rows=rows,
        id=rows.c[id_name],
        user_id=user_id,
        valid=valid,
        members=select(user_id.label(USER_ID_COLUMN)).where(valid),
        raw=select(rows.c[id_name]).where(_ONE_STATEMENT),
    )


BLANK_CHARACTERS = " \t\r\n"


class _NotBlank(FunctionElement[bool]):
    """True when the id holds a character other than BLANK_CHARACTERS."""

    type = Boolean()
    inherit_cache = True
    # A condition in its own right: never rendered ``(…) = 1`` on SQLite, which would compute
    # the OR inside as a value (both sides, every row) instead of stopping at the first.
    _is_implicitly_boolean = True


@compiles(_NotBlank)
def _not_blank_portable(element: _NotBlank, compiler: SQLCompiler, **kw: Any) -> str:
    spaced = func.replace(
        func.replace(func.replace(*element.clauses, "\t", " "), "\n", " "), "\r", " "
    )
    return compiler.process(func.trim(spaced) != "", **kw)


@compiles(_NotBlank, "sqlite")
@compiles(_NotBlank, "postgresql")
def _not_blank_trim(element: _NotBlank, compiler: SQLCompiler, **kw: Any) -> str:
    """``trim(id, ' \t\r\n')`` is not empty, decided without calling trim for the ids whose
    first byte sorts after every blank character (all of them but a rare few): in byte order
    (BINARY on SQLite, "C" on PostgreSQL), an id at or above ``'!'`` starts with such a byte.
    The byte comparison is several times cheaper than trim on a million rows."""
    (value,) = element.clauses
    byte_order = "BINARY" if compiler.dialect.name == "sqlite" else '"C"'
    text_id = compiler.process(value, **kw)
    trimmed = compiler.process(func.trim(value, literal(BLANK_CHARACTERS)), **kw)
    return f"({text_id} COLLATE {byte_order} >= '!' OR {trimmed} != '')"


class _Characters(FunctionElement[int]):
    """The id's length in characters: ``length`` (MySQL's counts bytes: ``char_length``)."""

    type = Integer()
    inherit_cache = True


@compiles(_Characters)
def _characters(element: _Characters, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(func.length(*element.clauses), **kw)


@compiles(_Characters, "mysql")
@compiles(_Characters, "mariadb")
def _characters_mysql(element: _Characters, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(func.char_length(*element.clauses), **kw)


# A bound parameter (see id_column): it keeps the driver from running several statements.
_ONE_STATEMENT = literal(1) == literal(1)


def is_valid_id(user_id: str) -> bool:
    """The Python side of ``member_query``'s ``valid``, for ids streamed from another database."""
    return bool(user_id.strip(BLANK_CHARACTERS)) and len(user_id) <= USER_ID_LENGTH


def check_definition(source: Source, sql: str) -> str:
    """Run the definition on its source, read-only, and return it normalized.

    Raises AudienceError naming the problem when it fails, writes, or returns no id column.
    """
    sql = normalize_sql(sql)
    try:
        with (
            source.engine.connect() as conn,
            read_only(conn, source.settings.query_timeout_seconds),
        ):
            id_name = id_column(conn, sql)
            conn.execute(member_query(sql, id_name).members.limit(5)).fetchall()
    except AudienceError:
        raise
    except SQLAlchemyError as exc:
        raise AudienceError(
            f"the audience SQL failed on source {source.name!r}: {describe_db_error(exc)}"
        ) from None
    return sql


def describe_db_error(exc: BaseException) -> str:
    """The database's own one-line message, without SQLAlchemy's noise or bound values."""
    orig = getattr(exc, "orig", None) or exc
    message = str(orig).strip()
    if "interrupted" in message.lower() and isinstance(orig, sqlite3.OperationalError):
        return "the query ran past the source's query_timeout_seconds"
    return message.splitlines()[0] if message else type(orig).__name__


def run_error(source: Source, exc: Exception) -> SourceError:
    return SourceError(
        f"the audience query failed on source {source.name!r}: {describe_db_error(exc)}"
    )
