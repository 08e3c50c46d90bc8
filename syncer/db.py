"""Engines for the state database and for audience sources, and the schema's upgrade."""

from __future__ import annotations

import contextlib
import logging
import random
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine, column, create_engine, event, inspect, table, update
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from syncer.errors import ConfigError

if TYPE_CHECKING:
    from syncer.settings import SourceSettings

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
CONNECT_TIMEOUT_SECONDS = 10  # PostgreSQL; PyMySQL's own default is 10 s too
MIGRATIONS_PACKAGED = Path(__file__).parent / "_migrations"
MIGRATIONS_SOURCE_TREE = Path(__file__).parent.parent / "migrations"


def safe_url(url: URL) -> str:
    """A database URL fit for messages: the password, if any, is masked."""
    return url.render_as_string(hide_password=True)


def _engine(url: URL, **options: Any) -> Engine:
    """``create_engine``, with bound values kept out of errors and logs (a statement's
    parameters can hold user ids and workflow URL hashes), and a dialect or driver that is not
    installed reported as bad settings, with what to install."""
    from syncer.dialects import install_hint

    try:
        return create_engine(url, hide_parameters=True, **options)
    except (NoSuchModuleError, ImportError) as exc:
        raise ConfigError(
            f"the database driver {url.drivername!r} of {safe_url(url)} is not installed or "
            f"unknown ({first_line(exc)}); {install_hint(url)}"
        ) from None
    except Exception as exc:  # a dialect that checks more at once (BigQuery: credentials)
        raise ConfigError(
            f"cannot set up the database {safe_url(url)}: {first_line(exc)}"
        ) from None


def check_driver(url: URL) -> None:
    """ConfigError now, not at a run, when the driver of ``url`` is unknown or not installed."""
    _engine(url, poolclass=NullPool).dispose()


def create_state_engine(url: URL) -> Engine:
    """The state database: SQLite in WAL mode with foreign keys on, or a server database."""
    if url.get_backend_name() == "sqlite":
        engine = _engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_pre_ping=False,
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    return _engine(url, pool_pre_ping=True, connect_args=_connect_timeout(url))


def _connect_timeout(url: URL) -> dict[str, Any]:
    """A bound on connecting to a server database (libpq waits as long as TCP does, minutes,
    for a host that drops packets), unless the URL sets its own."""
    if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        return {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    return {}


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    # Let SQLAlchemy's transaction boundaries be the real ones (no pysqlite implicit BEGIN quirks).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA temp_store=FILE")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get("sqlite_begin", "")
    conn.exec_driver_sql(f"BEGIN {mode}".strip())


def install_sqlite_transactions(engine: Engine) -> None:
    """Emit BEGIN ourselves, since the driver's implicit transactions are switched off."""
    if engine.dialect.name == "sqlite":
        event.listen(engine, "begin", _sqlite_begin)


def open_state(url: URL) -> Engine:
    engine = create_state_engine(url)
    install_sqlite_transactions(engine)
    return engine


def create_source_engine(source: SourceSettings) -> Engine:
    """A source database. SQLite sources open read-only (``mode=ro``, ``query_only``); other
    dialects as ``syncer.dialects`` says."""
    url = source.url
    if url.get_backend_name() in ("sqlite", "duckdb"):
        path = Path(url.database or "")
        if not path.exists():
            raise ConfigError(f"source database file {str(path)!r} does not exist")
    if url.get_backend_name() == "duckdb":
        _check_duckdb_file(path)
    if url.get_backend_name() == "sqlite":
        ro = URL.create("sqlite", database=f"file:{path}", query={"mode": "ro", "uri": "true"})
        engine = _engine(ro)
        event.listen(engine, "connect", _sqlite_readonly_on_connect)
        install_sqlite_transactions(engine)
        return engine
    if url.get_backend_name() == "postgresql":
        # A second wall besides the per-transaction READ ONLY: a session that cannot write.
        return _engine(
            url,
            pool_pre_ping=True,
            connect_args={
                "options": "-c default_transaction_read_only=on",
                **_connect_timeout(url),
            },
        )
    if url.get_backend_name() in ("mysql", "mariadb"):
        return _engine(url, pool_pre_ping=True)
    from syncer.dialects import engine_options

    options, finish = engine_options(
        url,
        timeout_seconds=source.query_timeout_seconds,
        allowed_directories=source.allowed_directories,
    )
    engine = _engine(url, **options)
    if finish is not None:
        finish(engine)
    return engine


DUCKDB_MAGIC = b"DUCK"  # bytes 8-11 of every DuckDB database file


def _check_duckdb_file(path: Path) -> None:
    """A regular file that starts as a DuckDB database does: not a FIFO (opening it would
    block), a folder, or a SQLite file (DuckDB would try to read it with its SQLite extension,
    which could reach syncer's own tables)."""
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
        if regular:
            with path.open("rb") as file:
                header = file.read(12)
    except OSError as exc:
        raise ConfigError(
            f"source database file {str(path)!r} cannot be read: {exc.strerror}"
        ) from None
    if not regular or header[8:12] != DUCKDB_MAGIC:
        raise ConfigError(f"source database file {str(path)!r} is not a DuckDB database file")


def _sqlite_readonly_on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    dbapi_connection.isolation_level = None
    # Text that is not UTF-8 arrives as its bytes (a run counts such an id as not valid)
    # instead of failing the whole fetch.
    dbapi_connection.text_factory = _text_or_bytes
    dbapi_connection.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    dbapi_connection.execute("PRAGMA query_only=ON")


def _text_or_bytes(value: bytes) -> str | bytes:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def migrations_dir() -> Path:
    for candidate in (MIGRATIONS_PACKAGED, MIGRATIONS_SOURCE_TREE):
        if (candidate / "env.py").exists():
            return candidate
    raise ConfigError("the syncer migrations are missing from this installation; reinstall syncer")


def comparison_options(conn: Connection) -> dict[str, Any]:
    """How Alembic compares the models with this database: types too, and only what belongs
    on its kind of database (``models.only_on``)."""
    from syncer.models import in_schema

    dialect = conn.dialect.name

    def include_object(
        item: object, _name: str | None, _type: str, reflected: bool, _to: object
    ) -> bool:
        return reflected or in_schema(item, dialect)

    return {"compare_type": True, "include_object": include_object}


def alembic_config(url: URL) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["syncer_url"] = url
    return config


def upgrade(url: URL, revision: str = "head") -> None:
    """``alembic upgrade head`` against the state database."""
    from alembic import command

    try:
        command.upgrade(alembic_config(url), revision)
    except SQLAlchemyError as exc:
        raise ConfigError(
            f"cannot upgrade the state database {safe_url(url)}: {first_line(exc)}"
        ) from None


def downgrade(url: URL, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def check_schema(engine: Engine) -> None:
    """Refuse to work on a state database whose schema is missing or behind the code."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    heads = set(ScriptDirectory(str(migrations_dir())).get_heads())
    try:
        # Any error while connecting is the settings' (a bad host, port, option or password)
        conn = engine.connect()
    except SQLAlchemyError as exc:
        raise ConfigError(
            f"cannot open the state database {safe_url(engine.url)}: {first_line(exc)}"
        ) from None
    try:
        with conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    except OperationalError as exc:
        raise ConfigError(
            f"cannot open the state database {safe_url(engine.url)}: {first_line(exc)}"
        ) from None
    if current != heads:
        what = "has no schema" if not current else "has an older schema"
        raise ConfigError(
            f"the state database {safe_url(engine.url)} {what}; run: syncer db upgrade"
        )


def check_writable(engine: Engine) -> None:
    """Fail before any work when this process can only read the state database (a file its
    user cannot write, a read-only server, a role without grants): a no-op update of
    ``alembic_version``, rolled back. The database's error propagates as it is."""
    version = table("alembic_version", column("version_num"))
    with engine.connect() as conn, conn.begin() as transaction:
        conn.execute(update(version).values(version_num=version.c.version_num))
        transaction.rollback()


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


# SQLite has one writer. Threads of this process queue for it on a lock of their own rather
# than in SQLite's busy handler, which sleeps up to 100 ms between looks at the lock.
_sqlite_writers: weakref.WeakKeyDictionary[Engine, threading.RLock] = weakref.WeakKeyDictionary()
_sqlite_writers_guard = threading.Lock()


def _sqlite_writer(engine: Engine) -> threading.RLock:
    with _sqlite_writers_guard:
        lock = _sqlite_writers.get(engine)
        if lock is None:
            lock = _sqlite_writers[engine] = threading.RLock()
        return lock


@contextmanager
def write_transaction(engine: Engine, held: Connection | None = None) -> Iterator[Connection]:
    """A transaction that takes SQLite's write lock up front (no upgrade deadlocks).

    ``held``: a connection of ``engine`` the caller keeps open across many short transactions,
    instead of taking one from the pool (and pinging the server) for each."""
    if engine.dialect.name != "sqlite":
        if held is None:
            with engine.begin() as conn:
                yield conn
        else:
            with held.begin():
                yield held
        return
    with (
        _sqlite_writer(engine),
        contextlib.nullcontext(held) if held is not None else engine.connect() as conn,
    ):
        conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            yield conn


T = TypeVar("T")
DEADLOCK_ATTEMPTS = 5
_DEADLOCK_STATES = frozenset({"40P01", "40001"})  # PostgreSQL: deadlock, serialization failure
_DEADLOCK_CODES = frozenset({1213, 1205})  # MySQL/MariaDB: deadlock, lock wait timeout


def is_deadlock(exc: BaseException) -> bool:
    """Whether the database gave up on a transaction to break a deadlock (or a lock wait):
    the transaction was rolled back, and running it again is the remedy."""
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) in _DEADLOCK_STATES:
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and args[0] in _DEADLOCK_CODES


def retry_deadlocks(work: Callable[[], T], *, what: str) -> T:
    """Run ``work`` (one whole transaction, safe to run again) and run it again, a few times
    and after a short random pause, when the database broke a deadlock by rolling it back.
    InnoDB does so between two transactions that update overlapping rows in different orders
    (a delivery pass recording outcomes while postponing a failing URL's rows)."""
    for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
        try:
            return work()
        except DBAPIError as exc:
            if attempt == DEADLOCK_ATTEMPTS or not is_deadlock(exc):
                raise
            logger.info("%s: %s; running it again", what, first_line(exc))
            time.sleep(random.uniform(0.01, 0.05) * attempt)
    raise AssertionError("unreachable")


def first_line(exc: BaseException) -> str:
    """A database error in one line: the driver's own message (SQLAlchemy's wrapper, with its
    statement and bound values, left out), or the error's type when it says nothing."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__
