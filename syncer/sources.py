"""Source databases: where an audience's SQL runs, read-only, with a time limit, fenced.

An audience definition is one query that returns user ids: a single column, or a column named
``user_id``. It is parsed first (``syncer.audience_sql``: one query, nothing that writes or
changes the session), then always run wrapped as a subquery inside ``fenced``:

- a read-only transaction (SQLite opened read-only, PostgreSQL and MySQL ``READ ONLY``) with a
  statement timeout;
- SQLite: an authorizer on the connection while the audience SQL is prepared, which allows
  reading data tables only: never syncer's own tables (the state database may be the source),
  ``sqlite_*`` tables, ``ATTACH``, pragmas, or any write but syncer's own staging insert; and
  a bound on one value (``SQLITE_VALUE_LIMIT``), so that one function call cannot outrun the
  timeout;
- PostgreSQL: the role the SQL runs as is checked first (one query): a superuser, a member of
  ``pg_write_server_files`` / ``pg_execute_server_program`` / ``pg_read_server_files`` /
  ``pg_signal_backend`` (NOINHERIT too: the SQL could SET ROLE), a role
  that can use ``dblink``, a foreign server or the server-side file functions is refused unless
  ``[sources.NAME] allow_privileged_role = true``; so is a role that can read syncer's own
  tables. With ``[sources.NAME] read_role`` the SQL runs inside a ``SECURITY DEFINER``
  function owned by that role (``pg_temp.syncer_audience_ids``): unlike ``SET ROLE``, which the
  SQL itself could undo (``set_config('role', 'none', true)`` inside ``query_to_xml``), a
  security-definer context refuses any change of role. The function rolls back what the SQL
  wrote (large objects, ``pg_notify``, settings: a read-only transaction allows them) once it
  has its rows; after the SQL, ``RESET ALL`` and ``pg_advisory_unlock_all()``;
- MySQL/MariaDB: a source that is the state database is refused (a user's privileges cannot be
  narrowed for one query), and so is a user that can see syncer's tables.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
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
    TextClause,
    and_,
    cast,
    column,
    func,
    literal,
    literal_column,
    select,
    text,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import Select
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from syncer.db import create_source_engine
from syncer.dialects import Deadline, announce, client_deadline, is_duckdb_lock_error
from syncer.errors import AudienceError, SourceError
from syncer.models import MYSQL, USER_ID_LENGTH, Base
from syncer.settings import STATE_BACKENDS, Settings, SourceSettings

USER_ID_COLUMN = "user_id"
# The bound values of SQL compiled from rules (``syncer.definitions.rules``), by name; None for
# hand-written SQL, which has none.
Params = Mapping[str, Any] | None
# The dialects fenced by the checks of this module (those that can hold syncer's state too);
# others by ``syncer.dialects``' rules.
_TESTED = frozenset(STATE_BACKENDS)
_SQLITE_PROGRESS_STEPS = 10_000

# Syncer's own tables (and the temporary ones a run stages ids in): never readable by audience SQL.
STAGING_TABLES = frozenset({"syncer_staged", "syncer_changes"})
SYNCER_TABLES = frozenset(Base.metadata.tables) | {"alembic_version"} | STAGING_TABLES
# A database holds syncer's tables when it holds this one.
_MARKER_TABLE = "syncer_settings"


@dataclass(frozen=True, kw_only=True)
class Source:
    """A source database as a run sees it."""

    settings: SourceSettings
    engine: Engine
    same_as_state: bool

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name


def open_source(settings: Settings, name: str) -> Source:
    source = settings.source(name)
    same = source.url == settings.database.url
    return Source(
        settings=source,
        engine=create_source_engine(source),
        same_as_state=same,
    )


def normalize_sql(sql: str, dialect: str) -> str:
    """The audience SQL as syncer stores and embeds it; refuses what is not one read-only query
    (see ``syncer.audience_sql``)."""
    # Imported here: sqlglot is large, and most commands never parse audience SQL.
    from syncer.audience_sql import embeddable

    return embeddable(sql, dialect)


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
    if dialect in MYSQL:
        conn.exec_driver_sql("SET SESSION TRANSACTION READ ONLY")
        conn.commit()
        try:
            with _transaction(conn, commit):
                conn.exec_driver_sql(_mysql_timeout(conn, timeout_seconds))
                yield conn
        finally:
            conn.exec_driver_sql(_mysql_timeout(conn, 0))
            conn.exec_driver_sql("SET SESSION TRANSACTION READ WRITE")
            conn.commit()
        return
    if dialect == "postgresql":
        with _transaction(conn, commit):
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(timeout_seconds * 1000)}")
            yield conn
        return
    # DuckDB (opened read-only) and the warehouses (read-only by their role): the time limit
    # is kept by syncer too (``syncer.dialects``), besides any the database enforces.
    with _transaction(conn, commit):
        yield conn


def _mysql_timeout(conn: Connection, timeout_seconds: float) -> str:
    """MariaDB's statement time limit (seconds, any statement), or MySQL's (milliseconds,
    SELECT statements, which is all audience SQL is); 0 is none."""
    if getattr(conn.dialect, "is_mariadb", False):
        return f"SET SESSION max_statement_time = {timeout_seconds:.3f}"
    return f"SET SESSION max_execution_time = {round(timeout_seconds * 1000)}"


@contextmanager
def _transaction(conn: Connection, commit: bool) -> Iterator[None]:
    with conn.begin() as tx:
        yield
        if not commit:
            tx.rollback()


# --- the fence --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Reader:
    """How audience SQL is run on one fenced connection."""

    conn: Connection
    definer_role: str | None  # PostgreSQL: the SQL runs in a function owned by this role
    deadline: Deadline | None = None  # kept by syncer: checked between batches

    def check_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.check()

    def id_column(self, sql: str, params: Params = None) -> str:
        """The column that holds user ids: the only one, or the one named ``user_id``."""
        if self.definer_role is not None:
            names, types = _describe_postgres(self.conn, self._bound(sql, params))
            name = _pick_id_column(names)
            if types[names.index(name)] == _PG_BYTEA:
                raise AudienceError(
                    f"the audience SQL returns its ids ({name}) as bytea; return text, "
                    f"e.g. convert_from({name}, 'UTF8') AS {name}"
                )
            return name
        if self.conn.dialect.name in _TESTED:
            return id_column(self.conn, sql, params)
        return _portable_id_column(self.conn, sql, params)

    def member_query(
        self, sql: str, id_name: str, params: Params = None, *, limit: int | None = None
    ) -> MemberQuery:
        if self.definer_role is None:
            return member_query(sql, id_name, params)
        sql = self._bound(sql, params)
        quoted = self.conn.dialect.identifier_preparer.quote_identifier(id_name)
        inner = f"SELECT CAST(audience_query.{quoted} AS text) FROM ({sql}\n) AS audience_query"
        if limit is not None:
            inner += f" LIMIT {int(limit)}"
        rows = text(f"SELECT * FROM pg_temp.{_DEFINER_FUNCTION}(:syncer_query) AS ids(user_id)")
        return _member_query(
            rows.bindparams(syncer_query=inner).columns(column(USER_ID_COLUMN)), USER_ID_COLUMN
        )

    def _bound(self, sql: str, params: Params) -> str:
        """PostgreSQL's definer function runs its query as text (``EXECUTE``), which takes no
        parameters: the values of SQL compiled from rules are bound into it by the driver's
        own client-side binding (psycopg's ``ClientCursor.mogrify``: its quoting, not ours)."""
        if not params:
            return sql
        import psycopg

        compiled = text(sql).bindparams(**params).compile(dialect=self.conn.dialect)
        raw: Any = self.conn.connection.dbapi_connection
        return str(psycopg.ClientCursor(raw).mogrify(str(compiled), compiled.params))


@contextmanager
def fenced(
    conn: Connection, source: Source, *, commit: bool = False, staging: bool = False
) -> Iterator[Reader]:
    """``read_only``, with the checks and the fence of the module docstring around it.

    Raises AudienceError when the source or its role may not run audience SQL. ``staging``:
    the block also writes syncer's staging table (SQLite's authorizer lets that through).
    """
    dialect = conn.dialect.name
    if dialect not in _TESTED:
        announce(dialect, source.name)
        with (
            read_only(conn, source.settings.query_timeout_seconds, commit=commit),
            client_deadline(conn, source.settings.query_timeout_seconds) as deadline,
        ):
            yield Reader(conn=conn, definer_role=None, deadline=deadline)
        return
    if dialect in MYSQL:
        _check_mysql(conn, source)
    definer = None
    if dialect == "postgresql":
        definer = source.settings.read_role
        _check_postgres(conn, source)
        if definer is not None:
            _create_definer_function(conn, definer)
    try:
        with read_only(conn, source.settings.query_timeout_seconds, commit=commit):
            if dialect == "sqlite":
                with _sqlite_fence(conn, staging=staging):
                    yield Reader(conn=conn, definer_role=None)
            else:
                yield Reader(conn=conn, definer_role=definer)
    finally:
        if dialect == "postgresql":
            _reset_session(conn)


def _reset_session(conn: Connection) -> None:
    """Undo what the audience SQL may have set for the session (``set_config(name, value,
    false)`` outlives a committed transaction): the connection goes on to run syncer's own
    statements (the state database's, when the source is the state database itself), whose
    names must not resolve through the SQL's ``search_path``; and session advisory locks
    (``pg_advisory_lock``) would stay held by a pooled connection. A connection that cannot be
    reset is not used again."""
    try:
        with conn.begin():
            conn.exec_driver_sql("RESET ALL")
            # Session-level advisory locks survive any transaction's end, and RESET ALL.
            conn.exec_driver_sql("SELECT pg_advisory_unlock_all()")
    except SQLAlchemyError:
        conn.invalidate()


# SQLite ------------------------------------------------------------------------------------------

_SQLITE_ALLOWED = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE})
_SQLITE_SCHEMA_TABLES = frozenset({"sqlite_master", "sqlite_schema", "sqlite_temp_master"})
_SQLITE_DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "readfile", "writefile"})
BLOB_ID_FUNCTION = "syncer_blob_id"
SQLITE_VALUE_LIMIT = 16 * 1024 * 1024  # bytes in one string or BLOB the audience SQL makes or reads


def _sqlite_authorizer(
    staging: bool,
) -> Callable[[int, str | None, str | None, str | None, str | None], int]:
    hidden = SYNCER_TABLES | _SQLITE_SCHEMA_TABLES

    def authorize(
        action: int, arg1: str | None, arg2: str | None, db: str | None, _inner: str | None
    ) -> int:
        if action in _SQLITE_ALLOWED:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_READ:
            name = (arg1 or "").lower()
            # sqlite_*: the schema, sqlite_sequence, sqlite_stat*, which name syncer's tables
            denied = name in hidden or name.startswith("sqlite_")
            return sqlite3.SQLITE_DENY if denied else sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION:
            denied = (arg2 or "").lower() in _SQLITE_DENIED_FUNCTIONS
            return sqlite3.SQLITE_DENY if denied else sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_INSERT and staging and db == "temp":
            return sqlite3.SQLITE_OK if arg1 == "syncer_staged" else sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_DENY

    return authorize


@contextmanager
def _sqlite_fence(conn: Connection, *, staging: bool) -> Iterator[None]:
    """Every statement prepared on this connection meanwhile is judged by the authorizer
    (setting one expires the statements prepared before it)."""
    raw = conn.connection.dbapi_connection
    assert isinstance(raw, sqlite3.Connection)
    raw.create_function(BLOB_ID_FUNCTION, 1, _blob_text, deterministic=True)
    raw.set_authorizer(_sqlite_authorizer(staging))
    # One function call is one step of the progress handler that enforces the timeout:
    # ``printf('%.*c', 900000000, 'x')`` would run for a minute. Bound what one value may be,
    # and printf's widths (it loops over a width even past the value's bound).
    length = raw.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, SQLITE_VALUE_LIMIT)
    # (They stay: Python's sqlite3 cannot give a connection SQLite's own printf back, and
    # syncer's own statements use none.)
    for name in _SQLITE_PRINTF:
        raw.create_function(name, -1, _bounded_printf, deterministic=True)
    try:
        yield
    finally:
        raw.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, length)
        raw.set_authorizer(None)
        raw.create_function(BLOB_ID_FUNCTION, 1, None)


_SQLITE_PRINTF = ("printf", "format")
# Wider than a value may be is no use, and a call up to it takes a fraction of a second.
SQLITE_PRINTF_WIDTH_LIMIT = SQLITE_VALUE_LIMIT
PRINTF_REFUSAL = (
    f"a printf/format width or precision over {SQLITE_PRINTF_WIDTH_LIMIT:,} (the most one value "
    "may be)"
)
# A conversion: flags, width (digits or *), precision (. digits or *), length, type.
_PRINTF_SPEC = re.compile(r"%[-+ 0#,!]*(\*|\d+)?(?:\.(\*|\d*))?(?:ll|l)?(.)", re.DOTALL)


# SQLite's own printf, for _bounded_printf: one in-memory connection for the process.
_builtin_printf = sqlite3.connect(":memory:", check_same_thread=False)
_builtin_printf_lock = threading.Lock()


def _bounded_printf(*args: object) -> object:
    """SQLite's printf, computed by SQLite itself (on a connection of its own) once no width
    or precision is over SQLITE_PRINTF_WIDTH_LIMIT; over it, an error (PRINTF_REFUSAL)."""
    if args and isinstance(args[0], str):
        _check_printf_widths(args[0], args[1:])
    marks = ", ".join("?" * len(args))
    with _builtin_printf_lock:
        return _builtin_printf.execute(f"SELECT printf({marks})", args).fetchone()[0]


def _check_printf_widths(template: str, args: tuple[object, ...]) -> None:
    taken = 0
    for spec in _PRINTF_SPEC.finditer(template):
        width, precision, kind = spec.groups()
        for given in (width, precision):
            if given == "*":
                value = args[taken] if taken < len(args) else 0
                taken += 1
            else:
                value = given or 0
            try:
                too_wide = abs(int(value)) > SQLITE_PRINTF_WIDTH_LIMIT  # type: ignore[call-overload]
            except (TypeError, ValueError):
                too_wide = False  # SQLite reads it as 0
            if too_wide:
                raise ValueError(PRINTF_REFUSAL)
        if kind != "%":
            taken += 1


def _blob_text(value: bytes | None) -> str | None:
    return id_text(value)


# PostgreSQL --------------------------------------------------------------------------------------

_PG_BYTEA = 17
_DEFINER_FUNCTION = "syncer_audience_ids"
_PG_FILE_FUNCTIONS = (
    "lo_export",
    "lo_import",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
)
_PG_ROLE_CHECK = """
WITH reach AS (  -- the roles r may act as: SET ROLE reaches a NOINHERIT membership too
  SELECT m.oid, m.rolsuper FROM pg_roles m, pg_roles r
   WHERE r.rolname = COALESCE(%(role)s, current_user) AND pg_has_role(r.oid, m.oid, 'MEMBER')
)
SELECT r.rolname, EXISTS (SELECT FROM reach WHERE reach.rolsuper),
       pg_has_role(r.oid, 'pg_write_server_files', 'MEMBER'),
       pg_has_role(r.oid, 'pg_execute_server_program', 'MEMBER'),
       pg_has_role(r.oid, 'pg_read_server_files', 'MEMBER')
         OR pg_has_role(r.oid, 'pg_signal_backend', 'MEMBER'),
       EXISTS (SELECT FROM pg_proc p, reach
               JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
               JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'dblink'
               WHERE d.objid = p.oid AND p.proname LIKE 'dblink%%'
                 AND has_function_privilege(reach.oid, p.oid, 'EXECUTE')),
       EXISTS (SELECT FROM pg_foreign_server s, reach
                WHERE has_server_privilege(reach.oid, s.oid, 'USAGE')),
       (SELECT string_agg(DISTINCT p.proname, ', ') FROM pg_proc p, reach
         WHERE p.proname = ANY(%(file_functions)s)
           AND has_function_privilege(reach.oid, p.oid, 'EXECUTE')),
       (SELECT string_agg(DISTINCT c.relname, ', ' ORDER BY c.relname) FROM pg_class c, reach
         WHERE c.relname = ANY(%(tables)s) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
           AND c.relnamespace IN (SELECT m.relnamespace FROM pg_class m
                                   WHERE m.relname = %(marker)s AND m.relkind IN ('r', 'p'))
           AND (has_table_privilege(reach.oid, c.oid,
                                    'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')
                OR has_any_column_privilege(reach.oid, c.oid, 'SELECT'))),
       pg_has_role(current_user, r.oid, 'MEMBER'),
       current_user
  FROM pg_roles r
 WHERE r.rolname = COALESCE(%(role)s, current_user)
"""


def _check_postgres(conn: Connection, source: Source) -> None:
    """Refuse a role that reaches past a read-only transaction or can read syncer's tables:
    the role audience SQL runs as (``read_role``, else the login role). One query."""
    settings = source.settings
    role = settings.read_role
    with conn.begin():
        row = conn.exec_driver_sql(
            _PG_ROLE_CHECK,
            {
                "role": role,
                "file_functions": list(_PG_FILE_FUNCTIONS),
                "tables": sorted(SYNCER_TABLES),
                "marker": _MARKER_TABLE,
            },
        ).first()
    where = f"source {source.name!r}"
    if row is None:
        raise AudienceError(
            f"{where}: read_role {role!r} does not exist; create it (CREATE ROLE {role} NOLOGIN; "
            f"GRANT {role} TO <the role syncer connects as>; GRANT USAGE ON SCHEMA public TO "
            f"{role}; GRANT SELECT ON <your data tables> TO {role})"
        )
    name, superuser, writes, programs, reads, dblink, foreign, files, tables, member, login = row
    who = f"read_role {name!r}" if role is not None else f"role {name!r}"
    if role is not None and not member:
        raise AudienceError(
            f"{where}: role {login!r} cannot act as read_role {name!r}; GRANT {name} TO {login}"
        )
    if not settings.allow_privileged_role:
        reason = _privileged_reason(superuser, writes, programs, reads, dblink, foreign, files)
        if reason:
            raise AudienceError(
                f"{where}: {who} {reason} despite a read-only transaction; connect as an "
                "ordinary role (CREATE ROLE syncer_reader LOGIN; GRANT SELECT ON <your data "
                f"tables> TO syncer_reader) or set [sources.{source.name}] "
                "allow_privileged_role = true"
            )
    if tables:
        raise AudienceError(_syncer_tables_refusal(source, who, name, tables))


def _privileged_reason(
    superuser: bool,
    writes: bool,
    programs: bool,
    reads: bool,
    dblink: bool,
    foreign: bool,
    files: str | None,
) -> str | None:
    if superuser:
        return "is a superuser (or may SET ROLE to one), which can write files and run programs"
    if writes:
        return "is a member of pg_write_server_files, which can write files on the server"
    if programs:
        return "is a member of pg_execute_server_program, which can run programs on the server"
    if reads:
        return (
            "is a member of pg_read_server_files or pg_signal_backend, which can read any file "
            "on the server or end other sessions"
        )
    if dblink:
        return "can use dblink, which opens connections that are not read-only"
    if foreign:
        return "can use a foreign server (postgres_fdw …), which reaches other databases"
    if files:
        return f"can run {files}, which reach files on the server"
    return None


def _syncer_tables_refusal(source: Source, who: str, name: str, tables: str) -> str:
    where = f"source {source.name!r}"
    section = f"[sources.{source.name}]"
    if source.settings.read_role is not None:
        return (
            f"{where}: {who} has privileges on syncer's own tables ({tables}); audience SQL "
            f"must not read them: REVOKE ALL ON {tables} FROM {name}"
        )
    if source.same_as_state:
        return (
            f"{where} is the state database, and role {name!r} can read syncer's own tables "
            f"({tables}); run audience SQL as a reader role: CREATE ROLE syncer_reader NOLOGIN; "
            f"GRANT syncer_reader TO {name}; GRANT USAGE ON SCHEMA public TO syncer_reader; "
            "GRANT SELECT ON users, orders TO syncer_reader; (your data tables) and set "
            f'{section} read_role = "syncer_reader", or give {section} a url of its own'
        )
    return (
        f"{where}: {who} can read syncer's own tables ({tables}) in this database; connect as "
        f"a role with SELECT on your data tables only, or set {section} read_role to a role "
        "without privileges on them"
    )


# Raised by the definer function after the query, and caught there: it rolls back the block.
_DISCARD = "SYR01"


def _create_definer_function(conn: Connection, role: str) -> None:
    """``pg_temp.syncer_audience_ids(query)``: runs ``query`` as ``role`` and returns its one
    text column. Made for this session before each use (a temporary object, gone with it).

    The query runs in a block whose subtransaction is rolled back once its rows are taken (they
    stay: ``RETURN QUERY`` keeps them outside it). The transaction around it is committed (it
    stages ids), and a read-only transaction still writes large objects (``lo_create``,
    ``lo_put``, ``lo_unlink``), sends ``pg_notify`` and keeps ``set_config(…, false)``: none of
    that outlives the block."""
    quoted = conn.dialect.identifier_preparer.quote_identifier(role)
    with conn.begin():
        conn.exec_driver_sql("SET TRANSACTION READ WRITE")
        conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS pg_temp.{_DEFINER_FUNCTION}(text)")
        conn.exec_driver_sql(
            f"CREATE FUNCTION pg_temp.{_DEFINER_FUNCTION}(query text) RETURNS SETOF text "
            "LANGUAGE plpgsql SECURITY DEFINER AS "
            f"$syncer$ BEGIN BEGIN RETURN QUERY EXECUTE query; RAISE SQLSTATE '{_DISCARD}'; "
            f"EXCEPTION WHEN SQLSTATE '{_DISCARD}' THEN NULL; END; END $syncer$"
        )
        conn.exec_driver_sql(f"ALTER FUNCTION pg_temp.{_DEFINER_FUNCTION}(text) OWNER TO {quoted}")


def drop_definer_function(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS pg_temp.{_DEFINER_FUNCTION}(text)")


def _describe_postgres(conn: Connection, sql: str) -> tuple[list[str], list[int]]:
    """The names and type OIDs of the query's columns, from the server's parse of it: nothing
    is planned or run (so nothing runs as the login role)."""
    pgconn: Any = conn.connection.dbapi_connection.pgconn  # type: ignore[union-attr]
    query = f"SELECT * FROM ({sql}\n) AS audience_query".encode()
    prepared = pgconn.prepare(b"", query)
    if prepared.error_message:
        raise _described_error(prepared.error_message)
    described = pgconn.describe_prepared(b"")
    if described.error_message:
        raise _described_error(described.error_message)
    names = [bytes(described.fname(i)).decode() for i in range(described.nfields)]
    types = [int(described.ftype(i)) for i in range(described.nfields)]
    return names, types


def _described_error(message: bytes) -> SQLAlchemyError:
    text_ = message.decode(errors="replace").strip()
    first = text_.splitlines()[0] if text_ else "the query failed"
    return SQLAlchemyError(first.removeprefix("ERROR:").strip())


# MySQL / MariaDB ---------------------------------------------------------------------------------


def _check_mysql(conn: Connection, source: Source) -> None:
    where = f"source {source.name!r}"
    section = f"[sources.{source.name}]"
    if source.same_as_state:
        raise AudienceError(
            f"{where} is the state database, where audience SQL could read syncer's own tables; "
            f"give {section} a url of its own, as a user granted SELECT only on your data tables "
            "(CREATE USER syncer_reader …; GRANT SELECT ON shop.users TO syncer_reader)"
        )
    # information_schema lists only the tables this user holds some privilege on.
    with conn.begin():
        visible = conn.exec_driver_sql(
            "SELECT TABLE_SCHEMA FROM information_schema.TABLES WHERE TABLE_NAME = %(marker)s",
            {"marker": _MARKER_TABLE},
        ).first()
    if visible is not None:
        raise AudienceError(
            f"{where}: its user can read syncer's own tables (in {visible[0]}); connect as a "
            "user granted SELECT only on your data tables"
        )


# --- the query, wrapped -------------------------------------------------------------------------


def _pick_id_column(names: list[str]) -> str:
    if len(names) == 1:
        return str(names[0])
    lowered = {name.lower(): name for name in names}
    if USER_ID_COLUMN in lowered:
        return str(lowered[USER_ID_COLUMN])
    raise AudienceError(
        f"the audience SQL returns {len(names)} columns ({', '.join(names)}); "
        "return one column of user ids, or name the id column user_id"
    )


def _portable_id_column(conn: Connection, sql: str, params: Params = None) -> str:
    """``id_column`` for any dialect: SQLAlchemy writes the LIMIT as the dialect wants it
    (``TOP``, ``FETCH FIRST`` …); nothing is fetched."""
    rows = _embedded(f"({_text(sql, params)}\n) AS audience_query", params)
    query: Select[Any] = select(literal_column("*")).select_from(rows).limit(0)
    result = conn.execute(query)
    names = list(result.keys())
    result.close()
    return _pick_id_column(names)


def id_column(conn: Connection, sql: str, params: Params = None) -> str:
    """The column that holds user ids: the only one, or the one named ``user_id``.

    Every statement that embeds audience SQL carries a bound parameter: drivers send
    parameterless statements as simple queries, which PostgreSQL runs even when they hold
    several statements (``…) x; COMMIT; DELETE …``); with a parameter, it refuses them.
    """
    result = conn.execute(
        text(f"SELECT * FROM ({_text(sql, params)}\n) AS audience_query LIMIT :none"),
        {**(params or {}), "none": 0},
    )
    names = list(result.keys())
    result.close()
    return _pick_id_column(names)


@dataclass(frozen=True, kw_only=True)
class MemberQuery:
    """A definition wrapped as a subquery, and the pieces a run selects from it."""

    rows: Subquery
    id: ColumnElement[Any]
    user_id: ColumnElement[str]  # the id as text
    valid: ColumnElement[bool]
    members: Select[str]
    raw: Select[Any]  # the ids as the source returns them, for streaming


def member_query(sql: str, id_name: str, params: Params = None) -> MemberQuery:
    """The user ids of a definition as text; NULL, blank, over-long ids and ids holding a NUL
    character are not valid.

    Blank means nothing but spaces, tabs and line breaks (see ``is_valid_id``, its twin for ids
    streamed through Python). The SQL ends on a line of its own, so a trailing comment the
    database reads differently cannot reach the SQL around it.
    """
    rows = _embedded(f"{_text(sql, params)}\n", params)
    return _member_query(rows.columns(column(id_name)), id_name)


# SQLAlchemy's text() reads ``:name`` as a parameter and ``\:name`` as the text ``:name``
# (its own patterns: sqlalchemy.sql.elements.TextClause, sqlalchemy.sql.compiler).
_BIND = re.compile(r"(?<![:\w\x5c]):(\w+)(?![:\w])", re.UNICODE)
_ESCAPED_BIND = re.compile(r"\x5c(:\w*)(?![:\w])", re.UNICODE)


def _text(sql: str, params: Params) -> str:
    """Audience SQL as text() must be given it. Hand-written SQL has no parameters: what
    text() would take for one (``WHERE t = ':x'``, ``'a\\:b'``) is escaped so that the database
    gets the SQL exactly as written. SQL compiled from rules keeps its ``:name`` placeholders,
    whose values are ``params``."""
    if params:
        return sql
    sql = _ESCAPED_BIND.sub(lambda found: "\\" + found.group(0), sql)
    return _BIND.sub(lambda found: "\\" + found.group(0), sql)


def _embedded(sql_text: str, params: Params) -> TextClause:
    rows = text(sql_text)
    return rows.bindparams(**params) if params else rows


def _member_query(rows_text: Any, id_name: str) -> MemberQuery:
    rows = rows_text.subquery("audience_query")
    user_id = cast(rows.c[id_name], Text)
    valid = and_(
        user_id.is_not(None),
        _NotBlank(user_id),
        _Characters(user_id) <= USER_ID_LENGTH,
        _NoNul(user_id),
        _TextId(rows.c[id_name]),
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


class _TextId(FunctionElement[bool]):
    """True unless the id is bytes that are not UTF-8 text. SQLite: ``CAST(blob AS TEXT)``
    reads a BLOB's bytes as text, which is the id itself when they are UTF-8 (checked by
    ``syncer_blob_id``, a function of the fenced connection), and never its bytes shown as
    text. One ``typeof`` per row, outside the id's own expression, which the other checks
    repeat (a CASE there cost a quarter of a second per million ids). Elsewhere: true."""

    type = Boolean()
    inherit_cache = True
    _is_implicitly_boolean = True


@compiles(_TextId)
def _text_id(element: _TextId, compiler: SQLCompiler, **kw: Any) -> str:
    return "1 = 1"


@compiles(_TextId, "sqlite")
def _text_id_sqlite(element: _TextId, compiler: SQLCompiler, **kw: Any) -> str:
    (value,) = element.clauses
    raw = compiler.process(value, **kw)
    return f"(typeof({raw}) != 'blob' OR {BLOB_ID_FUNCTION}({raw}) IS NOT NULL)"


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


class _NoNul(FunctionElement[bool]):
    """True when the id holds no NUL character (PostgreSQL text cannot hold one: a state
    database there would refuse the whole load)."""

    type = Boolean()
    inherit_cache = True
    _is_implicitly_boolean = True


@compiles(_NoNul)
def _no_nul_portable(element: _NoNul, compiler: SQLCompiler, **kw: Any) -> str:
    (value,) = element.clauses
    return f"(instr({compiler.process(value, **kw)}, char(0)) = 0)"


@compiles(_NoNul, "postgresql")
def _no_nul_postgres(element: _NoNul, compiler: SQLCompiler, **kw: Any) -> str:
    return "true"


@compiles(_NoNul, "mysql")
@compiles(_NoNul, "mariadb")
def _no_nul_mysql(element: _NoNul, compiler: SQLCompiler, **kw: Any) -> str:
    (value,) = element.clauses
    return f"(LOCATE(CHAR(0), {compiler.process(value, **kw)}) = 0)"


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


def id_text(value: object) -> str | None:
    """An id as the source returned it, as text: bytes (a BLOB, bytea, VARBINARY) are their
    UTF-8 text, or None when they are not UTF-8; NULL is None."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else str(value)


def is_valid_id(user_id: str) -> bool:
    """The Python side of ``member_query``'s ``valid``, for ids streamed from another database."""
    return (
        bool(user_id.strip(BLANK_CHARACTERS))
        and len(user_id) <= USER_ID_LENGTH
        and "\x00" not in user_id
    )


def check_definition(source: Source, sql: str, params: Params = None) -> str:
    """Run the definition on its source, read-only and fenced, and return it normalized.

    Raises AudienceError naming the problem when it is not one read-only query, when the source
    or its role may not run audience SQL, or when it fails or returns no id column.
    """
    sql = normalize_sql(sql, source.dialect)
    try:
        # The connection ends with the check (callers dispose of the engine), and with it the
        # session's temporary definer function.
        with source.engine.connect() as conn, fenced(conn, source) as reader:
            id_name = reader.id_column(sql, params)
            query = reader.member_query(sql, id_name, params, limit=5)
            # On the dialects syncer tests, its id checks run in SQL too; elsewhere ids are
            # checked in Python, as a run streams them.
            sample = query.members if source.dialect in _TESTED else query.raw
            conn.execute(sample.limit(5)).fetchall()
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
    if is_duckdb_lock_error(exc):
        found = _DUCKDB_LOCK.search(message)
        path, holder = (found.group(1), f" ({found.group(2)})") if found else ("", "")
        return (
            f"the DuckDB file {path} is open for writing in another process{holder}, and "
            "DuckDB lets one process write or several read (could not set lock on file); "
            "syncer waited query_timeout_seconds for it: let the writer finish or close it, "
            "or raise query_timeout_seconds"
        ).replace("file  is", "file is")
    if "interrupted" in message.lower() and isinstance(orig, sqlite3.OperationalError):
        return "the query ran past the source's query_timeout_seconds"
    if "user-defined function raised exception" in message and isinstance(
        orig, sqlite3.OperationalError
    ):
        return f"{PRINTF_REFUSAL}: audience SQL values are bounded"
    denied = ("not authorized", "is prohibited")
    if isinstance(orig, sqlite3.DatabaseError) and any(d in message.lower() for d in denied):
        return f"{message.splitlines()[0]}: audience SQL may read data tables only"
    return message.splitlines()[0] if message else type(orig).__name__


_DUCKDB_LOCK = re.compile(r'lock on file ("[^"]*")(?:.*?(PID \d+))?')


def run_error(source: Source, exc: Exception) -> SourceError:
    return SourceError(
        f"the audience query failed on source {source.name!r}: {describe_db_error(exc)}"
    )
