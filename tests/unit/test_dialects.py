"""What syncer states and sets up for each kind of source database (syncer.dialects)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from syncer.dialects import GENERIC, KNOWN, dialect_for, engine_options, install_hint

WAREHOUSES = ("duckdb", "snowflake", "bigquery", "redshift", "clickhousedb", "trino", "databricks")


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_every_known_dialect_states_its_guarantees(name: str) -> None:
    dialect = KNOWN[name]
    assert dialect.name == name
    assert dialect.title
    for said in (dialect.read_only, dialect.timeout, dialect.streaming):
        assert said.strip() and "\n" not in said
    if name != "sqlite":
        assert dialect.extra, f"{name}: no extra installs its dialect"


def test_every_warehouse_has_an_entry() -> None:
    assert set(WAREHOUSES) <= set(KNOWN)
    assert all(dialect_for(name) is KNOWN[name] for name in WAREHOUSES)


def test_a_dialect_syncer_does_not_know_gets_the_generic_rules() -> None:
    assert dialect_for("nonsense") is GENERIC
    assert dialect_for("") is GENERIC
    assert not GENERIC.server_timeout and not GENERIC.tested
    assert "role" in GENERIC.read_only
    assert "batches" in GENERIC.streaming


def test_only_the_databases_tested_here_say_they_are() -> None:
    tested = {name for name, dialect in KNOWN.items() if dialect.tested}
    assert tested == {"sqlite", "postgresql", "mysql", "mariadb", "duckdb"}


def _options(url: str, seconds: float) -> dict[str, object]:
    options, _finish = engine_options(
        make_url(url), timeout_seconds=seconds, allowed_directories=()
    )
    return options


@pytest.mark.parametrize(("seconds", "whole"), [(30, 30), (2.4, 2), (2.6, 3), (0.2, 1)])
def test_server_timeouts_are_whole_seconds_of_query_timeout_seconds(
    seconds: float, whole: int
) -> None:
    snowflake = _options("snowflake://u:p@acct/db/public?warehouse=wh", seconds)
    assert snowflake["connect_args"] == {
        "session_parameters": {"STATEMENT_TIMEOUT_IN_SECONDS": whole}
    }
    trino = _options("trino://u@host:443/hive/marketing", seconds)
    assert trino["connect_args"] == {
        "session_properties": {"query_max_execution_time": f"{whole}s"}
    }
    databricks = _options("databricks://token:t@host?http_path=/sql/1.0/w/x", seconds)
    assert databricks["connect_args"]["session_configuration"] == {"STATEMENT_TIMEOUT": str(whole)}
    # connecting to an unreachable host is bounded too (the connector's default: 15 minutes)
    assert databricks["connect_args"]["_retry_stop_after_attempts_duration"] <= 60
    clickhouse = _options("clickhousedb://u:p@host:8443/marketing", seconds)
    assert clickhouse["connect_args"] == {"max_execution_time": whole}


def test_redshift_sets_the_statement_timeout_on_each_connection() -> None:
    options, finish = engine_options(
        make_url("redshift+psycopg2://u:p@host:5439/dev"),
        timeout_seconds=2.5,
        allowed_directories=(),
    )
    assert "connect_args" not in options
    assert finish is not None
    # Any engine carries the listener; no Redshift is reached to see it registered.
    engine = create_engine("sqlite://")
    try:
        before = len(engine.pool.dispatch.connect)
        finish(engine)
        assert len(engine.pool.dispatch.connect) == before + 1
    finally:
        engine.dispose()


def test_duckdb_opens_read_only_without_extensions(tmp_path: Path) -> None:
    options, finish = engine_options(
        make_url(f"duckdb:///{tmp_path / 'w.duckdb'}"),
        timeout_seconds=5,
        allowed_directories=(tmp_path,),
    )
    assert finish is not None
    connect_args = options["connect_args"]
    assert connect_args["read_only"] is True
    assert connect_args["config"] == {
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
    }


def test_a_dialect_without_options_gets_a_pre_ping_only() -> None:
    options, finish = engine_options(
        make_url("nonsense://h/d"), timeout_seconds=5, allowed_directories=()
    )
    assert options == {"pool_pre_ping": True}
    assert finish is None


@pytest.mark.parametrize(
    ("url", "extra"),
    [
        ("duckdb:///w.duckdb", "duckdb"),
        ("snowflake://u:p@acct/db", "snowflake"),
        ("bigquery://project/dataset", "bigquery"),
        ("redshift+psycopg2://u:p@h:5439/dev", "redshift"),
        ("redshift://u:p@h:5439/dev", "redshift"),
        ("clickhousedb://u:p@h:8443/db", "clickhouse"),
        ("trino://u@h:443/c/s", "trino"),
        ("databricks://token:t@h?http_path=/x", "databricks"),
        ("postgresql+psycopg://u@h/d", "postgres"),
        ("mysql+pymysql://u@h/d", "mysql"),
        ("mariadb+pymysql://u@h/d", "mysql"),
    ],
)
def test_install_hint_names_the_extra(url: str, extra: str) -> None:
    assert install_hint(make_url(url)) == f'pip install "syncer[{extra}]"'


def test_install_hint_for_a_dialect_without_an_extra() -> None:
    for url in ("nosuchdb://h/d", "sqlite:///x.db"):
        hint = install_hint(make_url(url))
        assert "pip install" not in hint
        assert "SQLAlchemy dialect" in hint
