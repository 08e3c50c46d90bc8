"""Bad input, end to end: exit 2, one line on stderr naming the problem, and nothing written.

Every case runs on its own copy of one prepared state database (a file copy on SQLite, a
``CREATE DATABASE … TEMPLATE`` on PostgreSQL), so the cases are independent: they are all run
up front, two at a time (each ``syncer`` start costs seconds of CPU), and each test then checks
its own case: the error line, and that the state database and the warehouse are unchanged,
compared table by table, row by row (and any file the case gave the command, byte for byte).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.e2e.conftest import SECRET_ENV, Dump, Project, assert_usage_error, new_project
from tests.helpers import (
    cli_command,
    cli_env,
    create_pg_database,
    drop_pg_database,
    pg_database_url,
    postgres_database,
)
from tests.receiver import Receiver

USERS = ["u1", "u2", "u3", "u4", "u5"]
GOOD_URL = "http://127.0.0.1:9/never-called"
GOOD_SQL = "SELECT user_id FROM users"
UNSET_VAR = "SYNCER_E2E_SURELY_UNSET_VARIABLE"
UNKNOWN = "no_such_audience"
EXISTING = "existing_audience"

SettingsMaker = Callable[[Project], Path]


def _broken_toml(p: Project) -> Path:
    path = p.root / "broken.toml"
    path.write_text(f'[database]\nurl = "{p.state_url}\n[tray\n', encoding="utf-8")
    return path


def _settings(**options: object) -> SettingsMaker:
    def make(p: Project) -> Path:
        merged: dict[str, object] = {"workflow_urls": [GOOD_URL]}
        merged.update(options)
        return p.write_settings("case.toml", **merged)

    return make


def _unset_variable(p: Project) -> Path:
    assert UNSET_VAR not in os.environ
    return _settings(shared_secret=f"${{{UNSET_VAR}}}")(p)


def _missing(p: Project) -> Path:
    return p.root / "missing.toml"


@dataclass(frozen=True, kw_only=True)
class Case:
    id: str
    args: tuple[str, ...]
    names: tuple[str, ...]  # what the error line must mention
    settings: SettingsMaker | None = None
    empty_state: bool = False  # run against a state database that never saw `db upgrade`
    # written in the project folder before the command, and unchanged after it
    files: tuple[tuple[str, bytes], ...] = ()
    absent: tuple[str, ...] = ()  # never in stdout or stderr (secrets in bad URLs)
    # Run as a user who can read the state database but not write it: its "file" only, or the
    # file and its "folder" too (as root: as nobody, since chmod does not stop root).
    read_only: str | None = None
    env: tuple[tuple[str, str], ...] = ()  # more environment variables for the command


def _create(name: str, sql_text: str = GOOD_SQL, *more: str) -> tuple[str, ...]:
    return ("audience", "create", name, "--sql", sql_text, *more)


WRITES = {
    "sql-delete": "DELETE FROM users",
    "sql-drop": "DROP TABLE users",
    "sql-insert": "INSERT INTO users VALUES ('x','y','z')",
    "sql-select-then-drop": "SELECT 1; DROP TABLE users",
    # closes the subquery the definition is wrapped in, commits the read-only transaction, writes
    "sql-injected-commit-delete": (
        "SELECT user_id FROM users) AS x; COMMIT; DELETE FROM users; "
        "SELECT * FROM (SELECT 'u1' AS user_id"
    ),
}

SQL_CASES = [
    Case(id="sql-unknown-table", args=_create("Bad Table", "SELECT user_id FROM no_such_table"),
         names=("no_such_table",)),
    *(Case(id=case_id, args=_create(f"Bad {case_id}", text), names=("SQL",))
      for case_id, text in WRITES.items()),
    Case(id="sql-two-columns-no-user-id", args=_create("Two Columns", "SELECT email, plan FROM users"),
         names=("user_id",)),
    Case(id="update-sql-writes", args=("audience", "update", EXISTING, "--sql", "DELETE FROM users"),
         names=("SQL",)),
]  # fmt: skip

CASES = [
    Case(id="settings-broken-toml", args=_create("New One"), names=("TOML",), settings=_broken_toml),
    Case(id="settings-unknown-tray-key", args=_create("New One"), names=("bogus_option",),
         settings=_settings(tray={"bogus_option": 1})),
    Case(id="settings-11-workflow-urls", args=_create("New One"), names=("11", "workflow_urls"),
         settings=_settings(workflow_urls=[f"https://w{i}.trayapp.io" for i in range(11)])),
    Case(id="settings-ftp-url", args=_create("New One"), names=("workflow_urls", "http"),
         settings=_settings(workflow_urls=["ftp://files.example.com/hook"]), absent=("/hook",)),
    Case(id="settings-unset-variable", args=_create("New One"), names=(UNSET_VAR,),
         settings=_unset_variable),
    Case(id="settings-file-missing", args=_create("New One"), names=("missing.toml",),
         settings=_missing),
    Case(id="sync-without-workflow-urls", args=("sync",), names=("workflow_urls",),
         settings=_settings(workflow_urls=None)),
    Case(id="every-3x", args=_create("New One", GOOD_SQL, "--every", "3x"), names=("3x",)),
    Case(id="cron-61", args=_create("New One", GOOD_SQL, "--cron", "61 * * * *"),
         names=("61 * * * *",)),
    Case(id="update-every-3x", args=("audience", "update", EXISTING, "--every", "3x"),
         names=("3x",)),
    Case(id="every-and-cron", args=_create("New One", GOOD_SQL, "--every", "1h", "--cron", "0 * * * *"),
         names=("--every", "--cron")),
    Case(id="update-nothing", args=("audience", "update", EXISTING), names=("--sql",)),
    Case(id="name-empty", args=_create(""), names=("name",)),
    Case(id="name-no-letters", args=_create("!!!"), names=("!!!",)),
    Case(id="name-taken", args=_create("Existing Audience"), names=(EXISTING,)),
    Case(id="show-unknown", args=("audience", "show", UNKNOWN), names=(UNKNOWN,)),
    Case(id="update-unknown", args=("audience", "update", UNKNOWN, "--sql", GOOD_SQL),
         names=(UNKNOWN,)),
    Case(id="pause-unknown", args=("audience", "pause", UNKNOWN), names=(UNKNOWN,)),
    Case(id="delete-unknown", args=("audience", "delete", UNKNOWN), names=(UNKNOWN,)),
    Case(id="sync-unknown", args=("sync", UNKNOWN), names=(UNKNOWN,)),
    Case(id="sync-known-and-unknown", args=("sync", EXISTING, UNKNOWN), names=(UNKNOWN,)),
    Case(id="history-unknown", args=("history", UNKNOWN), names=(UNKNOWN,)),
    Case(id="history-limit-0", args=("history", "--limit", "0"), names=("--limit",)),
    Case(id="unknown-subcommand", args=("frobnicate",), names=("frobnicate",)),
    Case(id="missing-sql", args=("audience", "create", "New One"), names=("--sql",)),
    Case(id="no-schema", args=("audience", "list"), names=("syncer db upgrade",),
         empty_state=True),
    *SQL_CASES,
]  # fmt: skip

NOT_UTF8 = "caf\udcc3"  # the bytes b"caf\xc3" as Python passes them on: not UTF-8
HUGE = "9" * 30
DEEP = 3000  # nesting levels: far past any recursion limit
NOBODY = 65534  # the unprivileged user of the read-only cases, when the tests run as root
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")


def _deep_toml(opening: str, closing: str) -> SettingsMaker:
    def make(p: Project) -> Path:
        path = p.root / "deep.toml"
        deep = opening * DEEP + "1" + closing * DEEP
        path.write_text(f'[database]\nurl = "{p.state_url}"\n[tray]\nx = {deep}\n', "utf-8")
        return path

    return make


def _state_file(name: str, *, scheme: str = "sqlite") -> SettingsMaker:
    """Settings whose state database is ``name`` in the project folder (written or not)."""

    def make(p: Project) -> Path:
        return _settings(state_url=f"{scheme}:///{p.root / name}")(p)

    return make


NO_SUCH_PG_DRIVER = "postgresql+nosuchdriver://syncer@127.0.0.1/db"
SECRET_PATH = "s3cret-path-part"
IDS = "ids.txt"
MINE = (("mine.txt", b"not the demo's\n"),)

DRIVER_CASES = [
    Case(id="state-driver-unknown", args=("audience", "list"), names=("nosuchdriver", "install"),
         settings=_settings(state_url=NO_SUCH_PG_DRIVER)),
    Case(id="state-driver-unknown-db-upgrade", args=("db", "upgrade"), names=("nosuchdriver",),
         settings=_settings(state_url=NO_SUCH_PG_DRIVER)),
    Case(id="state-sqlite-driver-unknown", args=_create("New One"), names=("sqlite+foo",),
         settings=_state_file("state.db", scheme="sqlite+foo")),
    Case(id="source-driver-unknown-sync", args=("sync",), names=("nosuchdriver",),
         settings=_settings(sources={"default": NO_SUCH_PG_DRIVER})),
    Case(id="source-driver-unknown-create", args=_create("New One"), names=("nosuchdriver",),
         settings=_settings(sources={"default": NO_SUCH_PG_DRIVER})),
    Case(id="source-mysql-driver-unknown-serve", args=("serve",), names=("mysql+nosuch",),
         settings=_settings(sources={"default": "mysql+nosuch://root@127.0.0.1/db"})),
]  # fmt: skip
STATE_CASES = [
    Case(id="state-not-a-database", args=("audience", "list"), names=("not a database",),
         settings=_state_file("notes.db"), files=(("notes.db", b"plain text, not SQLite\n"),)),
    Case(id="state-not-a-database-create", args=_create("New One"), names=("not a database",),
         settings=_state_file("notes.db"), files=(("notes.db", b"plain text, not SQLite\n"),)),
    Case(id="state-in-missing-folder", args=("audience", "list"), names=("unable to open",),
         settings=_state_file("no-such-folder/state.db")),
    Case(id="state-is-a-folder", args=_create("New One"), names=("not a regular file",),
         settings=_state_file(".")),
    Case(id="state-is-dev-null-db-upgrade", args=("db", "upgrade"),
         names=("/dev/null", "not a regular file"), settings=_settings(state_url="sqlite:////dev/null")),
    Case(id="source-is-dev-zero", args=_create("New One"), names=("/dev/zero", "not a regular file"),
         settings=_settings(sources={"default": "sqlite:////dev/zero"})),
    Case(id="state-read-only-file-create", args=_create("New One"), names=("readonly", "write"),
         read_only="file"),
    Case(id="state-read-only-file-sync", args=("sync",), names=("readonly", "write"),
         read_only="file"),
    Case(id="state-read-only-file-pause", args=("audience", "pause", EXISTING),
         names=("readonly",), read_only="file"),
    Case(id="state-read-only-folder-delete-user", args=("users", "delete", "u1"),
         names=("state database",), read_only="folder"),
    Case(id="state-read-only-folder-serve", args=("serve",), names=("state database",),
         read_only="folder"),
]  # fmt: skip
SETTINGS_CASES = [
    Case(id="settings-deep-arrays", args=_create("New One"),
         names=("deep.toml", "nested too deeply"), settings=_deep_toml("[", "]")),
    Case(id="settings-deep-inline-tables", args=("audience", "list"), names=("nested too deeply",),
         settings=_deep_toml("{a = ", "}")),
    Case(id="settings-duration-not-one", args=_create("New One"), names=("default_every", "3x"),
         settings=_settings(extra='[schedule]\ndefault_every = "3x"')),
    Case(id="settings-duration-too-long", args=("sync",), names=("default_every",),
         settings=_settings(extra='[schedule]\ndefault_every = "3000000d"')),
    Case(id="settings-max-age-too-long", args=("sync",), names=("max_age",),
         settings=_settings(tray={"max_age": "999999999999d"})),
    Case(id="settings-url-port-past-65535", args=_create("New One"), names=("workflow_urls",),
         settings=_settings(workflow_urls=[f"https://w1.trayapp.io:70000/{SECRET_PATH}"]),
         absent=(SECRET_PATH,)),
    Case(id="settings-url-crlf", args=_create("New One"), names=("workflow_urls",),
         settings=_settings(workflow_urls=[f"https://w1.trayapp.io/{SECRET_PATH}\r\nX-Evil: 1"]),
         absent=(SECRET_PATH,)),
    Case(id="settings-url-userinfo", args=_create("New One"), names=("workflow_urls",),
         settings=_settings(workflow_urls=[f"https://user:hunter2@w1.trayapp.io/{SECRET_PATH}"]),
         absent=(SECRET_PATH, "hunter2")),
    Case(id="settings-url-past-the-column", args=_create("New One"), names=("workflow_urls",),
         settings=_settings(workflow_urls=[f"https://w1.trayapp.io/{SECRET_PATH * 400}"]),
         absent=(SECRET_PATH,)),
    Case(id="settings-state-url-nul", args=("audience", "list"), names=("[database] url",),
         settings=_settings(state_url="sqlite:///state\x00.db")),
    Case(id="settings-url-space-in-host", args=_create("New One"), names=("workflow_urls",),
         settings=_settings(workflow_urls=[f"https://w 1.trayapp.io/{SECRET_PATH}"]),
         absent=(SECRET_PATH,)),
]  # fmt: skip
BAD_VAR = "SYNCER_E2E_BAD_VARIABLE"


def _settings_bytes(content: bytes) -> SettingsMaker:
    def make(p: Project) -> Path:
        path = p.root / "odd.toml"
        path.write_bytes(content)
        return path

    return make


def _settings_fifo(p: Project) -> Path:
    """A FIFO nobody writes to: opening it to read would wait forever."""
    path = p.root / "fifo.toml"
    os.mkfifo(path)
    return path


HOSTILE_SETTINGS_CASES = [
    Case(id="settings-a-fifo", args=("audience", "list"), names=("fifo.toml", "not a regular file"),
         settings=_settings_fifo),
    Case(id="settings-past-the-size-cap", args=("audience", "list"), names=("odd.toml", "larger"),
         settings=_settings_bytes(b"# " + b"x" * (2 * 1024 * 1024) + b"\n")),
    Case(id="settings-utf-16", args=("audience", "list"), names=("UTF-16",),
         settings=_settings_bytes('[tray]\nmax_attempts = 3\n'.encode("utf-16"))),
    Case(id="settings-sqlite-mode-memory", args=("db", "upgrade"), names=("?options", "mode"),
         settings=lambda p: _settings(state_url=f"{p.state_url}?mode=memory")(p)),
    Case(id="settings-sqlite-check-same-thread", args=("audience", "list"),
         names=("check_same_thread",),
         settings=lambda p: _settings(state_url=f"{p.state_url}?check_same_thread=false")(p)),
    Case(id="settings-state-port-not-a-number", args=("audience", "list"), names=("[database] url",),
         settings=_settings(state_url="postgresql://syncer@127.0.0.1:abc/db")),
    Case(id="settings-pg-connect-timeout-not-a-number", args=("audience", "list"),
         names=("connect_timeout",),
         settings=_settings(state_url="postgresql://syncer@127.0.0.1:1/db?connect_timeout=abc")),
    Case(id="settings-source-name-odd", args=_create("New One"), names=("source name",),
         settings=_settings(sources={"default": "sqlite:///w.db", "a b/../c": "sqlite:///w.db"})),
    Case(id="settings-default-every-1s1s", args=_create("New One"), names=("default_every", "1s1s"),
         settings=_settings(extra='[schedule]\ndefault_every = "1s1s"')),
    Case(id="settings-secret-variable-not-utf8", args=("sync",), names=("shared_secret", "UTF-8"),
         settings=_settings(shared_secret=f"${{{BAD_VAR}}}"), env=((BAD_VAR, "s3cr\udcffet"),),
         absent=("s3cr",)),
    Case(id="settings-secret-variable-crlf", args=("sync",), names=("shared_secret",),
         settings=_settings(shared_secret=f"${{{BAD_VAR}}}"), env=((BAD_VAR, "s3cret\r\n"),),
         absent=("s3cret",)),
    Case(id="settings-state-variable-not-utf8", args=("db", "upgrade"), names=("[database] url",),
         settings=_settings(state_url=f"${{{BAD_VAR}}}"), env=((BAD_VAR, "sqlite:///st\udcff.db"),)),
    Case(id="every-1s1s", args=_create("New One", GOOD_SQL, "--every", "1s1s"), names=("1s1s",)),
    Case(id="cron-fullwidth-digit", args=_create("New One", GOOD_SQL, "--cron", "\uff10 0 * * *"),
         names=("--cron", "ASCII")),
    Case(id="users-file-dev-zero", args=("users", "delete", "--file", "/dev/zero"),
         names=("/dev/zero", "larger")),
]  # fmt: skip
TEXT_CASES = [
    Case(id="name-not-utf8", args=_create(NOT_UTF8), names=("NAME", "UTF-8")),
    Case(id="sql-not-utf8", args=_create("New One", f"SELECT '{NOT_UTF8}' AS user_id"),
         names=("--sql", "UTF-8")),
    Case(id="sql-empty", args=_create("New One", ""), names=("SQL",)),
    Case(id="sql-comment-only", args=_create("New One", "-- nothing here"), names=("SQL",)),
    Case(id="sql-two-selects", args=_create("New One", f"{GOOD_SQL}; {GOOD_SQL}"), names=("SQL",)),
    Case(id="sql-attach", args=_create("New One", "ATTACH DATABASE 'x.db' AS x"), names=("SQL",)),
    Case(id="sql-pragma", args=_create("New One", "PRAGMA journal_mode=DELETE"), names=("SQL",)),
    Case(id="name-past-the-column", args=_create("N" * 5000), names=("name", "longer")),
    Case(id="users-delete-id-past-the-column", args=("users", "delete", "u" * 5000),
         names=("user id", "longer")),
    Case(id="sync-key-not-utf8", args=("sync", NOT_UTF8), names=("KEY", "UTF-8")),
    Case(id="show-key-not-utf8", args=("audience", "show", NOT_UTF8), names=("KEY", "UTF-8")),
    Case(id="update-sql-not-utf8", args=("audience", "update", EXISTING, "--sql", NOT_UTF8),
         names=("--sql", "UTF-8")),
    Case(id="users-delete-id-not-utf8", args=("users", "delete", "u1", NOT_UTF8),
         names=("USER_ID", "UTF-8")),
    Case(id="users-restore-id-not-utf8", args=("users", "restore", NOT_UTF8),
         names=("USER_ID", "UTF-8")),
    Case(id="users-file-not-utf8", args=("users", "delete", "--file", IDS),
         names=(f"{IDS}:2", "UTF-8"), files=((IDS, b"u1\ncaf\xc3\nu2\n"),)),
    Case(id="users-file-latin1-after-bom", args=("users", "delete", "--file", IDS),
         names=(f"{IDS}:1", "UTF-8"), files=((IDS, b"\xef\xbb\xbfcaf\xe9\n"),)),
    Case(id="users-file-nul", args=("users", "delete", "--file", IDS), names=(f"{IDS}:3", "NUL"),
         files=((IDS, b"u1\nu2\nu\x003\n"),)),
    Case(id="users-file-missing", args=("users", "delete", "--file", "no-such-ids.txt"),
         names=("no-such-ids.txt",)),
    Case(id="users-file-a-folder", args=("users", "delete", "--file", "."),
         names=("directory",)),
    Case(id="users-file-only-blank-lines", args=("users", "delete", "--file", IDS),
         names=("user id",), files=((IDS, b"\xef\xbb\xbf\n  \n\r\n"),)),
]  # fmt: skip
ARGUMENT_CASES = [
    Case(id="history-limit-past-64-bits", args=("history", "--limit", HUGE), names=("--limit",)),
    Case(id="deliveries-limit-past-64-bits", args=("deliveries", "--limit", HUGE),
         names=("--limit",)),
    Case(id="deliveries-limit-5000-digits", args=("deliveries", "--limit", "9" * 5000),
         names=("--limit",)),
    Case(id="deliveries-limit-negative", args=("deliveries", "--limit", "-1"), names=("--limit",)),
    Case(id="history-limit-not-a-number", args=("history", "--limit", "ten"),
         names=("--limit", "ten")),
    Case(id="demo-dir-a-file", args=("demo", "--dir", "mine.txt"), names=("--dir", "mine.txt"),
         files=MINE),
    Case(id="demo-dir-under-a-file", args=("demo", "--dir", "mine.txt/demo"), names=("mine.txt",),
         files=MINE),
    Case(id="demo-warehouse-exists", args=("demo", "--warehouse", "mine.txt"),
         names=("mine.txt", "exists"), files=MINE),
    Case(id="demo-warehouse-in-missing-folder", args=("demo", "--warehouse", "nowhere/w.db"),
         names=("nowhere",)),
    Case(id="demo-users-past-64-bits", args=("demo", "--users", HUGE), names=("--users",)),
    Case(id="demo-dir-and-warehouse", args=("demo", "--dir", "d", "--warehouse", "w.db"),
         names=("--dir", "--warehouse")),
]  # fmt: skip
CASES += [
    *DRIVER_CASES,
    *STATE_CASES,
    *SETTINGS_CASES,
    *HOSTILE_SETTINGS_CASES,
    *TEXT_CASES,
    *ARGUMENT_CASES,
]

# On PostgreSQL, the cases that reach the database (statements that are not a SELECT at all are
# refused before any database sees them, the same way on every backend).
REACH_THE_DATABASE = {
    "sql-unknown-table",
    "sql-select-then-drop",
    "sql-injected-commit-delete",
    "sql-two-columns-no-user-id",
}
POSTGRES_CASES = [
    *(case for case in SQL_CASES if case.id in REACH_THE_DATABASE),
    Case(id="no-schema", args=("audience", "list"), names=("syncer db upgrade",),
         empty_state=True),
]  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Outcome:
    result: subprocess.CompletedProcess[str]
    state_before: Dump
    state_after: Dump
    warehouse_before: Dump
    warehouse_after: Dump


class Bed:
    """A prepared state database (one audience) and a warehouse, copied for each case."""

    def __init__(self, make_copy: Callable[[Case], Project]) -> None:
        self.make_copy = make_copy

    def run_all(self, cases: list[Case]) -> dict[str, Outcome]:
        copies = [self.make_copy(case) for case in cases]  # sequentially: TEMPLATE needs it

        def run(case: Case, p: Project) -> Outcome:
            for name, content in case.files:
                (p.root / name).write_bytes(content)
            state_before, warehouse_before = p.dump(), p.warehouse_dump()
            settings = case.settings(p) if case.settings else p.settings
            if case.read_only:
                result = _run_read_only(p, case, settings)
            else:
                result = p.cli(*case.args, settings=settings, check=None, env=dict(case.env))
            for name, content in case.files:
                assert (p.root / name).read_bytes() == content, f"{case.id}: {name} changed"
            return Outcome(
                result=result,
                state_before=state_before,
                state_after=p.dump(),
                warehouse_before=warehouse_before,
                warehouse_after=p.warehouse_dump(),
            )

        with ThreadPoolExecutor(max_workers=2) as pool:
            outcomes = pool.map(run, cases, copies)
            return dict(zip((c.id for c in cases), outcomes, strict=True))


def _prepare(template: Project) -> None:
    template.cli("db", "upgrade")
    template.cli("audience", "create", "Existing Audience", "--sql", GOOD_SQL)


def _run_read_only(p: Project, case: Case, settings: Path) -> subprocess.CompletedProcess[str]:
    """The command as a user who may read the state database but not write it."""
    state = Path(p.state_url.removeprefix("sqlite:///"))
    if os.geteuid() != 0:
        modes = [(state, 0o444)] + ([(p.root, 0o555)] if case.read_only == "folder" else [])
        for path, mode in modes:
            path.chmod(mode)
        try:
            return p.cli(*case.args, settings=settings, check=None)
        finally:
            for path, _ in reversed(modes):
                path.chmod(0o755 if path.is_dir() else 0o644)
    # root writes whatever the modes say: run as nobody, with the folder theirs or not
    if case.read_only == "file":
        os.chown(p.root, NOBODY, -1)
    result = subprocess.run(
        [*AS_NOBODY, *cli_command(*case.args, settings=settings)],
        cwd=p.root,
        env=cli_env(p.env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    p.outputs += [result.stdout, result.stderr]
    return result


@pytest.fixture(scope="module")
def sqlite_outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    root = tmp_path_factory.mktemp("bad-input-sqlite")
    # pytest's folders are the owner's alone; another user's commands need one they can enter
    shared = Path(tempfile.mkdtemp(prefix="syncer-bad-input-"))
    shared.chmod(0o755)
    template_state = root / "template" / "state.db"
    template = new_project(
        root / "template", f"sqlite:///{template_state}", USERS, workflow_urls=[GOOD_URL]
    )
    _prepare(template)

    def make_copy(case: Case) -> Project:
        folder = (shared if case.read_only else root) / case.id
        folder.mkdir()
        if not case.empty_state:
            for suffix in ("", "-wal"):  # a WAL left behind holds committed data too
                if Path(f"{template_state}{suffix}").exists():
                    shutil.copy(f"{template_state}{suffix}", folder / f"state.db{suffix}")
        shutil.copy(template.root / "warehouse.db", folder / "warehouse.db")
        return new_project(
            folder, f"sqlite:///{folder / 'state.db'}", USERS, workflow_urls=[GOOD_URL]
        )

    try:
        yield Bed(make_copy).run_all(CASES)
    finally:
        shutil.rmtree(shared)


def _postgres_project(folder: Path, url: str, source_url: str) -> Project:
    """Audience SQL runs on PostgreSQL: a source database of its own (a source that is the
    state database needs a read_role, which tests/integration covers)."""
    folder.mkdir()
    p = Project(root=folder, state_url=url, warehouse_url=source_url, settings=folder)
    p.settings = p.write_settings(workflow_urls=[GOOD_URL])
    return p


@pytest.fixture(scope="module")
def postgres_outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    root = tmp_path_factory.mktemp("bad-input-postgres")
    with postgres_database() as url, postgres_database() as source_url:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(source_url.replace("+psycopg", "")) as conn, conn.cursor() as cursor:
            cursor.execute("CREATE TABLE users (user_id TEXT, email TEXT, plan TEXT)")
            cursor.executemany(
                "INSERT INTO users VALUES (%s, %s, 'pro')", [(u, f"{u}@example.com") for u in USERS]
            )
        _prepare(_postgres_project(root / "template", url, source_url))
        copies: list[str] = []

        def make_copy(case: Case) -> Project:
            copy = f"{name}_{len(copies)}"
            create_pg_database(copy, template=None if case.empty_state else name)
            copies.append(copy)
            return _postgres_project(root / case.id, pg_database_url(copy), source_url)

        try:
            yield Bed(make_copy).run_all(POSTGRES_CASES)
        finally:
            for copy in copies:
                drop_pg_database(copy)


def _check(outcome: Outcome, case: Case) -> None:
    assert_usage_error(outcome.result, *case.names)
    for text in case.absent:
        assert text not in outcome.result.stdout + outcome.result.stderr, f"{text!r} shown"
    assert outcome.state_after == outcome.state_before, "the state database changed"
    assert outcome.warehouse_after == outcome.warehouse_before, "the warehouse changed"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_sqlite(sqlite_outcomes: dict[str, Outcome], case: Case) -> None:
    _check(sqlite_outcomes[case.id], case)


@pytest.mark.postgres
@pytest.mark.parametrize("case", POSTGRES_CASES, ids=[c.id for c in POSTGRES_CASES])
def test_bad_input_postgres(postgres_outcomes: dict[str, Outcome], case: Case) -> None:
    _check(postgres_outcomes[case.id], case)


def test_a_byte_order_mark_is_not_part_of_the_first_id(
    tmp_path: Path, project_factory: Callable[..., Project], secret_receiver: Receiver
) -> None:
    """A file saved by an editor that starts it with a UTF-8 byte-order mark: the first id is
    the user's, so that user is the one deleted (and told to Tray), and nobody else."""
    url = secret_receiver.url("w1")
    p = project_factory(
        f"sqlite:///{tmp_path / 'state.db'}",
        USERS,
        workflow_urls=[url],
        shared_secret=f"${{{SECRET_ENV}}}",
    )
    p.cli("db", "upgrade")
    p.cli("audience", "create", "Everyone", "--sql", GOOD_SQL)
    p.cli("sync")
    (p.root / IDS).write_bytes(b"\xef\xbb\xbfu1\r\nu2\r\n")
    result = p.cli("users", "delete", "--file", IDS)
    assert result.stdout.startswith("2 users deleted"), result.stdout
    # deletes go out concurrently: the order they arrive in is not the file's
    assert sorted(secret_receiver.deletes("w1")) == ["u1", "u2"]
    assert {c.user_id for c in secret_receiver.accepted("w1")} == set(USERS)  # no "\ufeffu1"
    dump = "\n".join(line for rows in p.dump().values() for line in rows)
    assert "\ufeff" not in dump and "\\ufeff" not in dump
    assert all(f"'{user}'" not in dump for user in ("u1", "u2")), "deleted users still stored"
