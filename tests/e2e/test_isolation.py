"""One audience's failure is that audience's run failing (issue 14, class 1), and two state bugs
of deletion and retirement (class 5): the real ``syncer`` command in a subprocess, SQLite and
PostgreSQL state databases, a loopback receiver standing in for Tray.

- ``syncer sync``: the middle one of three audiences fails (its SQL reads a table dropped since,
  or it yields an id the state database refuses); the first and third are synced and delivered,
  the middle run is ``failed`` with its error in history, and the command exits 1.
- ``syncer serve``: an audience whose stored schedule no clock can reach (written straight into
  the table, as a DBA or an old version would) is reported once and skipped; a broken audience
  fails its runs; a healthy one created afterwards is scheduled and synced, the background retry
  keeps running, and SIGTERM stops the service cleanly. A leader that cannot read the
  audiences gives its lease up to a standby.
- ``syncer retry`` after ``users delete`` sends the deleted user nothing; ``audience delete
  --unset`` without a workflow URL changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import create_engine, make_url, text

from tests.e2e.conftest import Project, assert_usage_error
from tests.helpers import CliProcess, start_cli
from tests.receiver import Receiver

ProjectFactory = Callable[..., Project]

USERS = ["u1", "u2", "u3"]
FIRST = ("First Audience", "first_audience", "SELECT user_id FROM users WHERE user_id LIKE 'u%'")
MIDDLE_NAME, MIDDLE_KEY = "Middle Audience", "middle_audience"
THIRD = ("Third Audience", "third_audience", "SELECT user_id FROM users WHERE user_id LIKE 'u%'")
UNSCHEDULABLE = "cannot be scheduled"
PG_SUPERUSER_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"  # creates the LATIN1 database


# helpers ----------------------------------------------------------------------------------------


def _project(
    factory: ProjectFactory, state_url: str, rx: Receiver, users: Sequence[str]
) -> Project:
    p = factory(
        state_url, list(users), workflow_urls=[rx.url("w1")], shared_secret="${TRAY_SHARED_SECRET}"
    )
    p.cli("db", "upgrade")
    return p


def _warehouse(p: Project, statement: str) -> None:
    path = p.warehouse_url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(statement)


def _state(p: Project, *statements: str) -> list[tuple[object, ...]]:
    """Run statements on the state database as a DBA would; the last one's rows."""
    engine = create_engine(p.state_url)
    rows: list[tuple[object, ...]] = []
    try:
        with engine.begin() as conn:
            for statement in statements:
                result = conn.execute(text(statement))
                rows = [tuple(row) for row in result.all()] if result.returns_rows else []
    finally:
        engine.dispose()
    return rows


def _history(p: Project) -> dict[str, list[dict[str, object]]]:
    """audience key -> its runs, newest first, from ``syncer history --json``."""
    runs: dict[str, list[dict[str, object]]] = {}
    for run in json.loads(p.cli("history", "--json").stdout):
        runs.setdefault(str(run["audience_key"]), []).append(run)
    return runs


def _finished_runs(p: Project, key: str) -> list[tuple[object, ...]]:
    """(status, error) of the audience's finished runs, oldest first (polled: no CLI start)."""
    return _state(
        p,
        "SELECT r.status, r.error FROM sync_runs r JOIN audiences a ON a.id = r.audience_id "
        f"WHERE a.key = '{key}' AND r.finished_at IS NOT NULL ORDER BY r.id",
    )


def _traits(rx: Receiver, key: str) -> dict[str, bool]:
    return {user: t[key] for user, t in rx.final_traits("w1").items() if key in t}


def _create_three(p: Project, middle_sql: str) -> None:
    for name, sql_text in ((FIRST[0], FIRST[2]), (MIDDLE_NAME, middle_sql), (THIRD[0], THIRD[2])):
        p.cli("audience", "create", name, "--sql", sql_text)


def _assert_only_the_middle_failed(
    p: Project, rx: Receiver, synced: str, users: Sequence[str], error_names: str
) -> None:
    for _name, key, _sql in (FIRST, THIRD):
        assert f"{key}: run" in synced, synced
        assert _traits(rx, key) == dict.fromkeys(users, True), key
    assert f"{MIDDLE_KEY}: run" in synced, synced
    assert _traits(rx, MIDDLE_KEY) == {}
    history = _history(p)
    assert [run["status"] for run in history[FIRST[1]]] == ["succeeded"]
    assert [run["status"] for run in history[THIRD[1]]] == ["succeeded"]
    [middle] = history[MIDDLE_KEY]
    assert middle["status"] == "failed", middle
    error = str(middle["error"])
    assert error_names.lower() in error.lower(), error
    assert "\n" not in error and "[SQL" not in error and "parameters" not in error, error
    assert "Traceback" not in "".join(p.outputs)


# syncer sync ------------------------------------------------------------------------------------


def test_sync_a_middle_audience_whose_table_was_dropped_fails_alone(
    project_factory: ProjectFactory, state_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = _project(project_factory, state_url, rx, USERS)
    _warehouse(p, "CREATE TABLE signups (user_id TEXT)")
    _create_three(p, "SELECT user_id FROM signups")
    _warehouse(p, "DROP TABLE signups")

    synced = p.cli("sync", check=1)
    _assert_only_the_middle_failed(p, rx, synced.stdout, USERS, "signups")

    # the next sync runs the others again as usual; the middle one fails again, alone
    p.set_users([*USERS, "u4"])
    again = p.cli("sync", check=1)
    for _name, key, _sql in (FIRST, THIRD):
        assert _traits(rx, key) == dict.fromkeys([*USERS, "u4"], True), again.stdout


@pytest.fixture
def latin1_pg_url(pg_url: str) -> Iterator[str]:
    """A sibling of the test's PostgreSQL database (same owner) in a legacy single-byte
    encoding, LATIN1; dropped after."""
    url = make_url(pg_url)
    name = f"{url.database}_latin1"
    with psycopg.connect(PG_SUPERUSER_DSN, autocommit=True, connect_timeout=5) as admin:
        admin.execute(
            sql.SQL(
                "CREATE DATABASE {} OWNER {} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
                "TEMPLATE template0"
            ).format(sql.Identifier(name), sql.Identifier(str(url.username)))
        )
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(PG_SUPERUSER_DSN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.mark.postgres
def test_sync_an_id_a_latin1_state_database_cannot_hold_fails_only_its_audience(
    project_factory: ProjectFactory, latin1_pg_url: str, secret_receiver: Receiver
) -> None:
    """The state database is PostgreSQL in LATIN1; the middle audience's source yields an id
    with a character outside it (the euro sign): the database cannot store it."""
    rx = secret_receiver
    p = _project(project_factory, latin1_pg_url, rx, [*USERS, "w\u20ac1"])
    _create_three(p, "SELECT user_id FROM users")

    synced = p.cli("sync", check=1)
    _assert_only_the_middle_failed(p, rx, synced.stdout, USERS, "latin")


@pytest.mark.postgres
def test_sync_an_id_a_state_database_constraint_refuses_fails_only_its_audience(
    project_factory: ProjectFactory, pg_url: str, secret_receiver: Receiver
) -> None:
    """A DBA's CHECK constraint on memberships refuses one id: the middle audience's snapshot
    commit fails inside its transaction (rolled back), and the runs after it go on."""
    rx = secret_receiver
    p = _project(project_factory, pg_url, rx, [*USERS, "x-blocked"])
    _state(
        p,
        "ALTER TABLE memberships ADD CONSTRAINT dba_blocked_ids CHECK (user_id <> 'x-blocked')",
    )
    _create_three(p, "SELECT user_id FROM users")

    synced = p.cli("sync", check=1)
    _assert_only_the_middle_failed(p, rx, synced.stdout, USERS, "dba_blocked_ids")
    assert _state(p, "SELECT count(*) FROM deliveries WHERE user_id = 'x-blocked'") == [(0,)]


# syncer serve -----------------------------------------------------------------------------------


def _wait_until(
    condition: Callable[[], object], what: str, timeout: float, *watched: CliProcess
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for process in watched:
            if process.poll() is not None:
                pytest.fail(
                    f"serve exited ({process.returncode}) before {what}\n{process.read_stderr()}"
                )
        if time.monotonic() > deadline:
            logs = "".join(f"\n--- serve stderr\n{p.read_stderr()[-4000:]}" for p in watched)
            pytest.fail(f"timed out after {timeout}s waiting for {what}{logs}")
        time.sleep(0.1)


def test_serve_skips_an_unschedulable_audience_and_goes_on(
    project_factory: ProjectFactory, sqlite_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = _project(project_factory, sqlite_url, rx, USERS)
    p.cli("audience", "create", "Far Future", "--sql", FIRST[2], "--every", "1h")
    # Written straight into the table, as a DBA or an older syncer could have: 31,700 years.
    _state(p, "UPDATE audiences SET every_seconds = 1000000000000 WHERE key = 'far_future'")
    _warehouse(p, "CREATE TABLE signups (user_id TEXT)")
    p.cli(
        "audience", "create", MIDDLE_NAME, "--sql", "SELECT user_id FROM signups", "--every", "1h"
    )
    _warehouse(p, "DROP TABLE signups")
    rx.set_status("w1", 503)  # what the healthy audience's first run sends stays owed

    with start_cli("serve", settings=p.settings, env=p.env) as serve:
        _wait_until(lambda: UNSCHEDULABLE in serve.read_stderr(), "the report", 30, serve)
        # created while serve runs, after the unschedulable one
        p.cli("audience", "create", "Healthy", "--sql", FIRST[2], "--every", "1h")
        _wait_until(
            lambda: _finished_runs(p, "healthy"), "the healthy audience's first run", 30, serve
        )
        assert _traits(rx, "healthy") == {}
        # its next own run is an hour away: only the background retry can deliver it now
        rx.set_status("w1", None)
        _wait_until(
            lambda: _traits(rx, "healthy") == dict.fromkeys(USERS, True),
            "the background retry to deliver what the healthy audience owes",
            45,
            serve,
        )
        middle_runs = _history(p)[MIDDLE_KEY]
        assert {run["status"] for run in middle_runs} == {"failed"}
        assert "signups" in str(middle_runs[0]["error"])
        assert "far_future" not in _history(p)
        assert serve.stop() == 0
    log = serve.read_stderr()
    assert log.count(UNSCHEDULABLE) == 1, log
    assert "far_future" in log.split(UNSCHEDULABLE)[0].splitlines()[-1]
    assert "Traceback" not in log, log
    assert "syncer serve stopped" in log


def test_a_leader_that_cannot_read_the_audiences_hands_over_to_a_standby(
    project_factory: ProjectFactory, sqlite_url: str, secret_receiver: Receiver
) -> None:
    """The leader's reconcile fails for the whole table (here: renamed away by a DBA) for long
    enough: it gives its lease up and a standby leads; once the table is back, audiences run."""
    rx = secret_receiver
    p = _project(project_factory, sqlite_url, rx, USERS)
    with start_cli("serve", settings=p.settings, env=p.env) as first:
        _wait_until(lambda: "leading" in first.read_stderr(), "the first to lead", 30, first)
        with start_cli("serve", settings=p.settings, env=p.env) as second:
            _wait_until(lambda: "standing by" in second.read_stderr(), "a standby", 30, second)
            _state(p, "ALTER TABLE audiences RENAME TO audiences_away")
            _wait_until(
                lambda: "giving up leadership" in first.read_stderr(),
                "the broken leader to step down",
                60,
                first,
                second,
            )
            _wait_until(
                lambda: "leading" in second.read_stderr(), "the standby to lead", 30, first, second
            )
            _state(p, "ALTER TABLE audiences_away RENAME TO audiences")
            p.cli("audience", "create", "Healthy", "--sql", FIRST[2], "--every", "1h")
            _wait_until(
                lambda: _traits(rx, "healthy") == dict.fromkeys(USERS, True),
                "the new leader to sync a new audience",
                30,
                first,
                second,
            )
            assert second.stop() == 0
        assert first.stop() == 0
    assert "Traceback" not in first.read_stderr() + second.read_stderr()


# deletion and retirement ------------------------------------------------------------------------


def test_retry_after_users_delete_sends_the_deleted_user_nothing(
    project_factory: ProjectFactory, state_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = _project(project_factory, state_url, rx, USERS)
    p.cli("audience", "create", FIRST[0], "--sql", FIRST[2])
    rx.set_user_status("u1", 400)  # refused for good: u1's identify fails
    p.cli("sync", check=1)
    rx.set_user_status("u1", None)
    p.cli("users", "delete", "u1")
    assert [r.user_id for r in rx.accepted("w1") if r.message_type == "delete"] == ["u1"]
    rx.clear_records()

    rx.set_status("w1", 503)
    p.set_users([*USERS, "u4"])  # something else owed, so that retry does send
    p.cli("sync", check=1)
    rx.set_status("w1", None)
    rx.clear_records()
    p.cli("retry")
    sent = [(r.message_type, r.user_id) for r in rx.requests("w1")]
    assert sent == [("identify", "u4")]
    assert all(user not in ("u1", None) for _kind, user in sent), sent
    assert not [user for _kind, user in sent if str(user).startswith("sha256:")], sent
    # the deleted user's identify stays failed, with only the hash
    rows = _state(
        p,
        "SELECT status, user_id FROM deliveries WHERE kind = 'identify' AND user_id LIKE 'sha256:%'",
    )
    assert [status for status, _user in rows] == ["failed"], rows


def test_audience_delete_unset_without_a_workflow_url_changes_nothing(
    project_factory: ProjectFactory, state_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = _project(project_factory, state_url, rx, USERS)
    p.cli("audience", "create", FIRST[0], "--sql", FIRST[2])
    p.cli("sync")
    no_urls = p.write_settings("no-urls.toml")
    before = p.dump()

    refused = p.cli("audience", "delete", FIRST[1], "--unset", settings=no_urls, check=None)
    assert_usage_error(refused, "workflow")
    assert p.dump() == before
    listed = json.loads(p.cli("audience", "list", "--json").stdout)
    assert [(a["key"], a["status"]) for a in listed] == [(FIRST[1], "active")]
