"""Rules: parsed into typed conditions with errors located as in the file, and compiled to one
query per dialect with bound values (syncer.definitions.rules). The queries run on real
databases in tests/integration/test_rules_sql.py."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import (
    Boolean,
    Date,
    DateTime,
    Float,
    Integer,
    String,
    create_engine,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.sql.sqltypes import NullType

from syncer.definitions.rules import (
    CONDITION,
    MAX_CONDITIONS,
    MAX_DEPTH,
    MAX_VALUES,
    OPERATORS,
    AttributeCondition,
    Group,
    ModelInfo,
    ModelSpec,
    RelatedCondition,
    RuleError,
    compile_rules,
    compiled_sql,
    describe_model,
    display_sql,
    parse_rules,
    rules_data,
)
from syncer.sources import normalize_sql

USERS = ModelInfo(
    "users",
    ModelSpec(table="users", primary_key="user_id"),
    {
        "user_id": String(),
        "plan": String(),
        "ltv": Float(),
        "active": Boolean(),
        "signed_up": Date(),
        "Country": String(),
    },
)
ORDERS = ModelInfo(
    "orders",
    ModelSpec(table="shop.orders", foreign_key="user_id", timestamp="completed_at"),
    {"id": Integer(), "user_id": String(), "completed_at": DateTime(), "amount": Float()},
)
VISITS = ModelInfo(
    "visits",
    ModelSpec(sql="SELECT user_id, page FROM visits", foreign_key="user_id"),
    {"user_id": NullType(), "page": NullType()},
)
MODELS = {"orders": ORDERS, "visits": VISITS, "users": USERS}

DIALECTS = {
    "sqlite": "sqlite://",
    "postgresql": "postgresql+psycopg://",
    "mysql": "mysql+pymysql://",
    "mariadb": "mariadb+pymysql://",
    "duckdb": "duckdb:///:memory:",
}


def dialect(name: str) -> Dialect:
    return create_engine(DIALECTS[name]).dialect


def compile_for(rule: Any, name: str = "sqlite") -> tuple[str, dict[str, Any]]:
    return compiled_sql(compile_rules(parse_rules(rule), USERS, MODELS), dialect(name))


def errors(rule: Any) -> list[tuple[tuple[str | int, ...], str]]:
    with pytest.raises(ValidationError) as raised:
        parse_rules(rule)
    return [(error["loc"], error["msg"]) for error in raised.value.errors()]


def rule_error(rule: Any) -> RuleError:
    with pytest.raises(RuleError) as raised:
        compile_rules(parse_rules(rule), USERS, MODELS)
    return raised.value


# --- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operator", "value"),
    [
        ("eq", "pro"),
        ("ne", "pro"),
        ("lt", 10),
        ("le", 10.5),
        ("gt", -1),
        ("ge", 0),
        ("in", ["pro", "enterprise"]),
        ("not_in", ["free"]),
        ("contains", "pr"),
        ("is_null", True),
        ("is_not_null", True),
    ],
)
def test_every_operator_parses_and_reads_back_as_written(operator: str, value: Any) -> None:
    written = {"attribute": "plan", operator: value}
    parsed = parse_rules(written)
    assert isinstance(parsed, AttributeCondition)
    assert (parsed.operator, parsed.value) == (operator, value)
    assert rules_data(parsed) == written


def test_a_nested_rule_reads_back_as_written() -> None:
    written = {
        "all": [
            {"related": "orders", "within": "30d", "at_least": 1},
            {"any": [{"attribute": "plan", "in": ["pro"]}, {"not": {"attribute": "ltv", "gt": 5}}]},
            {"related": "orders", "exactly": 2, "where": [{"attribute": "amount", "ge": 10}]},
            {"related": "orders", "at_most": 3, "where": {"not": {"attribute": "id", "eq": 1}}},
        ]
    }
    parsed = parse_rules(written)
    assert isinstance(parsed, Group) and parsed.kind == "all" and parsed.all_ is not None
    related = parsed.all_[0]
    assert isinstance(related, RelatedCondition)
    assert (related.count_operator, related.count, related.within_seconds) == (
        "at_least",
        1,
        30 * 86400,
    )
    assert rules_data(parsed) == written
    assert parse_rules(rules_data(parsed)) == parsed


def test_values_keep_their_types() -> None:
    parsed = parse_rules({"attribute": "a", "in": ["1", 1, 1.5, True]})
    assert isinstance(parsed, AttributeCondition)
    assert [type(v) for v in parsed.value] == [str, int, float, bool]


@pytest.mark.parametrize(
    ("rule", "where", "says"),
    [
        (
            {"all": [{"attribute": "plan", "eq": "x"}, {"attribute": "plan", "equals": "x"}]},
            ("all", 1, "equals"),
            "unknown operator 'equals'",
        ),
        (
            {"all": [{"attribute": "plan", "eq": "x", "ne": "y"}]},
            ("all", 0, "ne"),
            "one operator per condition, got eq and ne",
        ),
        ({"attribute": "plan"}, (), "give one operator"),
        ({"attribute": "plan", "in": []}, ("in",), "at least 1 item"),
        ({"attribute": "plan", "in": ["a", None]}, ("in", 1), "null is not a value here"),
        ({"attribute": "plan", "eq": None}, ("eq",), "use is_null: true"),
        ({"attribute": "plan", "eq": [1]}, ("eq",), "a value is text, a number or true/false"),
        ({"attribute": "plan", "eq": float("nan")}, ("eq",), "a value is text"),
        ({"attribute": "plan", "is_null": False}, ("is_null",), "Input should be True"),
        ({"attribute": "plan", "contains": 5}, ("contains",), "valid string"),
        ({"attribute": "plan", "contains": "a\x00b"}, ("contains",), "NUL character"),
        ({"attribute": "plan", "eq": "a\x00b"}, ("eq",), "NUL character"),
        ({"attribute": "ltv", "gt": 2**63}, ("gt",), "at most 9223372036854775807"),
        ({"attribute": "ltv", "in": [1, -(2**64)]}, ("in", 1), "at most 9223372036854775807"),
        ({"related": "orders", "at_least": 2**70}, ("at_least",), "less than or equal to"),
        ({"attribute": "", "eq": 1}, ("attribute",), "at least 1 character"),
        (
            {"any": [{"related": "orders", "at_least": 1, "within": "30 days"}]},
            ("any", 0, "within"),
            "'30 days' is not a duration",
        ),
        ({"related": "orders", "at_least": -1}, ("at_least",), "greater than or equal to 0"),
        ({"related": "orders", "at_least": "1"}, ("at_least",), "valid integer"),
        ({"related": "orders"}, (), "give exactly one of at_least, at_most, exactly"),
        (
            {"related": "orders", "at_least": 1, "at_most": 3},
            (),
            "got at_least and at_most",
        ),
        ({"related": "orders", "at_leest": 1}, ("at_leest",), "unknown key 'at_leest'"),
        (
            {"related": "orders", "at_least": 1, "where": [{"related": "x", "at_least": 1}]},
            ("where", 0, "related"),
            "on the related model's own columns",
        ),
        (
            {"related": "orders", "at_least": 1, "where": {"any": [{"attribute": "a", "eqq": 1}]}},
            ("where", "any", 0, "eqq"),
            "unknown operator 'eqq'",
        ),
        ({"all": [{"nothing": 1}]}, ("all", 0, "nothing"), "unknown key 'nothing'"),
        ({"all": [5]}, ("all", 0), "a condition is {attribute"),
        ({"all": [{"attribute": "a", "eq": 1, "related": "o"}]}, ("all", 0), "one kind"),
        ({"all": [], "any": []}, (), "got all and any"),
        ({"all": [], "one": 1}, ("one",), "unknown key 'one'"),
        ({"not": None}, (), "give exactly one of all, any or not"),
        ("plan = 'pro'", (), "a condition is {attribute"),
    ],
)
def test_bad_rules_are_located_as_in_the_file(
    rule: Any, where: tuple[str | int, ...], says: str
) -> None:
    found = errors(rule)
    assert len(found) == 1, found
    assert found[0][0] == where
    assert says in found[0][1]


def test_rules_are_bounded() -> None:
    deep: dict[str, Any] = {"attribute": "a", "eq": 1}
    for _ in range(MAX_DEPTH):
        deep = {"not": deep}
    assert errors(deep) == [((), f"conditions are nested more than {MAX_DEPTH} deep")]
    parse_rules(deep["not"])  # one level less is fine
    wide = {"any": [{"attribute": "a", "eq": n} for n in range(MAX_CONDITIONS)]}
    assert errors(wide) == [((), f"a rule holds more than {MAX_CONDITIONS} conditions")]
    parse_rules({"any": wide["any"][:-1]})
    many = {"attribute": "a", "in": list(range(MAX_VALUES + 1))}
    assert errors(many)[0][0] == ("in",)
    parse_rules({"attribute": "a", "in": list(range(MAX_VALUES))})


def test_a_huge_list_is_refused_before_it_is_parsed() -> None:
    assert errors({"all": [1] * 1_000_000}) == [
        ((), f"a rule holds more than {MAX_CONDITIONS} conditions")
    ]


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"table": "t", "sql": "SELECT 1", "primary_key": "id"}, "exactly one of table"),
        ({"primary_key": "id"}, "exactly one of table"),
        ({"table": "t"}, "give primary_key"),
        ({"table": "t", "primary_key": "id", "extra": 1}, "Extra inputs"),
    ],
)
def test_bad_models(spec: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError) as raised:
        ModelSpec.model_validate(spec)
    assert says in str(raised.value)


def test_parent_and_related_models() -> None:
    assert USERS.spec.is_parent and not USERS.spec.is_related
    assert ORDERS.spec.is_related and not ORDERS.spec.is_parent
    both = ModelSpec(table="t", primary_key="id", foreign_key="user_id")
    assert both.is_related and not both.is_parent


def test_json_schemas_come_out_clean() -> None:
    schema = CONDITION.json_schema()
    json.dumps(schema)
    defs = schema["$defs"]
    assert {"AttributeCondition", "RelatedCondition", "Group", "WhereGroup"} <= set(defs)
    attribute = defs["AttributeCondition"]
    assert set(attribute["properties"]) == {"attribute", *OPERATORS}
    assert attribute["additionalProperties"] is False
    # one operator: the attribute and one more key
    assert (attribute["minProperties"], attribute["maxProperties"]) == (2, 2)
    assert attribute["properties"]["in"]["minItems"] == 1
    assert attribute["properties"]["in"]["maxItems"] == MAX_VALUES
    group = defs["Group"]
    assert set(group["properties"]) == {"all", "any", "not"}
    assert (group["minProperties"], group["maxProperties"]) == (1, 1)
    related = defs["RelatedCondition"]
    assert related["oneOf"] == [{"required": [key]} for key in ("at_least", "at_most", "exactly")]
    assert related["properties"]["at_least"] == {
        "minimum": 0,
        "maximum": 2**63 - 1,
        "title": "At Least",
        "type": "integer",
    }
    model = ModelSpec.model_json_schema()
    assert model["oneOf"] == [{"required": ["table"]}, {"required": ["sql"]}]
    # a key is given with a value or left out: null is nowhere a value
    shown = json.dumps([schema, model])
    assert '"null"' not in shown and '"default": null' not in shown


# --- compiling -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "path", "message"),
    [
        (
            {"all": [{"attribute": "plan", "eq": "x"}, {"attribute": "plann", "eq": "x"}]},
            ("rules", "all", 1, "attribute"),
            "no column 'plann' in model users (columns: Country, active, ltv, plan, "
            "signed_up, user_id)",
        ),
        (
            {"any": [{"related": "order", "at_least": 1}]},
            ("rules", "any", 0, "related"),
            "no model 'order' (known: orders, users, visits)",
        ),
        (
            {"related": "users", "at_least": 1},
            ("rules", "related"),
            "model 'users' is not related: give a model with foreign_key",
        ),
        (
            {"related": "visits", "at_least": 1, "within": "30d"},
            ("rules", "within"),
            "'within' needs a timestamp on model 'visits'",
        ),
        (
            {"related": "orders", "at_least": 1, "where": [{"attribute": "plan", "eq": "x"}]},
            ("rules", "where", 0, "attribute"),
            "no column 'plan' in model orders",
        ),
        (
            {"not": {"attribute": "ltv", "contains": "1"}},
            ("rules", "not", "contains"),
            "contains needs a text column; 'ltv' is a number column",
        ),
        (
            {"attribute": "plan", "eq": 5},
            ("rules", "eq"),
            "'plan' is a text column: write the value in quotes ('5')",
        ),
        (
            {"attribute": "plan", "in": ["pro", 5]},
            ("rules", "in", 1),
            "'plan' is a text column",
        ),
        (
            {"attribute": "plan", "ne": False},  # `ne: no` in YAML
            ("rules", "ne"),
            "'plan' is a text column, and YAML read this value as false (it does so with yes",
        ),
        (
            {"attribute": "ltv", "gt": "100"},
            ("rules", "gt"),
            "'ltv' is a number column: write a number, not '100'",
        ),
        ({"attribute": "ltv", "gt": True}, ("rules", "gt"), "'ltv' is a number column"),
        (
            {"attribute": "active", "eq": 1},
            ("rules", "eq"),
            "'active' is a true/false column: write true or false",
        ),
        (
            {"attribute": "signed_up", "ge": "last week"},
            ("rules", "ge"),
            "'signed_up' is a date column: write a date in quotes, like '2024-01-31'",
        ),
    ],
)
def test_rules_that_do_not_fit_the_models(
    rule: Any, path: tuple[str | int, ...], message: str
) -> None:
    error = rule_error(rule)
    assert error.path == path
    assert str(error).startswith(message)


def test_columns_match_ignoring_case_when_that_is_unambiguous() -> None:
    sql, params = compile_for({"attribute": "country", "eq": "US"})
    assert 'users."Country" = :Country_1' in sql.replace("\n", " ")
    assert params == {"Country_1": "US"}


def test_related_models_share_the_parents_source() -> None:
    elsewhere = ModelInfo(
        "events",
        ModelSpec(source="warehouse", table="events", foreign_key="user_id"),
        {"user_id": String()},
    )
    with pytest.raises(RuleError) as raised:
        compile_rules(
            parse_rules({"related": "events", "at_least": 1}), USERS, {"events": elsewhere}
        )
    assert raised.value.path == ("rules", "related")
    assert "is on source 'warehouse'" in str(raised.value)


def test_the_parent_must_be_a_parent() -> None:
    with pytest.raises(RuleError, match="not a parent model"):
        compile_rules(parse_rules({"all": []}), ORDERS, MODELS)


def flat(sql: str) -> str:
    return " ".join(sql.split())


def test_leaves_are_two_valued() -> None:
    """A NULL never makes a condition unknown: ``not`` of it is what a reader expects."""
    cases = {
        "eq": "users.plan IS NOT NULL AND users.plan = :plan_1",
        "lt": "users.plan IS NOT NULL AND users.plan < :plan_1",
        "ge": "users.plan IS NOT NULL AND users.plan >= :plan_1",
        "ne": "users.plan IS NULL OR users.plan != :plan_1",
    }
    for op, expected in cases.items():
        sql, _ = compile_for({"attribute": "plan", op: "pro"}, "postgresql")
        assert flat(sql).endswith(f"WHERE {expected}"), sql
    sql, params = compile_for({"attribute": "plan", "not_in": ["a", "b"]}, "postgresql")
    assert flat(sql).endswith("WHERE users.plan IS NULL OR (users.plan NOT IN (:plan_1, :plan_2))")
    assert params == {"plan_1": "a", "plan_2": "b"}
    sql, _ = compile_for({"not": {"attribute": "plan", "in": ["a"]}}, "postgresql")
    assert flat(sql).endswith("WHERE NOT (users.plan IS NOT NULL AND users.plan IN (:plan_1))")


def test_not_with_nulls_on_sqlite() -> None:
    """Run on an in-memory SQLite database: a user without a plan is "not pro"."""
    engine = create_engine("sqlite://")
    with engine.connect() as conn:
        conn.execute(text("CREATE TABLE users (user_id TEXT, plan TEXT, ltv REAL)"))
        conn.execute(
            text("INSERT INTO users VALUES ('a', 'pro', 1), ('b', NULL, NULL), ('c', 'free', 5)")
        )
        for rule, expected in [
            ({"not": {"attribute": "plan", "eq": "pro"}}, ["b", "c"]),
            ({"attribute": "plan", "ne": "pro"}, ["b", "c"]),
            ({"not": {"attribute": "plan", "ne": "pro"}}, ["a"]),
            ({"not": {"attribute": "ltv", "lt": 3}}, ["b", "c"]),
            ({"not": {"attribute": "plan", "not_in": ["pro"]}}, ["a"]),
            ({"not": {"attribute": "plan", "contains": "PR"}}, ["b", "c"]),
            ({"not": {"any": []}}, ["a", "b", "c"]),
        ]:
            sql, params = compile_for(rule)
            got = conn.execute(text(sql).bindparams(**params)).scalars().all()
            assert sorted(got) == expected, rule


def test_empty_groups() -> None:
    assert flat(compile_for({"all": []}, "postgresql")[0]).endswith("WHERE true")
    assert flat(compile_for({"any": []}, "postgresql")[0]).endswith("WHERE false")


def test_related_counts() -> None:
    exists = compile_for({"related": "orders", "at_least": 1}, "postgresql")
    assert (
        "WHERE EXISTS (SELECT 1 FROM shop.orders AS orders WHERE orders.user_id = users.user_id)"
        in flat(exists[0])
    )
    assert exists[1] == {}
    for rule in ({"related": "orders", "exactly": 0}, {"related": "orders", "at_most": 0}):
        sql, _ = compile_for(rule, "postgresql")
        assert "WHERE NOT (EXISTS (SELECT 1 FROM shop.orders" in flat(sql)
    assert flat(compile_for({"related": "orders", "at_least": 0}, "postgresql")[0]).endswith(
        "WHERE true"
    )
    for op, sign in (("at_least", ">="), ("at_most", "<="), ("exactly", "=")):
        sql, params = compile_for({"related": "orders", op: 3}, "postgresql")
        assert (
            "(SELECT count(*) AS count_1 FROM shop.orders AS orders "
            f"WHERE orders.user_id = users.user_id) {sign} :{op}_1"
        ) in flat(sql)
        assert params == {f"{op}_1": 3}


def test_a_query_model_is_a_subquery() -> None:
    sql, params = compile_for(
        {"related": "visits", "at_least": 1, "where": {"attribute": "page", "eq": 7}}
    )
    assert "FROM (SELECT user_id, page FROM visits\n) AS visits" in sql
    assert "visits.page = :page_1" in sql
    assert params == {"page_1": 7}  # the column's type is unknown: the value binds as it is


def test_values_are_bound_never_pasted() -> None:
    tricky = "O'Brien'); DROP TABLE users; --\n:plan"
    sql, params = compile_for({"attribute": "plan", "in": [tricky, "%_"]}, "postgresql")
    assert "O'Brien" not in sql and "DROP" not in sql and "%_" not in sql
    assert params == {"plan_1": tricky, "plan_2": "%_"}
    shown = display_sql(
        compile_rules(parse_rules({"attribute": "plan", "eq": tricky}), USERS, MODELS),
        dialect("sqlite"),
    )
    # the value is shown as JSON, on its comment line: a line break cannot end the comment
    assert shown.splitlines()[-1] == f"--   :plan_1 = {json.dumps(tricky)}"
    assert shown.splitlines()[-2] == "-- values:"


def test_contains_matches_percent_and_underscore_literally() -> None:
    sql, params = compile_for({"attribute": "plan", "contains": "50%_off/"}, "postgresql")
    assert "users.plan ILIKE '%' || :plan_1 || '%' ESCAPE '/'" in flat(sql)
    assert params == {"plan_1": "50/%/_off//"}


WITHIN = {
    "sqlite": "(datetime(orders.completed_at) >= datetime('now', '-' || :within_seconds_1 || ' seconds'))",
    "postgresql": "(orders.completed_at >= (now() AT TIME ZONE 'UTC') - make_interval(secs => :within_seconds_1))",
    "mysql": "(orders.completed_at >= UTC_TIMESTAMP(6) - INTERVAL :within_seconds_1 SECOND)",
    "mariadb": "(orders.completed_at >= UTC_TIMESTAMP(6) - INTERVAL :within_seconds_1 SECOND)",
    "duckdb": "(orders.completed_at >= CAST(timezone('UTC', now()) AS TIMESTAMP) - to_seconds(CAST(:within_seconds_1 AS BIGINT)))",
}

SAME_RULE = {
    "all": [
        {
            "related": "orders",
            "within": "1d12h",
            "at_least": 2,
            "where": [{"attribute": "amount", "gt": 9.5}],
        },
        {"attribute": "plan", "in": ["pro", "enterprise"]},
        {"not": {"attribute": "Country", "contains": "x"}},
        {
            "any": [
                {"attribute": "active", "eq": True},
                {"attribute": "signed_up", "ge": "2024-01-31"},
            ]
        },
    ]
}


@pytest.mark.parametrize("name", sorted(DIALECTS))
def test_the_same_rule_in_each_dialect(name: str) -> None:
    sql, params = compile_for(SAME_RULE, name)
    assert WITHIN[name] in flat(sql)
    assert params == {
        "within_seconds_1": 36 * 3600,
        "amount_1": 9.5,
        "at_least_1": 2,
        "plan_1": "pro",
        "plan_2": "enterprise",
        "Country_1": "x",
        "active_1": True,
        "signed_up_1": "2024-01-31",
    }
    # the placeholders are SQLAlchemy's :name, each one a parameter text() finds again
    assert set(re.findall(r"(?<![:\w]):(\w+)", sql)) == set(params)
    assert set(text(sql).bindparams(**params).compile().params) == set(params)
    normalize_sql(sql, dialect(name).name)  # the read-only check of hand-written SQL


def test_within_reads_the_columns_time_zone() -> None:
    aware = ModelInfo(
        "events",
        ModelSpec(table="events", foreign_key="user_id", timestamp="at"),
        {"user_id": String(), "at": DateTime(timezone=True)},
    )
    in_text = ModelInfo(
        "clicks",
        ModelSpec(table="clicks", foreign_key="user_id", timestamp="at"),
        {"user_id": String(), "at": String()},
    )
    in_seconds = ModelInfo(
        "views",
        ModelSpec(table="views", foreign_key="user_id", timestamp="at"),
        {"user_id": String(), "at": Integer()},
    )
    on_mysql = ModelInfo(
        "logins",
        ModelSpec(table="logins", foreign_key="user_id", timestamp="at"),
        {"user_id": String(), "at": mysql.TIMESTAMP()},
    )
    related = {"events": aware, "clicks": in_text, "views": in_seconds, "logins": on_mysql}

    def within(model: str, name: str) -> str:
        rule = parse_rules({"related": model, "at_least": 1, "within": "1h"})
        return flat(compiled_sql(compile_rules(rule, USERS, related), dialect(name))[0])

    assert "events.at >= now() - make_interval(" in within("events", "postgresql")
    assert "events.at >= now() - to_seconds(" in within("events", "duckdb")
    assert "CAST(clicks.at AS TIMESTAMP) >= (now() AT TIME ZONE 'UTC')" in within(
        "clicks", "postgresql"
    )
    assert "datetime(views.at, 'unixepoch') >= datetime('now'" in within("views", "sqlite")
    assert "logins.at >= NOW(6) - INTERVAL" in within("logins", "mysql")
    assert "CURRENT_TIMESTAMP - :within_seconds_1 * INTERVAL '1' SECOND" in flat(
        compiled_sql(
            compile_rules(
                parse_rules({"related": "orders", "at_least": 1, "within": "1h"}), USERS, MODELS
            ),
            DefaultDialect(),  # a dialect syncer has no rendering of its own for
        )[0]
    )


def test_placeholders_are_plain_names_whatever_the_column_is_called() -> None:
    odd = ModelInfo(
        "people",
        ModelSpec(table="people", primary_key="id"),
        {"id": String(), "first name": String(), "straße": String(), "2fa": Boolean()},
    )
    rule = parse_rules(
        {
            "all": [
                {"attribute": "first name", "eq": "a"},
                {"attribute": "straße", "eq": "b"},
                {"attribute": "2fa", "eq": True},
            ]
        }
    )
    sql, params = compiled_sql(compile_rules(rule, odd, {}), dialect("postgresql"))
    assert params == {"first_name_1": "a", "stra_e_1": "b", "value_2fa_1": True}
    assert set(text(sql).bindparams(**params).compile().params) == set(params)


def test_display_sql_without_values_is_the_sql() -> None:
    query = compile_rules(parse_rules({"attribute": "plan", "is_null": True}), USERS, MODELS)
    assert display_sql(query, dialect("sqlite")) == compiled_sql(query, dialect("sqlite"))[0]


def test_describing_models() -> None:
    """On an in-memory SQLite database (tests/integration runs it on each database)."""
    engine = create_engine("sqlite://")
    with engine.connect() as conn:
        conn.execute(text("CREATE TABLE Users (User_Id TEXT, Plan TEXT)"))
        info = describe_model(conn, "users", ModelSpec(table="Users", primary_key="user_id"))
        assert list(info.columns) == ["User_Id", "Plan"]
        assert isinstance(info.columns["Plan"], String)
        query = compile_rules(parse_rules({"attribute": "plan", "eq": "x"}), info, {})
        assert compiled_sql(query, conn.dialect)[0].startswith('SELECT users."User_Id" AS user_id')
        model = describe_model(
            conn,
            "plans",
            ModelSpec(sql="SELECT User_Id AS owner, Plan FROM Users;  -- all", foreign_key="owner"),
        )
        assert model.spec.sql == "SELECT User_Id AS owner, Plan FROM Users"
        assert list(model.columns) == ["owner", "Plan"]
        assert isinstance(model.columns["owner"], NullType)
        with pytest.raises(RuleError) as colon:
            describe_model(
                conn, "t", ModelSpec(sql="SELECT User_Id, ' :x' AS t FROM Users", foreign_key="t")
            )
        assert colon.value.path == ("sql",)
        assert "holds ':x'" in str(colon.value)
        with pytest.raises(RuleError) as no_stamp:
            describe_model(
                conn,
                "users",
                ModelSpec(table="Users", foreign_key="User_Id", timestamp="created_at"),
            )
        assert no_stamp.value.path == ("timestamp",)
        assert (
            str(no_stamp.value) == "no column 'created_at' in model users (columns: Plan, User_Id)"
        )
