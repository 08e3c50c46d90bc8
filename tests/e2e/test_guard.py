"""The removal guard through the ``syncer`` command: a source that suddenly returns (almost)
nobody holds the run (nothing committed, nothing sent, exit 1, ``held`` in history); the
audience un-holds by itself when the source recovers, or goes through once after ``approve``."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

from tests.e2e.conftest import SECRET, Project, assert_usage_error
from tests.receiver import Receiver

ProjectFactory = Callable[..., Project]
NAME, KEY = "Pro Users", "pro_users"
SQL = "SELECT user_id FROM users"
USERS = [f"u{i:03d}" for i in range(300)]


def _runs(p: Project) -> list[dict[str, object]]:
    return list(json.loads(p.cli("history", KEY, "--json").stdout))


def _memberships(p: Project) -> list[str]:
    return p.dump()["memberships"]


def test_a_source_returning_nobody_is_held_until_it_recovers(
    project_factory: ProjectFactory, state_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = project_factory(
        state_url, USERS, workflow_urls=[rx.url("w1")], shared_secret="${TRAY_SHARED_SECRET}"
    )
    p.cli("db", "upgrade")
    p.cli("audience", "create", NAME, "--sql", SQL)
    p.cli("sync")
    assert len(rx.accepted("w1")) == 300
    snapshot = _memberships(p)

    p.set_users([])  # the source breaks: a truncated table
    for attempt in (1, 2):  # a held audience keeps being evaluated, each run recorded
        held = p.cli("sync", check=None)
        assert held.returncode == 1, held
        assert "held" in held.stdout and f"syncer audience approve {KEY}" in held.stdout
        assert "Traceback" not in held.stdout + held.stderr
        assert len(rx.accepted("w1")) == 300  # nothing sent
        assert _memberships(p) == snapshot  # nothing committed
        newest = _runs(p)[0]
        assert (newest["status"], newest["members"], newest["removed"]) == ("held", 0, 300)
        assert len([r for r in _runs(p) if r["status"] == "held"]) == attempt
    [listed] = json.loads(p.cli("audience", "list", "--json").stdout)
    assert listed["last_run"]["status"] == "held"
    [row] = p.cli("audience", "list").stdout.splitlines()[1:]
    assert row.split()[0] == KEY and row.endswith(f"held (run {listed['last_run']['run_id']})")

    p.set_users(USERS[:290])  # it recovers, with a few real exits: let through by itself
    recovered = p.cli("sync")
    assert "succeeded" in recovered.stdout
    assert _runs(p)[0]["removed"] == 10
    assert rx.final_traits("w1")["u295"] == {KEY: False}
    assert len(rx.accepted("w1")) == 310


def test_approve_lets_one_mass_removal_through(
    project_factory: ProjectFactory, sqlite_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = project_factory(
        sqlite_url, USERS, workflow_urls=[rx.url("w1")], shared_secret="${TRAY_SHARED_SECRET}"
    )
    p.cli("db", "upgrade")
    p.cli("audience", "create", NAME, "--sql", SQL)
    p.cli("sync")
    p.set_users(USERS[:100])  # a real removal of two thirds
    assert p.cli("sync", check=None).returncode == 1
    approved = p.cli("audience", "approve", KEY)
    assert approved.stdout == f"{KEY}: approved; its next run goes through the removal guard once\n"
    through = p.cli("sync")
    assert "succeeded" in through.stdout
    assert _runs(p)[0]["removed"] == 200
    assert rx.final_traits("w1")["u250"] == {KEY: False}

    p.set_users(USERS)  # back in: 200 entering, not a removal
    p.cli("sync")
    p.set_users([])  # the approval was used up: this one is held again
    assert p.cli("sync", check=None).returncode == 1
    assert _runs(p)[0]["status"] == "held"


def test_an_approval_is_used_by_the_next_run_even_when_it_needs_none(
    project_factory: ProjectFactory, sqlite_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = project_factory(
        sqlite_url, USERS, workflow_urls=[rx.url("w1")], shared_secret="${TRAY_SHARED_SECRET}"
    )
    p.cli("db", "upgrade")
    p.cli("audience", "create", NAME, "--sql", SQL)
    p.cli("sync")
    p.cli("audience", "approve", KEY)
    p.cli("sync")  # nothing changed; the approval is spent
    p.set_users([])
    assert p.cli("sync", check=None).returncode == 1


def test_per_audience_thresholds_and_the_settings_defaults(
    project_factory: ProjectFactory, sqlite_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = project_factory(
        sqlite_url, USERS, workflow_urls=[rx.url("w1")], shared_secret="${TRAY_SHARED_SECRET}"
    )
    p.cli("db", "upgrade")
    p.cli("audience", "create", NAME, "--sql", SQL)
    p.cli("sync")

    p.cli("audience", "update", KEY, "--max-removed-percent", "90")
    shown = json.loads(p.cli("audience", "show", KEY, "--json").stdout)
    assert shown["guard"] == {"max_removed_percent": 90, "min_removed": None}
    p.set_users(USERS[:60])  # 80 % removed: under this audience's 90
    assert "succeeded" in p.cli("sync").stdout

    p.cli("audience", "update", KEY, "--min-removed", "1000")
    p.set_users([])  # 100 % of 60, but fewer than 1000
    assert "succeeded" in p.cli("sync").stdout

    p.cli("audience", "update", KEY, "--max-removed-percent", "default", "--min-removed", "10")
    shown = json.loads(p.cli("audience", "show", KEY, "--json").stdout)
    assert shown["guard"] == {"max_removed_percent": None, "min_removed": 10}
    p.set_users(USERS[:50])
    p.cli("sync")
    p.set_users([])  # all 50 of 50: over the [guard] default of 50 %, and at least 10
    assert p.cli("sync", check=None).returncode == 1

    for args, named in (
        (("--max-removed-percent", "101"), "--max-removed-percent"),
        (("--min-removed", "-5"), "--min-removed"),
        (("--max-removed-percent", "ten"), "--max-removed-percent"),
    ):
        assert_usage_error(p.cli("audience", "update", KEY, *args, check=None), named)


def test_the_guard_settings_can_turn_it_off(
    project_factory: ProjectFactory, sqlite_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = project_factory(
        sqlite_url,
        USERS,
        workflow_urls=[rx.url("w1")],
        shared_secret="${TRAY_SHARED_SECRET}",
        extra="[guard]\nmax_removed_percent = 100\n",
    )
    p.cli("db", "upgrade")
    p.cli("audience", "create", NAME, "--sql", SQL)
    p.cli("sync")
    p.set_users([])
    assert "succeeded" in p.cli("sync").stdout
    assert len(rx.accepted("w1")) == 600

    p.write_settings(extra="[guard]\nmax_removed_percent = 150\n")
    assert_usage_error(p.cli("history", check=None), "[guard] max_removed_percent", "100")
    assert SECRET not in "".join(p.outputs)


def test_a_webhook_that_hangs_holds_up_no_run(
    project_factory: ProjectFactory, sqlite_url: str, secret_receiver: Receiver
) -> None:
    """Alerts are posted beside the runs: three held runs end together although each one's
    alert waits on a webhook that never answers (3 tries of [alerts] timeout_seconds = 5)."""
    rx = secret_receiver
    with Receiver(fail_ratio=1.0, fault_modes=["slow"], slow_seconds=60) as hook:
        p = project_factory(
            sqlite_url,
            USERS,
            workflow_urls=[rx.url("w1")],
            shared_secret="${TRAY_SHARED_SECRET}",
            extra=f'[alerts]\nwebhook_urls = ["{hook.url("hang/t0ken")}"]\ntimeout_seconds = 5\n',
        )
        p.cli("db", "upgrade")
        keys = [f"everyone_{n}" for n in range(3)]
        for key in keys:
            p.cli("audience", "create", key, "--sql", SQL)
        p.cli("sync")
        p.set_users([])
        held = p.cli("sync", check=None, timeout=300)
        assert held.returncode == 1 and held.stdout.count(") held:") == 3
        runs = [r for r in json.loads(p.cli("history", "--json").stdout) if r["status"] == "held"]
        finished = sorted(datetime.fromisoformat(str(r["finished_at"])) for r in runs)
        assert (finished[-1] - finished[0]).total_seconds() < 10, finished  # not 3 x 15 s
        assert len(hook.requests()) >= 1  # the alerts were still posted, while the runs went on
        assert "t0ken" not in held.stdout + held.stderr
