"""``syncer deliveries`` and ``syncer retry`` end to end: the outbox as an operator sees it.

Workflow URLs carry their secret in the path (a Tray URL is a bearer token): the commands show
the host only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

import pytest

from tests.e2e.conftest import SECRET, Project, assert_usage_error
from tests.receiver import Receiver

KEY_A, NAME_A, SQL_A = "all_users", "All Users", "SELECT user_id FROM users"
KEY_B, NAME_B, SQL_B = (
    "first_users",
    "First Users",
    "SELECT user_id FROM users WHERE user_id <= 'u03'",
)
USERS = [f"u{i:02d}" for i in range(1, 7)]
REFUSED = "u02"  # every URL answers 400 for this user, until told otherwise
DROPPED = "u05"  # every URL drops the connection for this user, until told otherwise
TOKENS = ("tok-7f3a9c1e-path-secret", "tok-b2d4e6f8-path-secret")
FIELDS = {
    "id",
    "run_id",
    "audience_key",
    "user_id",
    "destination_id",
    "destination_host",
    "kind",
    "value",
    "status",
    "attempts",
    "created_at",
    "last_status_code",
    "last_error",
}
TABLE_HEADER = ["ID", "RUN", "AUDIENCE", "USER", "URL", "HOST", "VALUE", "STATUS", "ATTEMPTS"]

ProjectFactory = Callable[..., Project]


def test_deliveries_and_retry(
    project_factory: ProjectFactory, sqlite_url: str, secret_receiver: Receiver
) -> None:
    """SQLite only: the CLI is the same on every database (tests/integration covers the
    queries on PostgreSQL), and each command costs a process start."""
    rx = secret_receiver
    urls = [rx.url(f"hooks/{token}") for token in TOKENS]
    p = project_factory(
        sqlite_url, USERS, workflow_urls=urls, shared_secret="${TRAY_SHARED_SECRET}"
    )
    p.cli("db", "upgrade")
    p.cli_many(
        ("audience", "create", NAME_A, "--sql", SQL_A),
        ("audience", "create", NAME_B, "--sql", SQL_B),
    )
    rx.set_user_status(REFUSED, 400)
    rx.set_user_status(DROPPED, "drop")

    synced = p.cli("sync", check=1)
    assert "partial" in synced.stdout

    table, everything, failed, only_b, newest = p.cli_many(
        ("deliveries",),
        ("deliveries", "--json"),
        ("deliveries", "--status", "failed", "--json"),
        ("deliveries", KEY_B, "--json"),
        ("deliveries", "--limit", "3", "--json"),
    )

    # the table: a header and one line per delivery (6 + 3 users, 2 URLs each)
    lines = table.stdout.splitlines()
    assert lines[0].split() == [*TABLE_HEADER, "LAST"], lines[0]
    assert len(lines) == 1 + 18, table.stdout
    assert sum(f" {REFUSED} " in line and " failed " in line for line in lines) == 4
    assert any("HTTP 400" in line for line in lines), table.stdout
    assert all("127.0.0.1" in line for line in lines[1:])

    # --json: every field, newest first, hosts only
    rows = json.loads(everything.stdout)
    assert len(rows) == 18
    for row in rows:
        assert set(row) >= FIELDS, row
        assert row["destination_host"] == f"127.0.0.1:{rx.port}"
        assert row["kind"] == "identify" and row["value"] is True
        assert datetime.fromisoformat(str(row["created_at"])).utcoffset() is not None
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
    by_user: dict[str, set[tuple[object, ...]]] = {}
    for row in rows:
        by_user.setdefault(str(row["user_id"]), set()).add(
            (row["status"], row["attempts"], row["last_status_code"])
        )
    assert by_user[REFUSED] == {("failed", 1, 400)}
    [(status, attempts, _code)] = by_user[DROPPED]
    assert status == "pending" and attempts >= 1
    assert all(by_user[u] == {("sent", 1, 200)} for u in USERS if u not in (REFUSED, DROPPED))
    dropped_errors = {r["last_error"] for r in rows if r["user_id"] == DROPPED}
    assert all(dropped_errors) and len(dropped_errors) == 1, dropped_errors

    # --status failed, KEY, --limit
    failures = json.loads(failed.stdout)
    assert {(r["user_id"], r["status"]) for r in failures} == {(REFUSED, "failed")}
    assert len(failures) == 4
    assert {(r["audience_key"], r["destination_id"]) for r in failures} == {
        (key, dest) for key in (KEY_A, KEY_B) for dest in {r["destination_id"] for r in rows}
    }
    b_rows = json.loads(only_b.stdout)
    assert len(b_rows) == 6 and {r["audience_key"] for r in b_rows} == {KEY_B}
    assert {r["user_id"] for r in b_rows} == {"u01", "u02", "u03"}
    assert json.loads(newest.stdout) == rows[:3]

    # retry while the URL still refuses: queued again, still failing -> exit 1
    again = p.cli("retry", check=1)
    assert again.stdout.splitlines()[0] == "4 failed deliveries queued again", again.stdout
    assert f"{KEY_A}: sent 0, failed 2, still owed 2" in again.stdout
    assert f"{KEY_B}: sent 0, failed 2, still owed 0" in again.stdout

    # the URLs take everything now: retry sends the failed and the owed, exit 0
    rx.set_user_status(REFUSED, None)
    rx.set_user_status(DROPPED, None)
    healed = p.cli("retry")
    assert healed.stdout.splitlines()[0] == "4 failed deliveries queued again", healed.stdout
    assert f"{KEY_A}: sent 4, failed 0, still owed 0" in healed.stdout
    assert f"{KEY_B}: sent 2, failed 0, still owed 0" in healed.stdout
    expected = {u: {KEY_A: True} | ({KEY_B: True} if u <= "u03" else {}) for u in USERS}
    for url in urls:
        assert rx.final_traits(url) == expected
    assert all(r.signature_ok for r in rx.requests())

    nothing, after = p.cli_many(("retry", KEY_A), ("deliveries", "--json"))
    assert nothing.stdout.splitlines() == ["0 failed deliveries queued again"], nothing.stdout
    assert {r["status"] for r in json.loads(after.stdout)} == {"sent"}

    # the workflow URL's path (its token) and the shared secret never appear in any output
    for output in p.outputs:
        for token in TOKENS:
            assert token not in output
        assert "/hooks/" not in output
        assert SECRET not in output


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        pytest.param(("deliveries", "--status", "bogus"), ("--status", "bogus"), id="bad-status"),
        pytest.param(("deliveries", "unknown_key"), ("unknown_key",), id="unknown-key"),
        pytest.param(("deliveries", "--limit", "0"), ("--limit",), id="limit-0"),
        pytest.param(("deliveries", "--limit", "-5"), ("--limit",), id="limit-negative"),
        pytest.param(("deliveries", "--limit", "many"), ("--limit",), id="limit-not-a-number"),
        pytest.param(("retry", "unknown_key"), ("unknown_key",), id="retry-unknown-key"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    bad_input_project: Project, args: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    before = bad_input_project.dump()
    result = bad_input_project.cli(*args, check=None)
    assert_usage_error(result, *fragments)
    assert bad_input_project.dump() == before


@pytest.fixture(scope="module")
def bad_input_project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """One SQLite project with an audience and a delivery, shared by the bad-input cases."""
    from tests.e2e.conftest import new_project

    root = tmp_path_factory.mktemp("bad-input")
    p = new_project(
        root,
        f"sqlite:///{(root / 'state.db').resolve()}",
        ["u1"],
        workflow_urls=["http://127.0.0.1:9/hooks/never-called"],
    )
    p.cli("db", "upgrade")
    p.cli("audience", "create", NAME_A, "--sql", SQL_A)
    return p
