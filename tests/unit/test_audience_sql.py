"""Audience SQL is one read-only query, judged by sqlglot in the source's dialect."""

from __future__ import annotations

import pytest

from syncer.audience_sql import embeddable, sqlglot_dialect
from syncer.errors import AudienceError

ACCEPTED = [
    ("sqlite", "SELECT user_id FROM users", "SELECT user_id FROM users"),
    ("sqlite", "  SELECT user_id FROM users ;; ", "SELECT user_id FROM users"),
    ("sqlite", "SELECT user_id FROM users -- the pro ones", "SELECT user_id FROM users"),
    ("postgresql", "SELECT user_id FROM users; -- done\n", "SELECT user_id FROM users"),
    ("postgresql", "/* who */ SELECT user_id FROM users", "SELECT user_id FROM users"),
    ("postgresql", "WITH p AS (SELECT user_id FROM users) SELECT user_id FROM p", None),
    ("postgresql", "(SELECT 'a') UNION (SELECT 'b')", None),
    ("postgresql", "VALUES ('u1'), ('u2')", None),
    ("postgresql", "SELECT query_to_xml('select 1', true, true, '')", None),  # the DB judges
    # what sqlglot and PostgreSQL both read as a comment or a string, never as SQL
    ("postgresql", "SELECT user_id FROM users /* /* */ FOR UPDATE */", "SELECT user_id FROM users"),
    ("postgresql", "SELECT $q$;DELETE FROM users$q$ AS user_id", None),
    ("postgresql", "SELECT E'\\'' || user_id AS user_id FROM users", None),
    ("mysql", "SELECT user_id FROM users # hash comment", "SELECT user_id FROM users"),
    ("mariadb", "SELECT user_id FROM users", None),
    ("duckdb", "SELECT user_id FROM users", None),
    ("some_warehouse", "SELECT user_id FROM users", None),  # unknown to sqlglot: generic SQL
]


@pytest.mark.parametrize(("dialect", "sql", "expected"), ACCEPTED)
def test_one_query_is_accepted(dialect: str, sql: str, expected: str | None) -> None:
    assert embeddable(sql, dialect) == (expected or sql)


REFUSED = [
    ("postgresql", "", "empty"),
    ("postgresql", " ; -- nothing", "empty"),
    ("postgresql", "SELEC user_id FROM users", "not valid SQL for postgres"),
    ("sqlite", "SELECT 1 /* unterminated", "not valid SQL for sqlite"),
    ("postgresql", "SELECT 1; SELECT 2", "2 statements"),
    ("postgresql", "SELECT 'a' AS user_id \\; DELETE FROM users", "not valid SQL"),  # psql's \;
    ("postgresql", "SELECT user_id FROM users; DELETE FROM users", "2 statements"),
    (
        "postgresql",
        "WITH d AS (DELETE FROM users RETURNING user_id) SELECT user_id FROM d",
        "writes",
    ),
    ("postgresql", "WITH u AS (UPDATE users SET plan = 'x' RETURNING user_id) SELECT * FROM u", ""),
    ("postgresql", "SELECT user_id INTO copy_of_users FROM users", "SELECT … INTO"),
    ("postgresql", "SELECT user_id FROM users FOR UPDATE", "row locks"),
    ("postgresql", "SELECT user_id FROM users FOR SHARE", "row locks"),
    ("postgresql", "COPY users TO '/tmp/users'", "COPY"),
    ("postgresql", "COPY (SELECT 1) TO PROGRAM 'touch /tmp/x'", "COPY"),
    ("postgresql", "SET role postgres", "not a query"),
    ("postgresql", "DELETE FROM users", "writes"),
    ("postgresql", "CREATE TABLE x AS SELECT user_id FROM users", ""),
    ("postgresql", "EXPLAIN ANALYZE DELETE FROM users", "not a query"),
    ("sqlite", "ATTACH 'other.db' AS other", "attaches"),
    ("sqlite", "PRAGMA table_info(users)", "PRAGMA"),
    ("mysql", "SELECT user_id FROM users LOCK IN SHARE MODE", "row locks"),
    ("mysql", "SELECT user_id INTO OUTFILE '/tmp/x' FROM users", "not valid SQL for mysql"),
    ("mysql", "SELECT user_id FROM users INTO DUMPFILE '/tmp/y'", "not valid SQL for mysql"),
    ("mysql", "LOAD DATA INFILE '/etc/passwd' INTO TABLE users", "not valid SQL for mysql"),
    ("mysql", "SELECT @x := user_id FROM users", "session variable"),
    ("mysql", "SELECT user_id /*!, (SELECT 1) */ FROM users", "executable comment"),
    ("mariadb", "SELECT /*+ SET_VAR(sort_buffer_size = 1) */ user_id FROM users", "hint"),
]


@pytest.mark.parametrize(("dialect", "sql", "reason"), REFUSED)
def test_anything_else_is_refused_with_its_reason(dialect: str, sql: str, reason: str) -> None:
    with pytest.raises(AudienceError, match=reason or None) as caught:
        embeddable(sql, dialect)
    assert "\n" not in str(caught.value)


def test_a_trailing_comment_cannot_reach_the_sql_around_it() -> None:
    embedded = embeddable("SELECT user_id FROM users -- ) AS x UNION SELECT secret", "sqlite")
    assert embedded == "SELECT user_id FROM users"


def test_sqlalchemy_dialects_map_to_sqlglot_ones() -> None:
    assert sqlglot_dialect("postgresql") == "postgres"
    assert sqlglot_dialect("mariadb") == "mysql"
    assert sqlglot_dialect("sqlite") == "sqlite"
    assert sqlglot_dialect("snowflake") == "snowflake"
    assert sqlglot_dialect("nothing_sqlglot_knows") == ""
