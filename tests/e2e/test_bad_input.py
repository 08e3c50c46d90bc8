"""Bad input, end to end: exit 2, one line on stderr naming the problem, and nothing written.

Every case runs on its own copy of one prepared state database (a file copy on SQLite, a
``CREATE DATABASE … TEMPLATE`` on PostgreSQL), so the cases are independent: they are all run
up front, two at a time (each ``syncer`` start costs seconds of CPU), and each test then checks
its own case: the error line, and that the state database and the warehouse are unchanged,
compared table by table, row by row.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.e2e.conftest import Dump, Project, assert_usage_error, new_project
from tests.helpers import create_pg_database, drop_pg_database, pg_database_url, postgres_database

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
    Case(id="settings-ftp-url", args=_create("New One"), names=("ftp://files.example.com/hook",),
         settings=_settings(workflow_urls=["ftp://files.example.com/hook"])),
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
            state_before, warehouse_before = p.dump(), p.warehouse_dump()
            settings = case.settings(p) if case.settings else p.settings
            result = p.cli(*case.args, settings=settings, check=None)
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


@pytest.fixture(scope="module")
def sqlite_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("bad-input-sqlite")
    template_state = root / "template" / "state.db"
    template = new_project(
        root / "template", f"sqlite:///{template_state}", USERS, workflow_urls=[GOOD_URL]
    )
    _prepare(template)

    def make_copy(case: Case) -> Project:
        folder = root / case.id
        folder.mkdir()
        if not case.empty_state:
            for suffix in ("", "-wal"):  # a WAL left behind holds committed data too
                if Path(f"{template_state}{suffix}").exists():
                    shutil.copy(f"{template_state}{suffix}", folder / f"state.db{suffix}")
        shutil.copy(template.root / "warehouse.db", folder / "warehouse.db")
        return new_project(
            folder, f"sqlite:///{folder / 'state.db'}", USERS, workflow_urls=[GOOD_URL]
        )

    return Bed(make_copy).run_all(CASES)


def _postgres_project(folder: Path, url: str) -> Project:
    """The source is the state database itself: audience SQL runs on PostgreSQL."""
    folder.mkdir()
    p = Project(root=folder, state_url=url, warehouse_url=url, settings=folder)
    p.settings = p.write_settings(sources={}, workflow_urls=[GOOD_URL])
    return p


@pytest.fixture(scope="module")
def postgres_outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    root = tmp_path_factory.mktemp("bad-input-postgres")
    with postgres_database() as url:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(url.replace("+psycopg", "")) as conn, conn.cursor() as cursor:
            cursor.execute("CREATE TABLE users (user_id TEXT, email TEXT, plan TEXT)")
            cursor.executemany(
                "INSERT INTO users VALUES (%s, %s, 'pro')", [(u, f"{u}@example.com") for u in USERS]
            )
        _prepare(_postgres_project(root / "template", url))
        copies: list[str] = []

        def make_copy(case: Case) -> Project:
            copy = f"{name}_{len(copies)}"
            create_pg_database(copy, template=None if case.empty_state else name)
            copies.append(copy)
            return _postgres_project(root / case.id, pg_database_url(copy))

        try:
            yield Bed(make_copy).run_all(POSTGRES_CASES)
        finally:
            for copy in copies:
                drop_pg_database(copy)


def _check(outcome: Outcome, case: Case) -> None:
    assert_usage_error(outcome.result, *case.names)
    assert outcome.state_after == outcome.state_before, "the state database changed"
    assert outcome.warehouse_after == outcome.warehouse_before, "the warehouse changed"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_sqlite(sqlite_outcomes: dict[str, Outcome], case: Case) -> None:
    _check(sqlite_outcomes[case.id], case)


@pytest.mark.postgres
@pytest.mark.parametrize("case", POSTGRES_CASES, ids=[c.id for c in POSTGRES_CASES])
def test_bad_input_postgres(postgres_outcomes: dict[str, Outcome], case: Case) -> None:
    _check(postgres_outcomes[case.id], case)
