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
    ("postgresql", "SET role postgres", "changes session settings"),
    ("postgresql", "DELETE FROM users", "writes"),
    ("postgresql", "CREATE TABLE x AS SELECT user_id FROM users", ""),
    ("postgresql", "EXPLAIN ANALYZE DELETE FROM users", "not a query"),
    ("sqlite", "ATTACH 'other.db' AS other", "attaches"),
    ("sqlite", "PRAGMA table_info(users)", "PRAGMA"),
    ("mysql", "SELECT user_id FROM users LOCK IN SHARE MODE", "row locks"),
    ("mysql", "SELECT user_id INTO OUTFILE '/tmp/x' FROM users", "not valid SQL for mysql"),
    ("mysql", "SELECT user_id FROM users INTO DUMPFILE '/tmp/y'", "not valid SQL for mysql"),
    ("mysql", "LOAD DATA INFILE '/etc/passwd' INTO TABLE users", "loads files"),
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


# Each warehouse's own SQL, read in its own dialect (the names SQLAlchemy's dialects report).
WAREHOUSE_DIALECTS = {
    "duckdb": "duckdb",
    "snowflake": "snowflake",
    "bigquery": "bigquery",
    "redshift": "redshift",
    "clickhousedb": "clickhouse",  # clickhouse-connect
    "trino": "trino",
    "databricks": "databricks",
}


@pytest.mark.parametrize(("sqlalchemy_name", "sqlglot_name"), WAREHOUSE_DIALECTS.items())
def test_each_warehouse_is_read_in_its_own_dialect(sqlalchemy_name: str, sqlglot_name: str) -> None:
    assert sqlglot_dialect(sqlalchemy_name) == sqlglot_name


WAREHOUSE_READS = [
    ("duckdb", "FROM users SELECT user_id"),
    ("duckdb", "FROM users"),
    ("duckdb", "SELECT user_id FROM read_parquet('data/users.parquet')"),
    ("duckdb", "SELECT user_id FROM read_csv('data/users.csv') WHERE plan = 'pro'"),
    ("duckdb", "SELECT user_id FROM 'data/users.parquet'"),
    (
        "snowflake",
        "SELECT user_id FROM users QUALIFY ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY ts) = 1",
    ),
    ("bigquery", "SELECT user_id FROM `my-project.marketing.users` WHERE plan = 'pro'"),
    ("bigquery", "SELECT user_id FROM `my-project`.marketing.users, UNNEST(tags) AS tag"),
    ("redshift", "SELECT LISTAGG(plan, ',') WITHIN GROUP (ORDER BY plan) AS user_id FROM users"),
    ("clickhousedb", "SELECT user_id FROM users FINAL WHERE plan = 'pro'"),
    ("clickhousedb", "SELECT user_id FROM users LIMIT 1 BY user_id"),
    ("trino", "SELECT user_id FROM users CROSS JOIN UNNEST(tags) AS t(tag) WHERE tag = 'pro'"),
    ("databricks", "SELECT user_id FROM `main`.`marketing`.`users` WHERE plan = 'pro'"),
]


@pytest.mark.parametrize(("dialect", "sql"), WAREHOUSE_READS)
def test_a_warehouse_read_is_accepted(dialect: str, sql: str) -> None:
    assert embeddable(f"{sql};", dialect) == sql


WAREHOUSE_REFUSALS = [
    ("duckdb", "INSTALL httpfs", "installs or loads an extension (INSTALL)"),
    ("duckdb", "FORCE INSTALL httpfs FROM community", "installs or loads an extension"),
    ("duckdb", "LOAD httpfs", "installs or loads an extension (LOAD)"),
    ("duckdb", "LOAD '/tmp/evil.duckdb_extension'", "installs or loads an extension (LOAD)"),
    ("duckdb", "CALL pragma_version()", "calls a procedure (CALL)"),
    ("duckdb", "EXPORT DATABASE '/tmp/dump'", "exports data to files (EXPORT)"),
    ("duckdb", "IMPORT DATABASE '/tmp/dump'", "imports a database from files (IMPORT)"),
    ("duckdb", "ATTACH 'other.duckdb' AS other", "attaches a database"),
    ("duckdb", "DETACH other", "detaches a database"),
    ("duckdb", "USE other", "(USE)"),
    ("duckdb", "SET enable_external_access = true", "changes session settings (SET)"),
    ("duckdb", "RESET threads", "changes session settings (RESET)"),
    ("duckdb", "PRAGMA enable_profiling", "runs a PRAGMA"),
    ("duckdb", "COPY users TO 'users.csv'", "copies data in or out (COPY)"),
    ("duckdb", "COPY (SELECT user_id FROM users) TO 'ids.parquet'", "(COPY)"),
    ("duckdb", "SUMMARIZE users", "describes data (SUMMARIZE)"),
    ("duckdb", "DESCRIBE users", "describes data (DESCRIBE)"),
    ("duckdb", "SHOW users", "describes the database (SHOW)"),
    ("duckdb", "SHOW TABLES", "describes the database (SHOW)"),
    ("duckdb", "CHECKPOINT", "writes the database (CHECKPOINT)"),
    ("snowflake", "PUT file:///tmp/ids.csv @my_stage", "uploads files to a stage (PUT)"),
    ("snowflake", "GET @my_stage file:///tmp/", "downloads files from a stage (GET)"),
    ("snowflake", "REMOVE @my_stage", "removes files from a stage (REMOVE)"),
    ("snowflake", "RM @my_stage/ids.csv", "removes files from a stage (RM)"),
    ("snowflake", "COPY INTO @my_stage FROM users", "(COPY)"),
    ("snowflake", "USE ROLE accountadmin", "(USE)"),
    ("snowflake", "USE WAREHOUSE big", "(USE)"),
    ("snowflake", "ALTER SESSION SET STATEMENT_TIMEOUT_IN_SECONDS = 0", "(ALTER SESSION)"),
    ("snowflake", "SET x = 1", "changes session settings (SET)"),
    ("snowflake", "UNSET x", "changes session settings (UNSET)"),
    ("snowflake", "CALL cleanup()", "calls a procedure (CALL)"),
    ("snowflake", "EXECUTE IMMEDIATE 'DELETE FROM users'", "runs dynamic SQL (EXECUTE)"),
    (
        "bigquery",
        "EXPORT DATA OPTIONS (uri = 'gs://bucket/ids-*.csv', format = 'CSV') AS "
        "SELECT user_id FROM marketing.users",
        "exports data to files (EXPORT)",
    ),
    ("bigquery", "LOAD DATA INTO marketing.users FROM FILES (uris = ['gs://b/x'])", "loads files"),
    ("bigquery", "CALL marketing.cleanup()", "calls a procedure (CALL)"),
    ("bigquery", "DECLARE x INT64", "declares variables"),
    ("bigquery", "BEGIN", "controls the transaction (BEGIN)"),
    ("redshift", "UNLOAD ('SELECT * FROM users') TO 's3://b/x' IAM_ROLE 'r'", "(UNLOAD)"),
    ("redshift", "COPY users FROM 's3://b/x' IAM_ROLE 'r'", "(COPY)"),
    ("redshift", "SET statement_timeout TO 0", "changes session settings (SET)"),
    ("redshift", "RESET statement_timeout", "changes session settings (RESET)"),
    ("redshift", "CALL cleanup()", "calls a procedure (CALL)"),
    ("redshift", "SELECT user_id INTO TEMP ids FROM users", "SELECT … INTO"),
    ("redshift", "LOCK users", "takes table locks (LOCK)"),
    ("redshift", "VACUUM users", "rewrites tables (VACUUM)"),
    ("clickhousedb", "SYSTEM DROP DNS CACHE", "runs a SYSTEM statement on the server"),
    ("clickhousedb", "SYSTEM STOP MERGES", "runs a SYSTEM statement"),
    ("clickhousedb", "OPTIMIZE TABLE users FINAL", "rewrites tables (OPTIMIZE)"),
    ("clickhousedb", "KILL QUERY WHERE user = 'syncer'", "kills queries or sessions (KILL)"),
    (
        "clickhousedb",
        "SELECT user_id FROM users SETTINGS max_execution_time = 0",
        "changes the query's settings (SETTINGS)",
    ),
    (
        "clickhousedb",
        "SELECT user_id FROM (SELECT user_id FROM users SETTINGS readonly = 0)",
        "(SETTINGS)",
    ),
    ("clickhousedb", "SELECT 'a' UNION ALL SELECT 'b' SETTINGS max_threads = 64", "(SETTINGS)"),
    ("clickhousedb", "SELECT user_id FROM users FORMAT CSV", "sets the output format (FORMAT)"),
    ("clickhousedb", "SET max_execution_time = 0", "changes session settings (SET)"),
    ("clickhousedb", "SHOW TABLES", "describes the database (SHOW)"),
    ("trino", "SET SESSION query_max_execution_time = '365d'", "changes session settings (SET)"),
    ("trino", "RESET SESSION query_max_execution_time", "changes session settings (RESET)"),
    ("trino", "SET ROLE admin", "changes session settings (SET)"),
    ("trino", "CALL system.sync_partition_metadata('m', 'u', 'FULL')", "calls a procedure"),
    ("trino", "USE hive.marketing", "(USE)"),
    ("trino", "PREPARE q FROM DELETE FROM users", "runs dynamic SQL (PREPARE)"),
    ("trino", "EXECUTE q", "runs dynamic SQL (EXECUTE)"),
    ("trino", "EXPLAIN ANALYZE DELETE FROM users", "explains a statement (EXPLAIN)"),
    ("databricks", "SET spark.databricks.io.cache.enabled = false", "changes session settings"),
    ("databricks", "RESET", "changes session settings (RESET)"),
    ("databricks", "USE CATALOG hive_metastore", "(USE)"),
    ("databricks", "OPTIMIZE users", "rewrites tables (OPTIMIZE)"),
    ("databricks", "COPY INTO users FROM 's3://b/x' FILEFORMAT = CSV", "(COPY)"),
    ("databricks", "CACHE TABLE users", "caches a table"),
    ("databricks", "ADD JAR '/tmp/evil.jar'", "adds files to the session (ADD)"),
    ("databricks", "INSERT OVERWRITE DIRECTORY '/tmp/x' SELECT user_id FROM users", "writes"),
]


@pytest.mark.parametrize(("dialect", "sql", "reason"), WAREHOUSE_REFUSALS)
def test_a_warehouse_statement_is_refused_with_what_it_does(
    dialect: str, sql: str, reason: str
) -> None:
    with pytest.raises(AudienceError) as caught:
        embeddable(sql, dialect)
    message = str(caught.value)
    assert reason in message
    assert message.startswith("the audience SQL ")
    assert message.endswith("returning user ids")
    assert "\n" not in message


def test_a_keyword_inside_a_string_or_quoted_name_is_not_a_statement() -> None:
    # A string or a quoted name alone is no query, and is not taken for the keyword it spells.
    for sql in ("'LOAD'", '"INSTALL"'):
        with pytest.raises(AudienceError, match="is not a query"):
            embeddable(sql, "duckdb")
    assert embeddable('SELECT "load" AS user_id FROM "install"', "duckdb")
