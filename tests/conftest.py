"""Fixtures shared by the whole suite: real SQLite files, real PostgreSQL, a real HTTP receiver."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.helpers import TEST_SECRET
from tests.receiver import Receiver

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL_TEMPLATE = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
PG_DATABASE_PREFIX = "syncer_t_"


def _pg_admin() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        problem = " ".join(str(exc).split())
    # outside the except block, so the report is one message, not a chained traceback
    pytest.fail(
        f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({problem}); "
        "start it with trust auth for user postgres on 127.0.0.1:5432",
        pytrace=False,
    )


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test, dropped afterwards."""
    name = f"{PG_DATABASE_PREFIX}{secrets.token_hex(6)}"
    with _pg_admin() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield PG_URL_TEMPLATE.format(name=name)
    finally:
        with _pg_admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite state database file in this test's tmp_path (not created yet)."""
    return f"sqlite:///{(tmp_path / 'state.db').resolve()}"


# MariaDB/MySQL as a state database too, only when asked for: SYNCER_TEST_MARIADB=1 (root with
# no password on 127.0.0.1:3306, allowed to create databases).
MARIADB_ADMIN = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}
MARIADB_URL_TEMPLATE = "mariadb+pymysql://root@127.0.0.1:3306/{name}?charset=utf8mb4"
WITH_MARIADB = os.environ.get("SYNCER_TEST_MARIADB") == "1"


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A fresh, empty MariaDB database for this test, dropped afterwards."""
    import pymysql

    name = f"{PG_DATABASE_PREFIX}{secrets.token_hex(6)}"
    with pymysql.connect(**MARIADB_ADMIN, autocommit=True) as admin, admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield MARIADB_URL_TEMPLATE.format(name=name)
    finally:
        with pymysql.connect(**MARIADB_ADMIN, autocommit=True) as admin, admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
        *([pytest.param("mariadb", id="mariadb")] if WITH_MARIADB else []),
    ]
)
def state_url(request: pytest.FixtureRequest) -> str:
    """The state database URL: the test runs once on SQLite and once on PostgreSQL (and once on
    MariaDB with SYNCER_TEST_MARIADB=1)."""
    fixture = {"sqlite": "sqlite_url", "postgres": "pg_url", "mariadb": "mariadb_url"}
    return str(request.getfixturevalue(fixture[request.param]))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A started loopback Tray stand-in that checks signatures with TEST_SECRET."""
    with Receiver(secret=TEST_SECRET) as rx:
        yield rx
