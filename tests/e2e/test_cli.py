"""The ``syncer`` command end to end: a subprocess against real databases and a loopback receiver."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.e2e.conftest import SECRET, Project, assert_usage_error
from tests.helpers import cli_command, cli_env
from tests.receiver import Receiver

KEY_A = "order_completed_last_30days"
NAME_A = "Order Completed Last 30days"
SQL_A = "SELECT user_id FROM users WHERE plan = 'pro'"
KEY_B = "vip_users"
NAME_B = "VIP Users"
SQL_B = "SELECT user_id FROM users WHERE user_id <= 'u05'"
USERS = [f"u{i:02d}" for i in range(1, 21)]
NOWHERE = "http://127.0.0.1:9/never-called"
RUN_FIELDS = {
    "run_id",
    "audience_key",
    "kind",
    "status",
    "started_at",
    "finished_at",
    "members",
    "added",
    "removed",
    "sent",
    "failed",
}

ProjectFactory = Callable[..., Project]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _expected_traits(
    users: list[str], in_b: set[str], left: set[str]
) -> dict[str, dict[str, bool]]:
    """What a workflow URL should hold: A true for ``users``, B true for ``in_b``, false for
    those who ``left`` (a user who left A also left B in these tests)."""
    traits: dict[str, dict[str, bool]] = {}
    for user in users:
        traits[user] = {KEY_A: True} | ({KEY_B: True} if user in in_b else {})
    for user in left:
        traits[user] = {KEY_A: False, KEY_B: False}
    return traits


def test_help_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "syncer", "--help"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: syncer")
    for command in ("db", "audience", "sync", "history"):
        assert command in result.stdout
    assert result.stderr == ""


def test_audience_lifecycle(project_factory: ProjectFactory, state_url: str) -> None:
    p = project_factory(state_url, USERS, workflow_urls=[NOWHERE])
    upgraded = p.cli("db", "upgrade")
    assert "latest schema" in upgraded.stdout

    # independent commands run two at a time: each start costs seconds of CPU
    created_a, created_b = p.cli_many(
        ("audience", "create", NAME_A, "--sql", SQL_A),
        ("audience", "create", NAME_B, "--sql", SQL_B, "--every", "15m"),
    )
    assert created_a.stdout == f"{KEY_A}\n"
    assert created_a.stderr == ""
    assert created_b.stdout == f"{KEY_B}\n"

    listing, listing_json, shown, shown_json = p.cli_many(
        ("audience", "list"),
        ("audience", "list", "--json"),
        ("audience", "show", KEY_A),
        ("audience", "show", KEY_A, "--json"),
    )
    rows = _lines(listing.stdout)
    assert rows[0].split()[:2] == ["KEY", "NAME"]
    assert [row.split()[0] for row in rows[1:]] == [KEY_A, KEY_B]
    assert NAME_A in rows[1] and "active" in rows[1]

    audiences = json.loads(listing_json.stdout)
    assert [a["key"] for a in audiences] == [KEY_A, KEY_B]
    for audience in audiences:
        assert set(audience) >= {"key", "name", "status", "source", "sql", "schedule"}
    a, b = audiences
    assert (a["name"], a["status"], a["source"], a["sql"]) == (NAME_A, "active", "default", SQL_A)
    assert "3h" in a["schedule"] and "default" in a["schedule"]
    assert (b["name"], b["sql"], b["schedule"]) == (NAME_B, SQL_B, "every 15m")

    assert json.loads(shown_json.stdout) == a
    for value in (KEY_A, NAME_A, SQL_A, "active", "default"):
        assert value in shown.stdout

    new_sql = "SELECT user_id FROM users WHERE user_id > 'u10'"
    updated_a, updated_b = p.cli_many(
        ("audience", "update", KEY_A, "--sql", new_sql, "--cron", "0 */3 * * *"),
        ("audience", "update", KEY_B, "--every", "2h"),
    )
    assert KEY_A in updated_a.stdout and KEY_B in updated_b.stdout
    paused, deleted = p.cli_many(("audience", "pause", KEY_A), ("audience", "delete", KEY_B))
    assert paused.stdout == f"{KEY_A}: paused\n"
    assert deleted.stdout == f"{KEY_B}: deleted\n"

    listing_json, shown_deleted = p.cli_many(
        ("audience", "list", "--json"), ("audience", "show", KEY_B, "--json")
    )
    [a] = json.loads(listing_json.stdout)  # deleted audiences are not listed
    assert (a["key"], a["name"], a["sql"], a["status"]) == (KEY_A, NAME_A, new_sql, "paused")
    assert a["schedule"] == "cron 0 */3 * * *"
    b = json.loads(shown_deleted.stdout)
    assert (b["key"], b["schedule"], b["status"]) == (KEY_B, "every 2h", "deleted")

    resumed, again = p.cli_many(
        ("audience", "resume", KEY_A),
        ("audience", "create", NAME_B, "--sql", SQL_B),  # a deleted key is never reused
        check=None,
    )
    assert (resumed.returncode, resumed.stdout) == (0, f"{KEY_A}: active\n")
    assert again.returncode == 2 and len(again.stderr.splitlines()) == 1
    assert KEY_B in again.stderr


def test_sync_history_failures_and_secret(
    project_factory: ProjectFactory, state_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = project_factory(
        state_url,
        USERS,
        workflow_urls=[rx.url("w1"), rx.url("w2")],
        shared_secret="${TRAY_SHARED_SECRET}",
    )
    p.cli("db", "upgrade")
    p.cli_many(
        ("audience", "create", NAME_A, "--sql", SQL_A),
        ("audience", "create", NAME_B, "--sql", SQL_B),
    )

    # every active audience, one line each
    first = p.cli("sync")
    lines = _lines(first.stdout)
    assert len(lines) == 2, first.stdout
    assert lines[0].startswith(f"{KEY_A}: run ") and "(initial) succeeded" in lines[0]
    assert lines[1].startswith(f"{KEY_B}: run ") and "(initial) succeeded" in lines[1]
    expected = _expected_traits(USERS, set(USERS[:5]), set())
    for path in ("w1", "w2"):
        assert rx.final_traits(path) == expected
        assert len(rx.accepted(path)) == 25
    assert all(r.signature_ok for r in rx.requests())

    # one audience by key: u01 leaves, u21 enters
    p.set_users([*USERS[1:], "u21"])
    one = p.cli("sync", KEY_A)
    lines = _lines(one.stdout)
    assert len(lines) == 1 and lines[0].startswith(f"{KEY_A}: run "), one.stdout
    assert "(incremental) succeeded" in lines[0] and "+1 -1" in lines[0]
    assert rx.final_traits("w1")["u01"] == {KEY_A: False, KEY_B: True}
    assert rx.final_traits("w2")["u21"] == {KEY_A: True}

    history, history_b = p.cli_many(("history", "--json"), ("history", KEY_B, "--limit", "1"))
    runs = json.loads(history.stdout)
    assert isinstance(runs, list) and len(runs) == 3
    for run in runs:
        assert set(run) >= RUN_FIELDS, run
        assert run["status"] == "succeeded" and run["failed"] == 0
        assert datetime.fromisoformat(run["started_at"]) <= datetime.fromisoformat(
            run["finished_at"]
        )
    assert [r["run_id"] for r in runs] == sorted((r["run_id"] for r in runs), reverse=True)
    newest, b_initial, a_initial = runs
    assert (newest["audience_key"], newest["kind"]) == (KEY_A, "incremental")
    assert (newest["members"], newest["added"], newest["removed"], newest["sent"]) == (20, 1, 1, 4)
    assert (b_initial["audience_key"], b_initial["kind"], b_initial["members"]) == (
        KEY_B,
        "initial",
        5,
    )
    assert (a_initial["audience_key"], a_initial["kind"], a_initial["sent"]) == (
        KEY_A,
        "initial",
        40,
    )

    limited = _lines(history_b.stdout)
    assert len(limited) == 2 and limited[0].startswith("RUN"), limited
    assert limited[1].split()[:3] == [str(b_initial["run_id"]), KEY_B, "initial"]

    # w2 is down: the run exits 1, history shows what failed, w1 still gets everything
    rx.set_status("w2", 500)
    p.set_users([*USERS[1:], "u21", "u22"])
    down = p.cli("--log-level", "debug", "sync", check=1)
    assert [line.split(":")[0] for line in _lines(down.stdout) if not line[0].isspace()] == [
        KEY_A,
        KEY_B,
    ], down.stdout
    failed_runs = json.loads(p.cli("history", "--json", "--limit", "2").stdout)
    assert {r["audience_key"] for r in failed_runs} == {KEY_A, KEY_B}
    for run in failed_runs:
        assert run["failed"] > 0 and run["status"] in ("partial", "failed"), run
    expected = _expected_traits([*USERS[1:], "u21", "u22"], set(USERS[1:5]), {"u01"})
    assert rx.final_traits("w1") == expected
    assert rx.final_traits("w2") != expected

    # back up: the next run delivers what w2 is owed
    rx.clear_faults()
    owed_before = len(rx.accepted("w2"))
    recovered = p.cli("sync")
    assert all("succeeded" in line for line in _lines(recovered.stdout)), recovered.stdout
    assert rx.final_traits("w2") == expected
    assert len(rx.accepted("w2")) - owed_before == 2  # u22 entered A, u01 left B
    assert all(r.signature_ok for r in rx.requests())

    # no progress bar (no carriage returns) when stdout is not a terminal
    for output in p.outputs:
        assert "\r" not in output

    # the shared secret is in no output (debug logging included) and in no row of any table
    for output in p.outputs:
        assert SECRET not in output
    for table, rows in p.dump().items():
        for row in rows:
            assert SECRET not in row, f"secret in {table}: {row}"
    if state_url.startswith("sqlite:///"):
        state_file = Path(state_url.removeprefix("sqlite:///"))
        for path in state_file.parent.glob(state_file.name + "*"):
            assert SECRET.encode() not in path.read_bytes(), path


HOLD_LEASE = """
import sys, time
from syncer import audiences, db, leases
from syncer.settings import load_settings

settings = load_settings(sys.argv[1])
state = db.open_state(settings.database.url)
audience = audiences.get(state, sys.argv[2])
leases.acquire(state, audience.id, audience.key)
print("held", flush=True)
time.sleep(120)
"""


def test_sync_refuses_an_audience_another_process_is_syncing(
    project_factory: ProjectFactory, state_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = project_factory(
        state_url, USERS, workflow_urls=[rx.url("w1")], shared_secret="${TRAY_SHARED_SECRET}"
    )
    p.cli("db", "upgrade")
    p.cli("audience", "create", NAME_A, "--sql", SQL_A)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LEASE, str(p.settings), KEY_A],
        cwd=p.root,
        env=cli_env(p.env),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        before = p.dump()
        refused = p.cli("sync", check=1)
        lines = refused.stderr.splitlines()
        assert len(lines) == 1, refused.stderr
        assert "being synced" in lines[0] and KEY_A in lines[0]
        assert "Traceback" not in refused.stderr
        assert _lines(refused.stdout) == [f"{KEY_A}: skipped"]
        assert rx.requests() == []
        assert p.dump()["sync_runs"] == before["sync_runs"] == []
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()

    # the holder died: its lease does not block the next run
    p.cli("sync")
    assert len(rx.accepted("w1")) == len(USERS)


def test_progress_bar_on_a_terminal(
    project_factory: ProjectFactory, sqlite_url: str, secret_receiver: Receiver
) -> None:
    receiver = secret_receiver
    p = project_factory(
        sqlite_url, USERS, workflow_urls=[receiver.url("w1")], shared_secret="${TRAY_SHARED_SECRET}"
    )
    p.cli("db", "upgrade")
    p.cli("audience", "create", NAME_A, "--sql", SQL_A)

    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            cli_command("sync", settings=p.settings),
            cwd=p.root,
            env=cli_env(p.env),
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=subprocess.PIPE,
        )
        os.close(terminal)
        terminal = -1
        output = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the process closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        assert process.wait(timeout=60) == 0
        if process.stderr is not None:
            process.stderr.close()
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    text = output.decode()
    assert "\r" in text
    assert f"{KEY_A} [" in text and f"] {len(USERS)}/{len(USERS)}" in text
    assert f"{KEY_A}: run 1 (initial) succeeded" in text
    assert len(receiver.accepted("w1")) == len(USERS)


def test_audience_list_and_show_json_carry_id_and_last_run(
    project_factory: ProjectFactory, state_url: str
) -> None:
    with Receiver() as rx:
        p = project_factory(state_url, USERS, workflow_urls=[rx.url("w1")])
        p.cli("db", "upgrade")
        p.cli_many(
            ("audience", "create", NAME_A, "--sql", SQL_A),
            ("audience", "create", NAME_B, "--sql", SQL_B),
        )
        p.cli("sync", KEY_A)
        p.cli("sync", KEY_A)
        sent = rx.accepted("w1")
    listed, shown_json, shown = p.cli_many(
        ("audience", "list", "--json"),
        ("audience", "show", KEY_A, "--json"),
        ("audience", "show", KEY_A),
    )
    a, b = json.loads(listed.stdout)
    assert (a["key"], b["key"]) == (KEY_A, KEY_B)
    assert isinstance(a["id"], int) and isinstance(b["id"], int) and a["id"] != b["id"]
    # the id is what Tray receives as computation_id
    assert {m.json["context"]["personas"]["computation_id"] for m in sent} == {str(a["id"])}
    runs = json.loads(p.cli("history", KEY_A, "--json").stdout)
    newest = runs[0]
    assert a["last_run"] == {
        "run_id": newest["run_id"],
        "status": "succeeded",
        "finished_at": newest["finished_at"],
    }
    assert newest["run_id"] > runs[1]["run_id"], "last_run is the newest run"
    assert datetime.fromisoformat(a["last_run"]["finished_at"]).tzinfo is not None
    assert b["last_run"] is None  # never ran
    assert json.loads(shown_json.stdout) == a
    assert f"run {newest['run_id']} succeeded" in shown.stdout


def test_a_closed_pipe_ends_quietly(project_factory: ProjectFactory, sqlite_url: str) -> None:
    """`syncer deliveries | head -1`: once head has its line, syncer stops without a word, as
    any Unix tool does (exit 141, SIGPIPE's, which a shell shows only under pipefail)."""
    users = [f"user-{i:05d}" for i in range(3000)]  # ~300 kB of table: far past a pipe's buffer
    with Receiver() as rx:
        p = project_factory(sqlite_url, users, workflow_urls=[rx.url("w1")])
        p.cli("db", "upgrade")
        p.cli("audience", "create", "Everyone", "--sql", "SELECT user_id FROM users")
        p.cli("sync")
    for listing in ("deliveries --limit 100000", "deliveries --json --limit 100000"):
        command = " ".join(cli_command(*listing.split(), settings=p.settings))
        result = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {command} | head -1"],
            cwd=p.root,
            env=cli_env(p.env),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.stderr == "", result.stderr
        assert len(result.stdout.splitlines()) == 1, result.stdout
        assert result.returncode == 141, result.returncode


@pytest.mark.postgres
def test_a_read_only_postgres_state_database_is_bad_settings(
    project_factory: ProjectFactory, pg_url: str
) -> None:
    """A state database that takes no writes (a standby, or default_transaction_read_only):
    commands that would write stop before any work, exit 2, one line; listings still work."""
    p = project_factory(pg_url, USERS, workflow_urls=[NOWHERE])
    p.cli("db", "upgrade")
    p.cli("audience", "create", NAME_A, "--sql", SQL_A)
    name = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(
                sql.Identifier(name)
            )
        )
    before = p.dump()
    created, synced, paused = p.cli_many(
        ("audience", "create", NAME_B, "--sql", SQL_B),
        ("sync",),
        ("audience", "pause", KEY_A),
        check=None,
    )
    for result in (created, synced, paused):
        assert_usage_error(result, "read-only", "[database] url")
    assert p.dump() == before
    assert KEY_A in p.cli("audience", "list").stdout
