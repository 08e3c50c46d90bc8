"""What syncer guarantees on each kind of source database, and how it keeps to it.

Any SQLAlchemy dialect can be a source. For the ones below syncer knows how audience SQL is
made read-only, how its time limit is enforced and how its ids stream out; docs/sources.md
says the same per warehouse, with the role to create. A dialect syncer has no entry for gets
the generic rules (``GENERIC``): the SQL is parse-checked, the time limit is kept by syncer
(the driver's cancel where it has one, and between batches), ids are fetched in batches, and
read-only is only as good as the role the operator connects as. That is logged once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from syncer.errors import ConfigError

logger = logging.getLogger(__name__)

QUERY_TIMEOUT_TEXT = "the query ran past the source's query_timeout_seconds"


@dataclass(frozen=True, kw_only=True)
class Dialect:
    """How syncer treats one kind of source database."""

    name: str  # SQLAlchemy's backend name
    title: str
    extra: str | None  # pip install "syncer[<extra>]" installs its dialect
    read_only: str  # how audience SQL is kept from writing
    timeout: str  # how query_timeout_seconds is enforced
    streaming: str  # how the ids come out
    tested: bool  # against a real database, in syncer's own test suite
    server_timeout: bool  # the database ends a query that runs too long by itself


_ROLE_ONLY = "only by the role syncer connects as (grant it SELECT on the data and nothing else)"
_CLIENT_CANCEL = (
    "syncer cancels the query from the client when it runs past query_timeout_seconds "
    "(the driver's cancel), and checks the time between batches"
)
_BATCH_CHECK = "syncer checks the time between batches (the driver has no cancel)"

KNOWN: dict[str, Dialect] = {
    dialect.name: dialect
    for dialect in (
        Dialect(
            name="sqlite",
            title="SQLite",
            extra=None,
            read_only="the file is opened read-only (mode=ro, query_only) and an authorizer "
            "allows reading data tables only",
            timeout="a progress handler interrupts the query",
            streaming="rows are fetched in batches from the cursor",
            tested=True,
            server_timeout=True,
        ),
        Dialect(
            name="postgresql",
            title="PostgreSQL",
            extra="postgres",
            read_only="a READ ONLY transaction in a session whose default is read-only, and "
            "a role check (no superuser, file or program roles, dblink or foreign servers)",
            timeout="SET LOCAL statement_timeout",
            streaming="a server-side (named) cursor",
            tested=True,
            server_timeout=True,
        ),
        Dialect(
            name="mysql",
            title="MySQL",
            extra="mysql",
            read_only="SET SESSION TRANSACTION READ ONLY",
            timeout="SET SESSION max_execution_time (MySQL's limit on a SELECT)",
            streaming="an unbuffered server-side cursor (SSCursor)",
            tested=True,
            server_timeout=True,
        ),
        Dialect(
            name="mariadb",
            title="MariaDB",
            extra="mysql",
            read_only="SET SESSION TRANSACTION READ ONLY",
            timeout="SET SESSION max_statement_time",
            streaming="an unbuffered server-side cursor (SSCursor)",
            tested=True,
            server_timeout=True,
        ),
        Dialect(
            name="duckdb",
            title="DuckDB",
            extra="duckdb",
            read_only="the file is opened read_only, with external access off "
            "(enable_external_access = false; files are readable only under the source's "
            "allowed_directories), extensions never installed or loaded on demand, and the "
            "configuration locked",
            timeout="syncer interrupts the query (DuckDB has no statement timeout)",
            streaming="rows are fetched in batches (fetchmany) from DuckDB's streaming result",
            tested=True,
            server_timeout=False,
        ),
        Dialect(
            name="snowflake",
            title="Snowflake",
            extra="snowflake",
            read_only=_ROLE_ONLY,
            timeout="the session parameter STATEMENT_TIMEOUT_IN_SECONDS, and " + _BATCH_CHECK,
            streaming="the connector fetches result chunks as they are read (fetchmany)",
            tested=False,
            server_timeout=True,
        ),
        Dialect(
            name="bigquery",
            title="BigQuery",
            extra="bigquery",
            read_only=_ROLE_ONLY,
            timeout=_BATCH_CHECK + "; a query syncer gave up on may still run on BigQuery",
            streaming="the result is read page by page (fetchmany)",
            tested=False,
            server_timeout=False,
        ),
        Dialect(
            name="redshift",
            title="Redshift",
            extra="redshift",
            read_only=_ROLE_ONLY,
            timeout="SET statement_timeout on each connection, and " + _CLIENT_CANCEL,
            streaming="rows are fetched in batches (fetchmany)",
            tested=False,
            server_timeout=True,
        ),
        Dialect(
            name="clickhousedb",
            title="ClickHouse",
            extra="clickhouse",
            read_only=_ROLE_ONLY + "; a user whose settings profile sets readonly = 1 is "
            "read-only whatever it is granted",
            timeout="the setting max_execution_time (a readonly = 1 profile ignores it: set it "
            "in the profile too), and " + _BATCH_CHECK,
            streaming="the driver (clickhouse-connect) buffers the whole result before the "
            "first batch: memory grows with the audience",
            tested=False,
            server_timeout=True,
        ),
        Dialect(
            name="trino",
            title="Trino",
            extra="trino",
            read_only=_ROLE_ONLY + " (or a catalog configured read-only)",
            timeout="the session property query_max_execution_time, and " + _CLIENT_CANCEL,
            streaming="the client pages through the result as it is read (fetchmany)",
            tested=False,
            server_timeout=True,
        ),
        Dialect(
            name="databricks",
            title="Databricks",
            extra="databricks",
            read_only=_ROLE_ONLY + " (a principal with SELECT and USE privileges only)",
            timeout="the session configuration STATEMENT_TIMEOUT, and " + _CLIENT_CANCEL,
            streaming="results are fetched in Arrow batches (fetchmany)",
            tested=False,
            server_timeout=False,
        ),
    )
}

GENERIC = Dialect(
    name="",
    title="a database syncer has no entry for",
    extra=None,
    read_only=_ROLE_ONLY,
    timeout=_CLIENT_CANCEL,
    streaming="rows are fetched in batches (fetchmany)",
    tested=False,
    server_timeout=False,
)


def dialect_for(backend: str) -> Dialect:
    return KNOWN.get(backend, GENERIC)


_announced: set[str] = set()
_announced_lock = threading.Lock()


def announce(backend: str, source_name: str) -> None:
    """Say once per process that a source uses a dialect syncer has no entry for."""
    if backend in KNOWN:
        return
    with _announced_lock:
        if backend in _announced:
            return
        _announced.add(backend)
    logger.warning(
        "source %r uses the %r dialect, which syncer has no entry for: audience SQL is "
        "parse-checked, the query timeout is enforced by syncer (a cancel where the driver has "
        "one, else between batches), ids are fetched in batches, and read-only rests on the "
        "role it connects as alone (see docs/sources.md)",
        source_name,
        backend,
    )


def install_hint(url: URL) -> str:
    """What to install for a URL whose dialect or driver is missing."""
    backend = url.get_backend_name()
    if backend == "clickhouse":
        return (
            "use a clickhousedb:// URL (the dialect of clickhouse-connect): pip install "
            '"syncer[clickhouse]"'
        )
    known = KNOWN.get(backend)
    if known is not None and known.extra is not None:
        return f'pip install "syncer[{known.extra}]"'
    return "install the package that provides its SQLAlchemy dialect, or fix the URL"


# --- engines --------------------------------------------------------------------------------


def engine_options(
    url: URL, *, timeout_seconds: float, allowed_directories: tuple[Path, ...]
) -> tuple[dict[str, Any], Callable[[Engine], None] | None]:
    """``create_engine`` keyword arguments for a source, and a function that finishes the
    engine (event listeners), for the dialects that need either."""
    backend = url.get_backend_name()
    if backend == "duckdb":
        return _duckdb_options(timeout_seconds, allowed_directories)
    if backend == "snowflake":
        seconds = max(1, round(timeout_seconds))
        return {
            "pool_pre_ping": True,
            "connect_args": {"session_parameters": {"STATEMENT_TIMEOUT_IN_SECONDS": seconds}},
        }, None
    if backend == "trino":
        seconds = max(1, round(timeout_seconds))
        return {
            "pool_pre_ping": True,
            "connect_args": {"session_properties": {"query_max_execution_time": f"{seconds}s"}},
        }, None
    if backend == "databricks":
        seconds = max(1, round(timeout_seconds))
        return {
            "pool_pre_ping": True,
            "connect_args": {
                "session_configuration": {"STATEMENT_TIMEOUT": str(seconds)},
                # The connector retries an unreachable host for up to 15 minutes by default,
                # outside any query deadline: bound it.
                "_retry_stop_after_attempts_count": DATABRICKS_CONNECT_ATTEMPTS,
                "_retry_stop_after_attempts_duration": DATABRICKS_RETRY_SECONDS,
            },
        }, None
    if backend == "clickhousedb":
        seconds = max(1, round(timeout_seconds))
        return {"pool_pre_ping": True, "connect_args": {"max_execution_time": seconds}}, None
    if backend == "redshift":
        milliseconds = max(1, round(timeout_seconds * 1000))

        def on_connect(engine: Engine) -> None:
            def set_timeout(dbapi_connection: Any, _record: Any) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute(f"SET statement_timeout TO {milliseconds}")
                cursor.close()

            event.listen(engine, "connect", set_timeout)

        return {"pool_pre_ping": True}, on_connect
    return {"pool_pre_ping": True}, None


DATABRICKS_CONNECT_ATTEMPTS = 5
DATABRICKS_RETRY_SECONDS = 60.0

_duckdb_fence_lock = threading.Lock()
# DuckDB's own default is 80 % of the machine's memory: a quarter leaves room for the rest of
# syncer (and other audiences). It bounds what DuckDB's operators hold (they spill to disk
# past it), not every expression: see docs/sources.md.
DUCKDB_MEMORY_LIMIT_MB = max(
    256, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4 // 2**20
)

# DuckDB: how long a run waits for a process that has the file open for writing.
DUCKDB_LOCK_RETRY_SECONDS = 0.25


def _duckdb_options(
    timeout_seconds: float, allowed_directories: tuple[Path, ...]
) -> tuple[dict[str, Any], Callable[[Engine], None]]:
    folders = [f"{folder}/" if str(folder) != "/" else "/" for folder in allowed_directories]

    def finish(engine: Engine) -> None:
        @event.listens_for(engine, "do_connect")
        def connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
            # DuckDB has one writer or many readers: while another process writes the file,
            # wait for it (up to the query timeout), then say who holds it.
            deadline = time.monotonic() + timeout_seconds
            while True:
                try:
                    return dialect.connect(*cargs, **cparams)
                except Exception as exc:
                    if not is_duckdb_lock_error(exc) or time.monotonic() >= deadline:
                        raise
                time.sleep(DUCKDB_LOCK_RETRY_SECONDS)

        @event.listens_for(engine, "connect")
        def fence(dbapi_connection: Any, _record: Any) -> None:
            with _duckdb_fence_lock:  # read, then set: one connection of the process at a time
                _fence(dbapi_connection)

        def _fence(dbapi_connection: Any) -> None:
            # Connections of one process to one file share one database, whose configuration
            # the first of them locked: it must be the one this source asks for.
            locked = dbapi_connection.execute(
                "SELECT current_setting('lock_configuration'), "
                "current_setting('enable_external_access'), "
                "current_setting('allowed_directories')"
            ).fetchone()
            if locked[0]:
                if locked[1] or sorted(d for d in locked[2] if not d.endswith(".tmp/")) != sorted(
                    folders
                ):
                    raise ConfigError(
                        "two sources open the same DuckDB file with different "
                        "allowed_directories; give them the same list"
                    )
                return
            # Allowed directories can only be set once the database is open, and before
            # external access is turned off; then the configuration is locked, so that no
            # statement can turn it back on.
            dbapi_connection.execute("SET allowed_directories = $1", [folders])
            dbapi_connection.execute(f"SET memory_limit = '{DUCKDB_MEMORY_LIMIT_MB}MB'")
            dbapi_connection.execute("SET enable_external_access = false")
            dbapi_connection.execute("SET lock_configuration = true")

    return {
        # Each run opens the file and closes it when done: a pooled connection would keep
        # DuckDB's file lock, and the process that writes the file would be locked out.
        "poolclass": NullPool,
        "connect_args": {
            "read_only": True,
            "config": {
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
            },
        },
    }, finish


def is_duckdb_lock_error(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", None) or exc
    return "Could not set lock on file" in str(orig)


# --- the time limit, kept by syncer ---------------------------------------------------------


class QueryTimedOut(SQLAlchemyError):
    """The audience query ran past the source's query_timeout_seconds (cancelled by syncer)."""

    def __init__(self) -> None:
        super().__init__(QUERY_TIMEOUT_TEXT)


@dataclass(kw_only=True)
class Deadline:
    """When a query must be done by; ``check`` between batches."""

    at: float
    fired: bool = False
    cancellers: list[Callable[[], object]] = field(default_factory=list)

    def check(self) -> None:
        if self.fired or time.monotonic() > self.at:
            self.fired = True
            raise QueryTimedOut()


@contextmanager
def client_deadline(conn: Connection, timeout_seconds: float) -> Iterator[Deadline]:
    """Cancel what runs on ``conn`` once ``timeout_seconds`` have passed: DuckDB's
    ``interrupt``, a driver's ``cancel``, else only the check between batches. An error the
    block raises after the cancel is the timeout's."""
    deadline = Deadline(at=time.monotonic() + timeout_seconds)
    raw: Any = conn.connection.dbapi_connection
    cancel = getattr(raw, "interrupt", None) or getattr(raw, "cancel", None)
    if callable(cancel):
        deadline.cancellers.append(cancel)
    guard = threading.Lock()
    active = [True]

    def fire() -> None:
        with guard:
            if not active[0]:
                return
            deadline.fired = True
            for cancel_one in deadline.cancellers:
                try:
                    cancel_one()
                except Exception:  # the connection may be closing; the batch check still holds
                    logger.debug("cancelling a source query failed", exc_info=True)

    # Cursors the block opens add their own cancel (Trino's, Databricks') to the list.
    timer = threading.Timer(timeout_seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield deadline
    except QueryTimedOut:
        raise
    except Exception:
        if deadline.fired:
            raise QueryTimedOut() from None
        raise
    finally:
        with guard:
            active[0] = False
        timer.cancel()
