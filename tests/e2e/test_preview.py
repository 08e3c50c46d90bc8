"""``syncer audience preview`` and ``syncer sync --dry-run`` end to end: the real command in a
subprocess, the state database on SQLite and PostgreSQL, a loopback receiver as Tray.

"Nothing written" is a dump of every row of every table of the state database, compared
before and after; "nothing sent" is the receiver's count of requests."""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import make_url

from tests.e2e.conftest import Project, assert_usage_error
from tests.helpers import (
    PG_ADMIN_ROLE,
    PG_DATABASE_PREFIX,
    PG_HOST,
    PG_PORT,
    make_warehouse,
    pg_admin,
)
from tests.receiver import Receiver

KEY_A = "pro_users"
NAME_A = "Pro Users"
SQL_A = "SELECT user_id FROM users WHERE plan = 'pro'"
KEY_B = "first_five"
NAME_B = "First Five"
SQL_B = "SELECT user_id FROM users WHERE user_id <= 'u05'"
USERS = [f"u{i:02d}" for i in range(1, 21)]

ProjectFactory = Callable[..., Project]


def _json(project: Project, *args: str) -> object:
    return json.loads(project.cli(*args).stdout)


def _rename_warehouse_table(project: Project, old: str, new: str) -> None:
    path = project.warehouse_url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(f"ALTER TABLE {old} RENAME TO {new}")


def test_preview_and_dry_run_write_nothing_and_send_nothing(
    project_factory: ProjectFactory, state_url: str, secret_receiver: Receiver, tmp_path: Path
) -> None:
    rx = secret_receiver
    other = make_warehouse(tmp_path / "other.db", ["x1", "x2", "x3", "", None])
    p = project_factory(state_url, USERS, workflow_urls=[rx.url("w1")])
    p.settings = p.write_settings(
        workflow_urls=[rx.url("w1")],
        shared_secret="${TRAY_SHARED_SECRET}",
        sources={"default": p.warehouse_url, "other": other},
    )
    p.cli("db", "upgrade")
    p.cli_many(
        ("audience", "create", NAME_A, "--sql", SQL_A),
        ("audience", "create", NAME_B, "--sql", SQL_B),
    )
    first = _json(p, "audience", "preview", KEY_A, "--json", "--sample", "3")
    assert first == {
        "audience_key": KEY_A,
        "members": 20,
        "entering": 20,
        "leaving": 0,
        "skipped": 0,
        "sample": ["u01", "u02", "u03"],
        "sample_entering": ["u01", "u02", "u03"],
        "sample_leaving": [],
        "held": False,
        "approved": False,
        "initial": True,
    }
    p.cli("sync", KEY_A)
    p.cli("audience", "pause", KEY_B)
    sent = len(rx.requests())
    assert sent == 20

    p.set_users([*USERS[2:], "u21", "u22"])  # u01, u02 leave; u21, u22 enter
    before = p.dump()

    shown, text, by_sql, every, some, every_text = p.cli_many(
        ("audience", "preview", KEY_A, "--json"),
        ("audience", "preview", KEY_A, "--sample", "2"),
        (
            "audience",
            "preview",
            "--sql",
            "SELECT user_id FROM users",
            "--source",
            "other",
            "--json",
        ),
        ("sync", "--dry-run", "--json"),
        ("sync", "--dry-run", KEY_B, KEY_A, "--json"),
        ("sync", "--dry-run"),
    )
    preview_a = json.loads(shown.stdout)
    assert {k: preview_a[k] for k in ("members", "entering", "leaving", "initial", "held")} == {
        "members": 20,
        "entering": 2,
        "leaving": 2,
        "initial": False,
        "held": False,
    }
    assert preview_a["sample"] == [f"u{i:02d}" for i in range(3, 13)]
    assert (preview_a["sample_entering"], preview_a["sample_leaving"]) == (
        ["u21", "u22"],
        ["u01", "u02"],
    )
    assert text.stdout.splitlines() == [
        f"{KEY_A}: 20 members, 2 entering, 2 leaving",
        "  members: u03, u04 …",
        "  entering: u21, u22",
        "  leaving: u01, u02",
    ]
    assert json.loads(by_sql.stdout) == {
        "members": 3,
        "entering": 3,
        "leaving": 0,
        "skipped": 2,
        "sample": ["x1", "x2", "x3"],
        "sample_entering": ["x1", "x2", "x3"],
        "sample_leaving": [],
        "held": False,
        "approved": False,
        "initial": True,
    }
    # every active audience (B is paused); or the keys given, paused or not, in that order
    assert [r["audience_key"] for r in json.loads(every.stdout)] == [KEY_A]
    assert json.loads(every.stdout)[0] == preview_a
    assert [(r["audience_key"], r["members"]) for r in json.loads(some.stdout)] == [
        (KEY_B, 3),  # u03-u05 now
        (KEY_A, 20),
    ]
    assert every_text.stdout.startswith(f"{KEY_A}: 20 members, 2 entering, 2 leaving\n")
    for result in (shown, text, by_sql, every, some, every_text):
        assert result.stderr == ""

    assert p.dump() == before
    assert len(rx.requests()) == sent


def test_dry_run_needs_no_workflow_urls(project_factory: ProjectFactory, sqlite_url: str) -> None:
    p = project_factory(sqlite_url, USERS)  # no [tray] workflow_urls
    p.cli("db", "upgrade")
    p.cli("audience", "create", NAME_A, "--sql", SQL_A)
    before = p.dump()
    dry, real = p.cli_many(("sync", "--dry-run", "--json"), ("sync",), check=None)
    assert dry.returncode == 0, dry.stderr
    assert [r["entering"] for r in json.loads(dry.stdout)] == [20]
    assert_usage_error(real, "workflow_urls")
    assert p.dump() == before


def test_a_failing_source_is_one_line_and_nothing_written(
    project_factory: ProjectFactory, state_url: str
) -> None:
    p = project_factory(state_url, USERS)
    p.cli("db", "upgrade")
    p.cli_many(
        ("audience", "create", NAME_A, "--sql", SQL_A),
        ("audience", "create", NAME_B, "--sql", SQL_B),
    )
    _rename_warehouse_table(p, "users", "customers")
    before = p.dump()
    preview, dry, refused = p.cli_many(
        ("audience", "preview", KEY_A),
        ("sync", "--dry-run", "--json"),
        ("audience", "preview", "--sql", "DELETE FROM customers"),
        check=None,
    )
    assert preview.returncode == 1 and preview.stdout == ""
    assert preview.stderr.splitlines() == [
        "syncer: error: the audience query failed on source 'default': no such table: users"
    ]
    assert dry.returncode == 1
    assert json.loads(dry.stdout) == [
        {
            "audience_key": key,
            "error": "the audience query failed on source 'default': no such table: users",
        }
        for key in (KEY_B, KEY_A)
    ]
    assert len(dry.stderr.splitlines()) == 2 and "Traceback" not in dry.stderr
    assert_usage_error(refused, "writes data")
    assert p.dump() == before


def test_bad_arguments_exit_2(project_factory: ProjectFactory, sqlite_url: str) -> None:
    p = project_factory(sqlite_url, USERS)
    p.cli("db", "upgrade")
    p.cli("audience", "create", NAME_A, "--sql", SQL_A)
    before = p.dump()
    cases = {
        ("audience", "preview", "nope"): ("no audience with key 'nope'",),
        ("sync", "--dry-run", KEY_A, "nope"): ("no audience with key 'nope'",),
        ("audience", "preview", KEY_A, "--sql", SQL_A): ("--sql", "not allowed"),
        ("audience", "preview"): ("one of the arguments",),
        ("audience", "preview", KEY_A, "--sample", "0"): ("--sample", "out of range"),
        ("audience", "preview", KEY_A, "--sample", "x"): ("--sample",),
        ("audience", "preview", KEY_A, "--source", "default"): ("--source goes with --sql",),
        ("audience", "preview", "--sql", SQL_A, "--source", "nowhere"): ("unknown source",),
        ("sync", "--dry-run", "--wait"): ("--wait", "--dry-run"),
    }
    results = p.cli_many(*cases, check=None)
    for result, fragments in zip(results, cases.values(), strict=True):
        assert result.stdout == ""
        assert_usage_error(result, *fragments)
    assert p.dump() == before


def test_preview_says_the_guard_would_hold_a_mass_removal(
    project_factory: ProjectFactory, state_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    users = [f"u{i:03d}" for i in range(250)]
    p = project_factory(
        state_url, users, workflow_urls=[rx.url("w1")], shared_secret="${TRAY_SHARED_SECRET}"
    )
    p.cli("db", "upgrade")
    p.cli("audience", "create", NAME_A, "--sql", SQL_A)
    p.cli("sync")
    sent = len(rx.requests())
    p.set_users([])  # the source breaks: it returns nobody
    before = p.dump()
    shown, text = p.cli_many(
        ("audience", "preview", KEY_A, "--json"), ("audience", "preview", KEY_A)
    )
    found = json.loads(shown.stdout)
    assert (found["members"], found["entering"], found["leaving"]) == (0, 0, 250)
    assert (found["held"], found["approved"]) == (True, False)
    assert found["sample"] == [] and found["sample_leaving"] == users[:10]
    assert "removal guard would hold" in text.stdout
    assert f"syncer audience approve {KEY_A}" in text.stdout
    assert p.dump() == before
    assert len(rx.requests()) == sent


@contextlib.contextmanager
def _select_only_role(database_url: str) -> Iterator[str]:
    """A login role that may read syncer's tables in that database and write none."""
    role = f"{PG_DATABASE_PREFIX}ro_{secrets.token_hex(5)}"
    name = sql.Identifier(role)
    dsn = f"postgresql://{PG_ADMIN_ROLE}@{PG_HOST}:{PG_PORT}/{make_url(database_url).database}"
    with pg_admin() as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(name))
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as db:
            db.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(name))
            db.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(name))
        yield role
    finally:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as db:
            db.execute(sql.SQL("DROP OWNED BY {}").format(name))
        with pg_admin() as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(name))


@pytest.mark.postgres
def test_a_read_only_state_role_may_preview(project_factory: ProjectFactory, pg_url: str) -> None:
    p = project_factory(pg_url, USERS)
    p.cli("db", "upgrade")
    p.cli("audience", "create", NAME_A, "--sql", SQL_A)
    with _select_only_role(pg_url) as role:
        reader = p.write_settings(
            "reader.toml", state_url=make_url(pg_url).set(username=role).render_as_string()
        )
        before = p.dump()
        shown, dry, paused = (
            p.cli(*args, settings=reader, check=None)
            for args in (
                ("audience", "preview", KEY_A, "--json"),
                ("sync", "--dry-run", "--json"),
                ("audience", "pause", KEY_A),
            )
        )
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["entering"] == 20
        assert dry.returncode == 0, dry.stderr
        assert_usage_error(paused, "[database] url")
        assert p.dump() == before


def test_colons_in_hand_written_sql_reach_the_database_as_written(
    project_factory: Callable[..., Project], sqlite_url: str
) -> None:
    """``':x'`` and ``'\\:x'`` in a string literal are text, not parameters (SQLAlchemy's text()
    would read the first as one)."""
    p = project_factory(sqlite_url, ["u1", "u2", "u3"], workflow_urls=["http://127.0.0.1:9/x"])
    p.cli("db", "upgrade")
    sql = (
        "SELECT user_id FROM users WHERE user_id || ':x' = 'u1:x' "
        "OR user_id || '\\:y' = 'u2\\:y' OR CAST(1 AS TEXT) = ':z::w'"
    )
    found = json.loads(p.cli("audience", "preview", "--sql", sql, "--json").stdout)
    assert (found["members"], found["sample"]) == (2, ["u1", "u2"])
    key = p.cli("audience", "create", "Colons", "--sql", sql).stdout.strip()
    assert json.loads(p.cli("audience", "preview", key, "--json").stdout)["members"] == 2
