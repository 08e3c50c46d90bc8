"""Warehouse URLs through the ``syncer`` CLI: accepted when the dialect's package is installed,
refused with the extra to install when it is not; audience SQL judged in the warehouse's dialect.

No test reaches a network: hosts are 127.0.0.1 on a closed port, BigQuery's credentials point
at a file that does not exist, proxies are off, and where a driver cannot be kept off the network
or bounded in time (Snowflake probes cloud metadata endpoints and its account's host;
Databricks retries connecting for up to 15 minutes), the URL is shown accepted by an audience
SQL refused in that dialect, which syncer checks before it connects.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import assert_usage_error
from tests.helpers import run_cli, write_settings

NOWHERE = "http://127.0.0.1:9/never-called"


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


PORT = _closed_port()


@dataclass(frozen=True, kw_only=True)
class Warehouse:
    name: str
    module: str  # the dialect's module: installed or not
    extra: str
    url: str
    # SQL that fails where it should once the URL is accepted, and what the line then says
    sql: str
    says: str


WAREHOUSES = [
    Warehouse(
        name="snowflake",
        module="snowflake.sqlalchemy",
        extra="snowflake",
        url="snowflake://syncer:pw@acct/marketing/public?warehouse=wh&role=syncer_reader",
        sql="PUT file:///tmp/ids.csv @my_stage",
        says="uploads files to a stage (PUT)",
    ),
    Warehouse(
        name="bigquery",
        module="sqlalchemy_bigquery",
        extra="bigquery",
        url="bigquery://my-project/marketing",
        sql="SELECT 1",
        says="was not found",  # the credentials file, checked when the engine is made
    ),
    Warehouse(
        name="redshift",
        module="sqlalchemy_redshift",
        extra="redshift",
        url=f"redshift+psycopg2://syncer:pw@127.0.0.1:{PORT}/dev",
        sql="SELECT 1",
        says="the audience SQL failed on source 'wh'",
    ),
    Warehouse(
        name="clickhousedb",
        module="clickhouse_connect",
        extra="clickhouse",
        url=f"clickhousedb://syncer:pw@127.0.0.1:{PORT}/marketing",
        sql="SELECT 1",
        says="the audience SQL failed on source 'wh'",
    ),
    Warehouse(
        name="trino",
        module="trino.sqlalchemy",
        extra="trino",
        url=f"trino://syncer@127.0.0.1:{PORT}/hive/marketing",
        sql="SELECT 1",
        says="the audience SQL failed on source 'wh'",
    ),
    Warehouse(
        name="databricks",
        module="databricks.sqlalchemy",
        extra="databricks",
        url="databricks://token:dapi-x@127.0.0.1?http_path=/sql/1.0/warehouses/abc"
        "&catalog=main&schema=marketing",
        sql="SET spark.databricks.io.cache.enabled = false",
        says="changes session settings (SET)",
    ),
    Warehouse(
        name="duckdb",
        module="duckdb_engine",
        extra="duckdb",
        url="duckdb:///{root}/missing.duckdb",
        sql="SELECT 1",
        says="does not exist",
    ),
]

# Keep every driver off the network whatever the machine's environment holds.
OFFLINE = {
    "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/syncer-test-credentials.json",
    "NO_GCE_CHECK": "true",
    "HTTP_PROXY": "",
    "HTTPS_PROXY": "",
    "http_proxy": "",
    "https_proxy": "",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


@pytest.fixture(scope="module")
def state_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One state database at the latest schema for the module: audience create needs one, and
    none of these tests gets as far as writing to it."""
    root = tmp_path_factory.mktemp("state")
    url = f"sqlite:///{(root / 'state.db').resolve()}"
    run_cli("db", "upgrade", settings=_settings(root, url, "sqlite:///w.db"), check=True)
    return url


def _settings(root: Path, state_url: str, url: str) -> Path:
    return write_settings(
        root / "settings.toml",
        state_url=state_url,
        sources={"wh": url},
        workflow_urls=[NOWHERE],
        shared_secret="s3cret-for-tests",
    )


def _create(settings: Path, sql: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "audience", "create", "X", "--source", "wh", "--sql", sql, settings=settings, env=OFFLINE
    )


@pytest.mark.parametrize("warehouse", WAREHOUSES, ids=[w.name for w in WAREHOUSES])
def test_a_warehouse_url_is_accepted_when_its_dialect_is_installed(
    warehouse: Warehouse, tmp_path: Path, state_url: str
) -> None:
    settings = _settings(tmp_path, state_url, warehouse.url.format(root=tmp_path))
    result = _create(settings, warehouse.sql)
    hint = f'pip install "syncer[{warehouse.extra}]"'
    if installed(warehouse.module):
        line = assert_usage_error(result, warehouse.says)
        assert "not installed" not in line and "pip install" not in line
    else:
        line = assert_usage_error(result, "not installed")
        assert line.endswith(hint), line


def test_a_url_whose_dialect_nobody_installed_is_refused(tmp_path: Path, state_url: str) -> None:
    settings = _settings(tmp_path, state_url, "nosuchdb://h/d")
    line = assert_usage_error(_create(settings, "SELECT 1"), "'nosuchdb'", "not installed")
    assert "syncer[" not in line  # no extra provides it


def test_a_warehouse_cannot_hold_syncers_state(tmp_path: Path) -> None:
    settings = _settings(tmp_path, "snowflake://a/b", "sqlite:///w.db")
    for args in (("db", "upgrade"), ("audience", "list")):
        result = run_cli(*args, settings=settings, env=OFFLINE)
        assert_usage_error(result, "[database] url", "cannot hold syncer's state")


@pytest.mark.skipif(not installed("sqlalchemy_redshift"), reason="the redshift extra is absent")
def test_redshift_sql_is_refused_in_its_dialect_before_any_connection(
    tmp_path: Path, state_url: str
) -> None:
    # The host is unreachable: the reason, not a connection error, shows syncer never tried it.
    settings = _settings(tmp_path, state_url, f"redshift+psycopg2://syncer:pw@127.0.0.1:{PORT}/dev")
    unload = (
        "UNLOAD ('SELECT user_id FROM users') TO 's3://bucket/ids_' IAM_ROLE 'arn:aws:iam::1:r'"
    )
    for sql, says in (
        (unload, "unloads data to files (UNLOAD)"),
        ("SET statement_timeout TO 0", "changes session settings (SET)"),
        ("SELECT user_id INTO TEMP ids FROM users", "SELECT … INTO"),
    ):
        line = assert_usage_error(_create(settings, sql), says)
        assert "failed on source" not in line and "connect" not in line.lower()
    listed = run_cli("audience", "list", settings=settings, env=OFFLINE, check=True)
    assert "X" not in listed.stdout.split()
