"""A marketing ops user's day through the ``syncer`` command alone: models and a rule audience
in audiences.yml, ``plan``, ``apply``, ``preview``, ``sync``; a source that breaks is held with
an alert and nothing sent, and un-holds when it is fixed. Bad files change nothing."""

from __future__ import annotations

import json
import sqlite3
import textwrap
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.e2e.conftest import Project, assert_usage_error
from tests.receiver import Receiver

ProjectFactory = Callable[..., Project]
KEY = "order_completed_last_30days"
PLANS = ("free", "pro", "enterprise")


def _make_shop(path: Path, users: int = 400) -> None:
    """users(user_id, plan, country) and orders(order_id, user_id, completed_at, amount):
    every second user ordered recently, every fifth long ago."""
    now = datetime.now(UTC)
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("DROP TABLE IF EXISTS users")
        db.execute("DROP TABLE IF EXISTS orders")
        db.execute("CREATE TABLE users (user_id TEXT PRIMARY KEY, plan TEXT, country TEXT)")
        db.execute(
            "CREATE TABLE orders (order_id INTEGER PRIMARY KEY, user_id TEXT, "
            "completed_at TEXT, amount REAL)"
        )
        db.executemany(
            "INSERT INTO users VALUES (?, ?, ?)",
            [(f"u{i:03d}", PLANS[i % 3], "DE" if i % 2 else "FR") for i in range(users)],
        )
        orders = []
        for i in range(users):
            if i % 2 == 0:
                orders.append((f"u{i:03d}", now - timedelta(days=2), 20.0 + i))
            if i % 5 == 0:
                orders.append((f"u{i:03d}", now - timedelta(days=90), 5.0))
        db.executemany(
            "INSERT INTO orders (user_id, completed_at, amount) VALUES (?, ?, ?)",
            [(u, t.strftime("%Y-%m-%d %H:%M:%S"), a) for u, t, a in orders],
        )


def _expected(users: int = 400, plans: tuple[str, ...] = ("pro", "enterprise")) -> set[str]:
    return {f"u{i:03d}" for i in range(users) if i % 2 == 0 and PLANS[i % 3] in plans}


AUDIENCES_YML = """\
models:
  users:
    table: users
    primary_key: user_id
  orders:
    table: orders
    foreign_key: user_id
    timestamp: completed_at
audiences:
  - name: Order Completed Last 30days
    every: 3h
    guard: {{min_removed: 10}}
    rules:
      all:
        - related: orders
          within: 30d
          at_least: 1
        - attribute: plan
          in: [{plans}]
  - name: French users
    sql: SELECT user_id FROM users WHERE country = 'FR'
"""


def _write(p: Project, text: str) -> Path:
    path = p.root / "audiences.yml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def alert_rx() -> Iterator[Receiver]:
    with Receiver() as rx:
        yield rx


def test_the_marketing_ops_scenario(
    project_factory: ProjectFactory,
    state_url: str,
    secret_receiver: Receiver,
    alert_rx: Receiver,
) -> None:
    rx = secret_receiver
    p = project_factory(
        state_url,
        [],
        workflow_urls=[rx.url("w1")],
        shared_secret="${TRAY_SHARED_SECRET}",
        extra=f'[alerts]\nwebhook_urls = ["{alert_rx.url("hook/s3cr3t")}"]\n',
    )
    shop = Path(p.warehouse_url.removeprefix("sqlite:///"))
    _make_shop(shop)
    p.cli("db", "upgrade")
    yml = _write(p, AUDIENCES_YML.format(plans="pro, enterprise"))

    before = p.dump()
    planned = p.cli("plan", str(yml))
    assert f"+ {KEY}: create" in planned.stdout
    assert f"{len(_expected())} members, {len(_expected())} entering, 0 leaving" in planned.stdout
    assert "+ french_users: create" in planned.stdout
    assert p.dump() == before  # plan writes nothing

    as_json = json.loads(p.cli("plan", str(yml), "--json").stdout)
    change = next(a for a in as_json["audiences"] if a["key"] == KEY)
    assert change["action"] == "create" and change["preview"]["members"] == len(_expected())

    from_file = p.cli(
        "audience", "preview", "--file", str(yml), "--name", "Order Completed Last 30days", "--json"
    )
    assert json.loads(from_file.stdout)["members"] == len(_expected())
    assert p.dump() == before  # preview writes nothing either

    applied = p.cli("apply", str(yml))
    assert "applied" in applied.stdout
    listed = {a["key"]: a for a in json.loads(p.cli("audience", "list", "--json").stdout)}
    assert listed[KEY]["managed"] is True and listed[KEY]["rules"]["all"][1]["in"] == [
        "pro",
        "enterprise",
    ]
    shown = p.cli("audience", "show", KEY, "--sql").stdout
    assert "'pro'" not in shown.split("-- bound values:")[0]  # values bound, not pasted
    assert '"pro"' in shown and '"enterprise"' in shown
    refused = p.cli("audience", "update", KEY, "--every", "1h", check=None)
    assert_usage_error(refused, "managed", "audiences.yml")
    assert "no changes" in p.cli("plan", str(yml)).stdout

    preview = json.loads(p.cli("audience", "preview", KEY, "--json").stdout)
    assert len(_expected()) == 133
    assert (preview["members"], preview["entering"], preview["leaving"]) == (
        len(_expected()),
        len(_expected()),
        0,
    )

    p.cli("sync")
    traits = rx.final_traits("w1")
    assert {u for u, t in traits.items() if t.get(KEY) is True} == _expected()

    # a change of the rules: plan shows who would enter and leave, apply makes it so
    _write(p, AUDIENCES_YML.format(plans="pro, enterprise, free"))
    replanned = p.cli("plan", str(yml)).stdout
    entering = len(_expected(plans=PLANS)) - len(_expected())
    assert f"~ {KEY}: update (definition (rules))" in replanned
    assert f"{len(_expected(plans=PLANS))} members, {entering} entering, 0 leaving" in replanned
    p.cli("apply", str(yml))
    p.cli("sync")
    traits = rx.final_traits("w1")
    assert {u for u, t in traits.items() if t.get(KEY) is True} == _expected(plans=PLANS)

    # the source breaks: every order gone. The run is held, an alert posted, nothing sent.
    sent = len(rx.accepted("w1"))
    with closing(sqlite3.connect(shop)) as db, db:
        db.execute("DELETE FROM orders")
    held = p.cli("sync", KEY, check=None)
    assert held.returncode == 1 and "held" in held.stdout
    assert len(rx.accepted("w1")) == sent
    [alert] = [r.json for r in alert_rx.requests() if r.json.get("event") == "run_held"]
    assert alert["audience_key"] == KEY and KEY in alert["text"]
    assert "s3cr3t" not in held.stdout + held.stderr

    _make_shop(shop)  # fixed: the next run goes through by itself
    fixed = p.cli("sync", KEY)
    assert (
        "succeeded" in fixed.stdout
        and f"{len(_expected(plans=PLANS))} members, +0 -0" in fixed.stdout
    )
    assert len(rx.accepted("w1")) == sent
    assert all("s3cr3t" not in out for out in p.outputs)


def test_keys_names_pausing_and_pruning(
    project_factory: ProjectFactory, sqlite_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = project_factory(
        sqlite_url, [], workflow_urls=[rx.url("w1")], shared_secret="${TRAY_SHARED_SECRET}"
    )
    _make_shop(Path(p.warehouse_url.removeprefix("sqlite:///")))
    p.cli("db", "upgrade")
    p.cli("audience", "create", "Hand Made", "--sql", "SELECT user_id FROM users")
    first = textwrap.dedent(
        """\
        audiences:
          - name: Germans
            key: germans
            sql: SELECT user_id FROM users WHERE country = 'DE'
          - name: Free users
            sql: SELECT user_id FROM users WHERE plan = 'free'
        """
    )
    yml = _write(p, first)
    p.cli("apply", str(yml), "--json")
    # renamed with its key pinned: the same audience; renamed without: a new one
    _write(
        p,
        first.replace("name: Germans", "name: German customers").replace(
            "name: Free users", "name: Free plan users\n    paused: true"
        ),
    )
    planned = p.cli("plan", str(yml), "--no-preview").stdout
    assert "~ germans: update (name: 'Germans' -> 'German customers')" in planned
    assert "+ free_plan_users: create" in planned
    assert "free_users: not in file" in planned and "hand_made: not in file" in planned
    p.cli("apply", str(yml))
    listed = {a["key"]: a for a in json.loads(p.cli("audience", "list", "--json").stdout)}
    assert listed["germans"]["name"] == "German customers"
    assert listed["free_plan_users"]["status"] == "paused"
    assert listed["hand_made"]["managed"] is False and listed["free_users"]["status"] == "active"

    # an entry of a hand-made audience's key takes it over only with --adopt
    adopting = yml.read_text() + "  - name: Hand Made\n    sql: SELECT user_id FROM users\n"
    _write(p, adopting)
    before = p.dump()
    refused = assert_usage_error(p.cli("apply", str(yml), check=None), "--adopt")
    assert "audiences.yml:8: audiences[2].name: audience 'hand_made' exists" in refused
    assert p.dump() == before
    assert "managed by this file from now on" in p.cli("plan", str(yml), "--adopt").stdout
    _write(p, adopting.replace("  - name: Hand Made\n    sql: SELECT user_id FROM users\n", ""))

    # --prune with a file that declares nothing (an empty or cut-off file) deletes nothing
    empty = p.root / "empty.yml"
    empty.write_text("", encoding="utf-8")
    assert_usage_error(p.cli("apply", str(empty), "--prune", check=None), "no audiences")
    assert p.dump() == before

    pruned = p.cli("apply", str(yml), "--prune").stdout
    assert "- free_users: delete" in pruned and "- hand_made: delete" in pruned
    keys = {a["key"] for a in json.loads(p.cli("audience", "list", "--json").stdout)}
    assert keys == {"germans", "free_plan_users"}


BAD_FILES = [
    (
        AUDIENCES_YML.format(plans="pro").replace("attribute: plan", "attribute: plann"),
        "audiences.yml:18: audiences[0].rules.all[1].attribute: no column 'plann' in model users",
    ),
    (
        AUDIENCES_YML.format(plans="pro").replace("related: orders", "related: order"),
        "audiences.yml:15: audiences[0].rules.all[0].related",
    ),
    (
        AUDIENCES_YML.format(plans="pro").replace("in: [pro]", "inn: [pro]"),
        "audiences.yml:19: audiences[0].rules.all[1]",
    ),
    (AUDIENCES_YML.format(plans="pro").replace("table: orders", "table: orderz"), "orderz"),
    ("audiences:\n  - name: X\n    sql: [unclosed\n", "not valid YAML"),
    ("audiences:\n  - name: X\n    sql: DELETE FROM users\n", "audiences.yml:3: audiences[0].sql"),
    ("audiences:\n  - name: X\n    sql: SELECT 1\n    sql: SELECT 2\n", "audiences.yml:4"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES, ids=range(len(BAD_FILES)))
def test_a_bad_file_names_the_place_and_changes_nothing(
    project_factory: ProjectFactory, sqlite_url: str, text: str, message: str
) -> None:
    p = project_factory(sqlite_url, [], workflow_urls=["http://127.0.0.1:9/never"])
    _make_shop(Path(p.warehouse_url.removeprefix("sqlite:///")))
    p.cli("db", "upgrade")
    yml = _write(p, text)
    before = p.dump()
    for command in ("plan", "apply"):
        line = assert_usage_error(p.cli(command, str(yml), check=None))
        assert message in line, line
    assert p.dump() == before
