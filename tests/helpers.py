"""Plain helpers for tests: settings files, SQLite warehouses, the ``syncer`` CLI in a subprocess."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
import pytest
from psycopg import sql

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_SECRET = "test-secret"  # the secret the `receiver` fixture checks signatures with

# Fast, test-friendly [tray] values; override any of them with write_settings(tray={...}).
TEST_TRAY_OPTIONS: dict[str, object] = {
    "timeout_seconds": 2,
    "backoff_base_seconds": 0.01,
    "backoff_max_seconds": 0.2,
}

_BARE_KEY = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def toml_value(value: object) -> str:
    """A Python str/bool/int/float/list as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as a TOML value")


def toml_key(key: str) -> str:
    return key if key and set(key) <= _BARE_KEY else json.dumps(key, ensure_ascii=False)


def write_settings(
    path: Path,
    *,
    state_url: str,
    sources: Mapping[str, str] | None = None,
    workflow_urls: list[str] | None = None,
    shared_secret: str | None = None,
    tray: Mapping[str, object] | None = None,
    extra: str = "",
) -> Path:
    """Write a settings.toml and return its path.

    ``path`` is the file, or a folder to put ``settings.toml`` in. ``[tray]`` is always written
    last, with TEST_TRAY_OPTIONS updated by ``tray``; ``extra`` is appended verbatim, so bare
    ``key = value`` lines in it land in ``[tray]`` (prefer ``tray={...}`` for those).
    """
    if path.is_dir():
        path = path / "settings.toml"
    lines = ["[database]", f"url = {toml_value(state_url)}", ""]
    for name, url in (sources or {}).items():
        lines += [f"[sources.{toml_key(name)}]", f"url = {toml_value(url)}", ""]
    tray_options: dict[str, object] = {}
    if workflow_urls is not None:
        tray_options["workflow_urls"] = list(workflow_urls)
    if shared_secret is not None:
        tray_options["shared_secret"] = shared_secret
    tray_options |= TEST_TRAY_OPTIONS
    tray_options |= dict(tray or {})
    lines.append("[tray]")
    lines += [f"{toml_key(key)} = {toml_value(value)}" for key, value in tray_options.items()]
    text = "\n".join(lines) + "\n"
    if extra:
        text += "\n" + extra.strip("\n") + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def _sqlite_path(url_or_path: str | Path) -> Path:
    text = str(url_or_path)
    if text.startswith("sqlite:///"):
        return Path(text.removeprefix("sqlite:///"))
    return Path(text)


def set_warehouse_users(
    url_or_path: str | Path, user_ids: Iterable[str | None], *, table: str = "users"
) -> None:
    """Replace the content of the warehouse's users table (created if missing).

    ``None`` ids are stored as NULL, to exercise skipping of blank/NULL ids.
    """
    quoted = '"' + table.replace('"', '""') + '"'
    rows = ((uid, None if uid is None else f"{uid}@example.com", "pro") for uid in user_ids)
    with contextlib.closing(sqlite3.connect(_sqlite_path(url_or_path))) as conn, conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {quoted} (user_id TEXT, email TEXT, plan TEXT)")
        conn.execute(f"DELETE FROM {quoted}")
        conn.executemany(f"INSERT INTO {quoted} (user_id, email, plan) VALUES (?, ?, ?)", rows)


def make_warehouse(path: Path, user_ids: Iterable[str | None], *, table: str = "users") -> str:
    """A SQLite file with ``table(user_id TEXT, email TEXT, plan TEXT)`` holding ``user_ids``
    (plan 'pro' for all). Returns its ``sqlite:///<absolute path>`` URL."""
    path = path.resolve()
    set_warehouse_users(path, user_ids, table=table)
    return f"sqlite:///{path}"


def cli_command(*args: str, settings: Path) -> list[str]:
    return [sys.executable, "-m", "syncer", "--settings", str(settings), *args]


def cli_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ plus ``env``, with the repo root on PYTHONPATH (syncer is not installed)."""
    merged = {**os.environ, **(env or {})}
    merged["PYTHONPATH"] = os.pathsep.join(
        part for part in (str(REPO_ROOT), merged.get("PYTHONPATH", "")) if part
    )
    merged.setdefault("PYTHONUNBUFFERED", "1")
    return merged


def run_cli(
    *args: str,
    settings: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    check: bool | int | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m syncer --settings SETTINGS *args`` in the settings' folder.

    ``check``: None accepts any exit code, True requires 0, an int requires that code; a mismatch
    raises AssertionError showing stdout and stderr.
    """
    result = subprocess.run(
        cli_command(*args, settings=settings),
        cwd=settings.parent,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        check=False,
    )
    if check is not None and check is not False:
        expected = 0 if check is True else int(check)
        if result.returncode != expected:
            raise AssertionError(
                f"syncer {' '.join(args)} exited {result.returncode}, expected {expected}\n"
                f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
            )
    return result


_cli_serial = itertools.count()


class CliProcess(subprocess.Popen[str]):
    """A background ``syncer`` process; stdout/stderr go to files (no pipe can fill up).

    As a context manager it stops the process on exit (SIGTERM, then SIGKILL after 30 s).
    """

    stdout_path: Path
    stderr_path: Path

    def read_stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def read_stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` (if still running) and wait; SIGKILL if it does not exit in time."""
        if self.poll() is None:
            self.send_signal(sig)
            try:
                return self.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.wait()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        super().__exit__(exc_type, exc, tb)


def start_cli(
    *args: str,
    settings: Path,
    env: Mapping[str, str] | None = None,
    **popen_kwargs: Any,
) -> CliProcess:
    """Start ``python -m syncer --settings SETTINGS *args`` in the background (settings' folder).

    Output goes to ``cli-N.out`` / ``cli-N.err`` next to the settings; read it with
    ``read_stdout()`` / ``read_stderr()``. Use as a context manager, or call ``stop()``/``kill()``
    and ``wait()`` yourself.
    """
    serial = next(_cli_serial)
    stdout_path = settings.parent / f"cli-{serial}.out"
    stderr_path = settings.parent / f"cli-{serial}.err"
    with stdout_path.open("w") as out, stderr_path.open("w") as err:
        process = CliProcess(
            cli_command(*args, settings=settings),
            cwd=settings.parent,
            env=cli_env(env),
            stdout=out,
            stderr=err,
            text=True,
            **popen_kwargs,
        )
    process.stdout_path = stdout_path
    process.stderr_path = stderr_path
    return process


# processes, from /proc -------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text_ = stat.read_text()
        except OSError:
            continue
        if int(text_[text_.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return state[state.rindex(")") + 2] == "Z"  # a zombie sends nothing


# PostgreSQL ------------------------------------------------------------------------------------
# Tests reach PostgreSQL as operators run syncer: as an ordinary role. Each test database is
# created by the superuser (PG_ADMIN_URL) and OWNED by PG_ROLE, which can log in and nothing
# more (no superuser, CREATEDB, CREATEROLE, REPLICATION or BYPASSRLS; no pg_* role). As the
# database owner it owns schema ``public`` (PostgreSQL 15: ``pg_database_owner``), so migrations
# and tests create their tables there. Trust auth on 127.0.0.1: no passwords.
# A test that genuinely needs a superuser (to create roles, or to prove that a superuser source
# is refused) connects with ``pg_database_url(name, role=PG_ADMIN_ROLE)`` or ``pg_admin()``.

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_ADMIN_ROLE = "postgres"
PG_ADMIN_URL = f"postgresql://{PG_ADMIN_ROLE}@{PG_HOST}:{PG_PORT}/postgres"  # a libpq DSN
PG_ROLE = "syncer_test"
PG_DATABASE_PREFIX = "syncer_t_"
# Roles are cluster-wide: every pytest-xdist worker creates PG_ROLE under this advisory lock.
_PG_ROLE_LOCK = 0x5359_4E43_4552  # "SYNCER"

_pg_role_ready = False


def pg_database_url(name: str, *, role: str = PG_ROLE) -> str:
    """The SQLAlchemy URL of database ``name`` as ``role`` (PG_ROLE unless told otherwise)."""
    return f"postgresql+psycopg://{role}@{PG_HOST}:{PG_PORT}/{name}"


def pg_admin() -> psycopg.Connection[tuple[Any, ...]]:
    """An autocommit connection as the superuser; fails the test (no traceback) when
    PostgreSQL is not reachable."""
    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        problem = " ".join(str(exc).split())
    # outside the except block, so the report is one message, not a chained traceback
    pytest.fail(
        f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({problem}); "
        f"start it with trust auth on {PG_HOST}:{PG_PORT}",
        pytrace=False,
    )


def ensure_pg_role() -> None:
    """Create PG_ROLE once per cluster (idempotent, safe when several workers start at once)
    and make sure it holds no privilege beyond logging in."""
    global _pg_role_ready
    if _pg_role_ready:
        return
    role = sql.Identifier(PG_ROLE)
    with pg_admin() as admin, admin.transaction():
        admin.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_ROLE_LOCK,))
        exists = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PG_ROLE,)).fetchone()
        if exists is None:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(role))
        admin.execute(
            sql.SQL(
                "ALTER ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
            ).format(role)
        )
        granted = admin.execute(
            "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
            "JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = %s "
            # a test's own reader roles (tests.integration.conftest.pg_reader_role) stay
            "AND g.rolname NOT LIKE %s",
            (PG_ROLE, f"{PG_DATABASE_PREFIX}%"),
        ).fetchall()
        for (group,) in granted:
            admin.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(group), role))
    _pg_role_ready = True


def create_pg_database(name: str | None = None, *, template: str | None = None) -> str:
    """Create a database owned by PG_ROLE (a fresh random name unless given; a copy of
    ``template`` when given) and return its name."""
    ensure_pg_role()
    name = name or f"{PG_DATABASE_PREFIX}{secrets.token_hex(6)}"
    statement = sql.SQL("CREATE DATABASE {} OWNER {}").format(
        sql.Identifier(name), sql.Identifier(PG_ROLE)
    )
    if template is not None:
        statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with pg_admin() as admin:
        admin.execute(statement)
    return name


def drop_pg_database(name: str) -> None:
    """Drop database ``name`` (if it exists), cutting its connections."""
    with pg_admin() as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@contextlib.contextmanager
def postgres_database(prefix: str = PG_DATABASE_PREFIX) -> Iterator[str]:
    """A fresh database owned by PG_ROLE; yields its URL as PG_ROLE, drops it afterwards."""
    name = create_pg_database(f"{prefix}{secrets.token_hex(6)}")
    try:
        yield pg_database_url(name)
    finally:
        drop_pg_database(name)
