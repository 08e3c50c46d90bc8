"""Rules compiled to SQL and run on real databases (SQLite and DuckDB files, PostgreSQL as an
ordinary role, MariaDB with SYNCER_TEST_MARIADB=1), against the members computed in Python from
the same rows.

Each database gets the same users and orders; each rule set is compiled for it
(``syncer.definitions.rules``), passes the read-only check hand-written SQL goes through
(``normalize_sql``), and runs as a run would run it: ``text(sql).bindparams(**params)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.pool import NullPool

from syncer.definitions.rules import (
    ModelSpec,
    RuleError,
    compile_rules,
    compiled_sql,
    describe_model,
    parse_rules,
)
from syncer.sources import normalize_sql
from tests.conftest import WITH_MARIADB


@dataclass(frozen=True)
class User:
    user_id: str
    plan: str | None
    country: str | None
    ltv: float | None
    active: bool | None
    note: str | None


@dataclass(frozen=True)
class Order:
    id: int
    user_id: str
    completed_at: datetime | None  # naive UTC
    amount: float | None


NOW = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
RECENT, OLD = NOW - timedelta(days=5), NOW - timedelta(days=90)

USERS = [
    User("u1", "pro", "US", 1500.0, True, "50%_off"),
    User("u2", "enterprise", "DE", 5000.0, True, "50 off"),
    User("u3", "free", "US", 10.0, False, "5_0%x"),
    User("u4", None, "FR", None, None, None),
    User("u5", "pro", None, 200.0, True, "100%"),
    User("u6", "free", "DE", 0.0, None, "a_b"),
    User("u7", "Pro", "US", 99.5, False, "axb"),
    User("u8", "enterprise", None, 250.0, True, "50%_OFF today"),
]
ORDERS = [
    Order(1, "u1", RECENT, 20.0),
    Order(2, "u1", RECENT, 30.0),
    Order(3, "u1", RECENT, 5.0),
    Order(4, "u2", OLD, 100.0),
    Order(5, "u3", RECENT, 50.0),
    Order(6, "u3", None, 40.0),
    Order(7, "u5", RECENT, 15.0),
    Order(8, "u5", RECENT, 15.0),
    Order(9, "u5", OLD, 15.0),
    Order(10, "u6", None, None),
    Order(11, "u7", RECENT, 1.0),
    Order(12, "u7", RECENT, 2.0),
    Order(13, "u7", OLD, 3.0),
    Order(14, "u7", RECENT, None),
    Order(15, "u8", OLD, 500.0),
]


def orders_of(user: User) -> list[Order]:
    return [order for order in ORDERS if order.user_id == user.user_id]


def recent(order: Order) -> bool:
    return order.completed_at is not None and order.completed_at >= NOW - timedelta(days=30)


def big(order: Order) -> bool:
    return order.amount is not None and order.amount > 10


# Text compares as the column's collation says: MariaDB's default one ignores case.
FOLD_CASE = {"mariadb"}


def plan_in(user: User, dialect: str, *plans: str) -> bool:
    if user.plan is None:
        return False
    if dialect in FOLD_CASE:
        return user.plan.lower() in plans
    return user.plan in plans


# (name, rule as written, who is in it: computed from the rows above, not by SQL, for a dialect)
CASES: list[tuple[str, dict[str, Any], Callable[[User, str], bool]]] = [
    ("eq", {"attribute": "plan", "eq": "pro"}, lambda u, d: plan_in(u, d, "pro")),
    ("ne with NULLs", {"attribute": "plan", "ne": "pro"}, lambda u, d: not plan_in(u, d, "pro")),
    (
        "not in with NULLs",
        {"not": {"attribute": "plan", "in": ["pro", "enterprise"]}},
        lambda u, d: not plan_in(u, d, "pro", "enterprise"),
    ),
    (
        "not_in",
        {"attribute": "country", "not_in": ["US", "DE"]},
        lambda u, d: u.country not in ("US", "DE"),
    ),
    (
        "ranges",
        {"all": [{"attribute": "ltv", "ge": 10}, {"attribute": "ltv", "lt": 1500}]},
        lambda u, d: u.ltv is not None and 10 <= u.ltv < 1500,
    ),
    (
        "not gt with NULLs",
        {"not": {"attribute": "ltv", "gt": 100.5}},
        lambda u, d: not (u.ltv is not None and u.ltv > 100.5),
    ),
    ("le", {"attribute": "ltv", "le": 99.5}, lambda u, d: u.ltv is not None and u.ltv <= 99.5),
    ("boolean", {"attribute": "active", "eq": True}, lambda u, d: u.active is True),
    ("is_null", {"attribute": "country", "is_null": True}, lambda u, d: u.country is None),
    (
        "nested any/all/not",
        {
            "any": [
                {"attribute": "country", "eq": "US"},
                {
                    "all": [
                        {"attribute": "ltv", "gt": 100},
                        {"not": {"attribute": "country", "is_not_null": True}},
                    ]
                },
            ]
        },
        lambda u, d: u.country == "US" or (u.ltv is not None and u.ltv > 100 and u.country is None),
    ),
    (
        "contains % and _ literally, any case",
        {"attribute": "note", "contains": "50%_off"},
        lambda u, d: u.note is not None and "50%_off" in u.note.lower(),
    ),
    (
        "contains _",
        {"attribute": "note", "contains": "_"},
        lambda u, d: u.note is not None and "_" in u.note,
    ),
    (
        "not contains with NULLs",
        {"not": {"attribute": "plan", "contains": "PRO"}},
        lambda u, d: not (u.plan is not None and "pro" in u.plan.lower()),
    ),
    ("empty all", {"all": []}, lambda u, d: True),
    ("empty any", {"any": []}, lambda u, d: False),
    (
        "an order in 30 days",
        {"related": "orders", "at_least": 1, "within": "30d"},
        lambda u, d: any(recent(o) for o in orders_of(u)),
    ),
    (
        "two big orders in 30 days",
        {
            "related": "orders",
            "at_least": 2,
            "within": "720h",
            "where": [{"attribute": "amount", "gt": 10}],
        },
        lambda u, d: sum(recent(o) and big(o) for o in orders_of(u)) >= 2,
    ),
    (
        "no orders",
        {"related": "orders", "exactly": 0},
        lambda u, d: not orders_of(u),
    ),
    (
        "at most one order",
        {"related": "orders", "at_most": 1},
        lambda u, d: len(orders_of(u)) <= 1,
    ),
    (
        "at most 0 big ones",
        {"related": "orders", "at_most": 0, "where": {"attribute": "amount", "gt": 10}},
        lambda u, d: not any(big(o) for o in orders_of(u)),
    ),
    (
        "exactly 2 recent, where any/not",
        {
            "related": "orders",
            "exactly": 2,
            "within": "30d",
            "where": {
                "any": [
                    {"attribute": "amount", "is_null": True},
                    {"not": {"attribute": "amount", "ge": 10}},
                ]
            },
        },
        lambda u, d: sum(recent(o) and not big_or_equal_10(o) for o in orders_of(u)) == 2,
    ),
    (
        "lapsed: not recent but a plan",
        {
            "all": [
                {"not": {"related": "orders", "at_least": 1, "within": "30d"}},
                {"attribute": "plan", "is_not_null": True},
                {"related": "orders", "at_least": 0},
            ]
        },
        lambda u, d: not any(recent(o) for o in orders_of(u)) and u.plan is not None,
    ),
    (
        "a query model",
        {"related": "paid_orders", "at_least": 2},
        lambda u, d: sum(o.amount is not None for o in orders_of(u)) >= 2,
    ),
]


def big_or_equal_10(order: Order) -> bool:
    return order.amount is not None and order.amount >= 10


# --- the databases ---------------------------------------------------------------------------------

# Column types as each database spells them (timestamps: naive, UTC).
TYPES = {
    "sqlite": ("TEXT", "REAL", "BOOLEAN", "TIMESTAMP"),
    "postgresql": ("TEXT", "DOUBLE PRECISION", "BOOLEAN", "TIMESTAMP"),
    "mariadb": ("VARCHAR(100)", "DOUBLE", "BOOLEAN", "DATETIME(6)"),
    "duckdb": ("VARCHAR", "DOUBLE", "BOOLEAN", "TIMESTAMP"),
}


@pytest.fixture(
    params=[
        "sqlite",
        "duckdb",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        *([pytest.param("mariadb")] if WITH_MARIADB else []),
    ]
)
def source(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Connection]:
    """A connection to a database holding USERS and ORDERS."""
    name = request.param
    if name == "sqlite":
        url = f"sqlite:///{tmp_path / 'source.db'}"
    elif name == "duckdb":
        url = f"duckdb:///{tmp_path / 'source.duckdb'}"
    elif name == "postgresql":
        url = str(request.getfixturevalue("source_pg_url"))
    else:
        url = str(request.getfixturevalue("mariadb_url"))
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            _load(conn, name)
            yield conn
    finally:
        engine.dispose()


def _load(conn: Connection, name: str) -> None:
    text_type, number, boolean, stamp = TYPES[name]
    conn.execute(
        text(
            f"CREATE TABLE users (user_id {text_type}, plan {text_type}, country {text_type}, "
            f"ltv {number}, active {boolean}, note {text_type})"
        )
    )
    conn.execute(
        text(
            f"CREATE TABLE orders (id INTEGER, user_id {text_type}, completed_at {stamp}, "
            f"amount {number})"
        )
    )
    conn.execute(
        text("INSERT INTO users VALUES (:user_id, :plan, :country, :ltv, :active, :note)"),
        [vars(user) for user in USERS],
    )
    orders = [vars(order) | {"completed_at": order.completed_at} for order in ORDERS]
    if name == "sqlite":
        # Text timestamps as SQLite databases hold them, in both common spellings.
        for order in orders:
            if order["completed_at"] is not None:
                stamp_text = order["completed_at"].isoformat()
                order["completed_at"] = (
                    f"{stamp_text}Z" if order["id"] % 2 else stamp_text.replace("T", " ")
                )
    conn.execute(text("INSERT INTO orders VALUES (:id, :user_id, :completed_at, :amount)"), orders)
    conn.commit()


SPECS = {
    "users": ModelSpec(table="users", primary_key="user_id"),
    "orders": ModelSpec(table="orders", foreign_key="user_id", timestamp="completed_at"),
    "paid_orders": ModelSpec(
        sql="SELECT user_id AS buyer, amount FROM orders WHERE amount IS NOT NULL",
        foreign_key="buyer",
    ),
}


def test_compiled_rules_select_who_python_says(source: Connection) -> None:
    infos = {name: describe_model(source, name, spec) for name, spec in SPECS.items()}
    assert infos["paid_orders"].columns.keys() == {"buyer", "amount"}
    dialect = source.dialect.name
    wrong = []
    for name, rule, member in CASES:
        query = compile_rules(parse_rules(rule), infos["users"], infos)
        sql, params = compiled_sql(query, source.dialect)
        normalize_sql(sql, dialect)  # the read-only check of hand-written SQL
        rows = source.execute(text(sql).bindparams(**params)).scalars().all()
        got = sorted(rows)
        expected = sorted(user.user_id for user in USERS if member(user, dialect))
        if got != expected:
            wrong.append(f"{name}: got {got}, expected {expected}\n{sql}\n{params}")
    assert not wrong, "\n\n".join(wrong)


def test_the_compiled_select_runs_as_it_is_too(source: Connection) -> None:
    """The Select itself (as a preview might run it) gives the same ids as the stored SQL."""
    infos = {name: describe_model(source, name, spec) for name, spec in SPECS.items()}
    dialect = source.dialect.name
    for _, rule, member in CASES:
        query = compile_rules(parse_rules(rule), infos["users"], infos)
        expected = sorted(user.user_id for user in USERS if member(user, dialect))
        assert sorted(source.execute(query).scalars().all()) == expected, rule


def test_models_the_source_does_not_have(source: Connection) -> None:
    with pytest.raises(RuleError) as missing:
        describe_model(source, "people", ModelSpec(table="people", primary_key="id"))
    assert missing.value.path == ("table",)
    assert "no table 'people'" in str(missing.value)
    source.rollback()  # PostgreSQL: a failed statement ends the transaction
    with pytest.raises(RuleError) as no_column:
        describe_model(source, "users", ModelSpec(table="users", primary_key="id"))
    assert no_column.value.path == ("primary_key",)
    assert str(no_column.value).startswith("no column 'id' in model users (columns: active, ")
    with pytest.raises(RuleError) as refused:
        describe_model(source, "bad", ModelSpec(sql="DELETE FROM users", foreign_key="user_id"))
    assert refused.value.path == ("sql",)
    with contextlib.suppress(Exception):
        source.rollback()
    with pytest.raises(RuleError) as failing:
        describe_model(source, "bad", ModelSpec(sql="SELECT nope FROM users", foreign_key="nope"))
    assert failing.value.path == ("sql",)
    assert "failed on source 'default'" in str(failing.value)


# A column with a time zone, as each database spells it (SQLite has none).
AWARE = {"postgresql": "TIMESTAMPTZ", "duckdb": "TIMESTAMPTZ", "mariadb": "TIMESTAMP(6) NULL"}
SESSION_ZONE = {
    "postgresql": "SET TIME ZONE 'America/New_York'",
    "duckdb": "SET TimeZone = 'America/New_York'",
    "mariadb": "SET time_zone = '-05:00'",
}


def test_within_is_the_databases_now_whatever_the_sessions_time_zone(source: Connection) -> None:
    """Naive timestamps hold UTC; a session five hours off UTC moves neither them nor "now"."""
    name = source.dialect.name
    stamps = f"seen {TYPES[name][3]}" + (f", seen_tz {AWARE[name]}" if name in AWARE else "")
    source.execute(text(f"CREATE TABLE events (user_id {TYPES[name][0]}, {stamps})"))
    one_hour, three_hours = NOW - timedelta(hours=1), NOW - timedelta(hours=3)
    values = [{"user_id": "u1", "seen": one_hour}, {"user_id": "u2", "seen": three_hours}]
    if name in AWARE:
        source.execute(
            text("INSERT INTO events VALUES (:user_id, :seen, :seen_tz)"),
            [row | {"seen_tz": row["seen"].replace(tzinfo=UTC)} for row in values],
        )
    else:
        source.execute(
            text("INSERT INTO events VALUES (:user_id, :seen)"),
            [row | {"seen": f"{row['seen'].isoformat()}Z"} for row in values],
        )
    if name in SESSION_ZONE:
        source.execute(text(SESSION_ZONE[name]))
    source.commit()
    users = describe_model(source, "users", SPECS["users"])
    for column in ("seen", "seen_tz") if name in AWARE else ("seen",):
        events = describe_model(
            source, "events", ModelSpec(table="events", foreign_key="user_id", timestamp=column)
        )
        rule = parse_rules({"related": "events", "at_least": 1, "within": "2h"})
        sql, params = compiled_sql(compile_rules(rule, users, {"events": events}), source.dialect)
        got = source.execute(text(sql).bindparams(**params)).scalars().all()
        assert got == ["u1"], (column, sql)
