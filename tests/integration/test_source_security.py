"""Audience SQL can never write, nor read what it must not: syncer's own tables, files, other
databases. The databases themselves enforce it (SQLite's authorizer, PostgreSQL's roles); these
tests attack through the same functions the CLI calls, on real SQLite files and PostgreSQL."""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql as pgsql
from sqlalchemy import make_url, text

from syncer import audiences
from syncer.errors import AudienceError
from syncer.models import RUN_FAILED, RUN_SUCCEEDED
from syncer.settings import Settings, load_settings
from syncer.sync import RunResult, sync_audiences
from tests.conftest import MARIADB_ADMIN, WITH_MARIADB
from tests.helpers import (
    PG_ADMIN_ROLE,
    PG_HOST,
    PG_PORT,
    PG_ROLE,
    TEST_SECRET,
    pg_admin,
    pg_database_url,
    write_settings,
)
from tests.integration.conftest import SAME, WAREHOUSE, World, _make_world
from tests.receiver import Receiver

SYNCER_TABLE_READS = [
    "SELECT value FROM syncer_settings",
    "SELECT CAST(id AS TEXT) AS user_id FROM destinations",
    "SELECT user_id FROM memberships",
    "SELECT user_id FROM users WHERE user_id IN (SELECT value FROM syncer_settings)",
    "WITH s AS (SELECT value FROM syncer_settings) SELECT value FROM s",
    "SELECT user_id FROM users UNION SELECT version_num FROM alembic_version",
    "SELECT name FROM sqlite_master",
    "SELECT name FROM pragma_table_info('syncer_settings')",
    "SELECT user_id FROM leaked_settings",  # a view over syncer_settings
    "SELECT value FROM main.syncer_settings",
    'SELECT value FROM "SYNCER_SETTINGS"',
    "SELECT value FROM [Syncer_Settings]",
    "SELECT name FROM sqlite_temp_schema",
    "SELECT name FROM temp.sqlite_master",
    "SELECT tbl FROM sqlite_stat1",  # ANALYZE names syncer's tables and indexes there
    "SELECT file FROM pragma_database_list",
    "SELECT load_extension('evil')",
]


def _refused(w: World, sql: str) -> str:
    with pytest.raises(AudienceError) as caught:
        w.create(sql=sql)
    assert w.rows("SELECT key FROM audiences") == [], sql
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def lite_same(
    request: pytest.FixtureRequest, sqlite_url: str, tmp_path: Path, receiver: Receiver
) -> Iterator[World]:
    """SQLite state database that is also the source (no [sources.default])."""
    w = _make_world(request, tmp_path, sqlite_url, receiver, SAME)
    try:
        yield w
    finally:
        w.close()


def test_sqlite_audience_sql_never_reads_syncers_tables(lite_same: World) -> None:
    w = lite_same
    w.set_users(["u1", "u2"])
    w.source_sql("CREATE VIEW leaked_settings AS SELECT value AS user_id FROM syncer_settings")
    w.source_sql("ANALYZE")
    for sql in SYNCER_TABLE_READS:
        message = _refused(w, sql)
        assert "may read data tables only" in message or "PRAGMA" in message, (sql, message)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT length(printf('%.*c', 900000000, 'x')) AS user_id",
        "SELECT length(replace(hex(zeroblob(200000000)), '0', 'ab')) AS user_id",
    ],
)
def test_sqlite_one_huge_value_ends_at_once(lite_same: World, sql: str) -> None:
    """One function call is one step of the progress handler that enforces the timeout: without
    a bound on a value, each of these ran for a minute and took gigabytes."""
    w = lite_same
    w.set_users(["u1"])
    started = time.monotonic()
    with contextlib.suppress(AudienceError):  # "string or blob too big", or cut short
        w.create(sql=sql)
    assert time.monotonic() - started < 10


def test_sqlite_printf_formats_ids_but_refuses_a_huge_width(lite_same: World) -> None:
    """printf loops over its width even past the bound on a value's size: widths and
    precisions over 16 MB (what a value may be) are refused, with the reason; ordinary formatting works."""
    w = lite_same
    w.set_users(["7", "42"])
    message = _refused(w, "SELECT printf('%s%.*c', user_id, 900000000, 'x') AS user_id FROM users")
    assert "printf/format width or precision over 16,777,216" in message, message
    message = _refused(w, "SELECT format('%20000000d', 1) AS user_id")
    assert "over 16,777,216" in message, message
    w.create(sql="SELECT printf('user-%05d', CAST(user_id AS INTEGER)) AS user_id FROM users")
    result = w.sync("pro_users")
    assert (result.status, result.members) == (RUN_SUCCEEDED, 2)
    assert w.current_members("pro_users") == {"user-00007", "user-00042"}


def test_sqlite_ids_of_every_type_are_their_text(lite_same: World) -> None:
    w = lite_same
    view = w.create(
        sql="VALUES (1.5), (7), (9223372036854775807), (x'7531'), (NULL), "
        "(printf('%.*c', 1000000, 'x')), ('u2')"
    )
    result = w.sync(view.key)
    assert result.status == RUN_SUCCEEDED, result.error
    assert w.current_members(view.key) == {"1.5", "7", "9223372036854775807", "u1", "u2"}
    assert result.skipped == 2  # NULL, and the 1 MB id


def test_sqlite_a_run_of_stored_sql_that_reads_syncers_tables_fails_and_sends_nothing(
    lite_same: World,
) -> None:
    w = lite_same
    w.set_users(["u1"])
    key = w.create().key
    # SQL stored before this check existed (or written into the table by hand)
    with w.state.begin() as conn:
        conn.execute(
            text("UPDATE audiences SET definition_sql = 'SELECT value FROM syncer_settings'")
        )
    result = w.sync(key)
    assert result.status == RUN_FAILED
    assert "may read data tables only" in (result.error or "")
    assert w.rx.requests() == []
    assert w.scalar("SELECT status FROM sync_runs") == RUN_FAILED


def test_a_sqlite_warehouse_holding_syncers_tables_is_fenced_too(
    tmp_path: Path, sqlite_url: str, receiver: Receiver, request: pytest.FixtureRequest
) -> None:
    """The state database given as a source URL of its own: still no reading its tables."""
    w = _make_world(request, tmp_path, sqlite_url, receiver, WAREHOUSE)
    try:
        settings = _settings(tmp_path, sqlite_url, {"default": sqlite_url})
        with pytest.raises(AudienceError, match="may read data tables only"):
            audiences.create(
                w.state, settings, name="Salt", sql="SELECT value FROM syncer_settings"
            )
    finally:
        w.close()


def test_a_trailing_comment_is_fine(any_source_world: World) -> None:
    w = any_source_world
    w.set_users(["u1", "u2"])
    view = w.create(sql="SELECT user_id FROM users -- the pro ones")
    result = w.sync(view.key)
    assert result.status == RUN_SUCCEEDED
    assert w.current_members(view.key) == {"u1", "u2"}


@pytest.mark.parametrize("kind", [WAREHOUSE, SAME])
def test_a_blob_id_is_sent_as_its_text_and_a_non_utf8_one_is_skipped(
    kind: str, tmp_path: Path, sqlite_url: str, receiver: Receiver, request: pytest.FixtureRequest
) -> None:
    w = _make_world(request, tmp_path, sqlite_url, receiver, kind)
    try:
        path = make_url(w.source_url).database
        with contextlib.closing(sqlite3.connect(str(path))) as db, db:
            db.execute("DELETE FROM users")
            db.executemany(
                "INSERT INTO users (user_id) VALUES (?)",
                [(b"u-blob",), (b"\xff\xfe",), ("u-text",), ("a\x00b",)],
            )
        key = w.create().key
        result = w.sync(key)
        assert result.status == RUN_SUCCEEDED
        assert w.current_members(key) == {"u-blob", "u-text"}
        assert result.skipped == 2
        sent = {request.user_id for request in w.rx.accepted()}
        assert sent == {"u-blob", "u-text"}
    finally:
        w.close()


@pytest.mark.postgres
def test_an_id_holding_nul_is_skipped_on_a_postgresql_state_database(
    tmp_path: Path, pg_url: str, receiver: Receiver, request: pytest.FixtureRequest
) -> None:
    w = _make_world(request, tmp_path, pg_url, receiver, WAREHOUSE)
    try:
        path = make_url(w.source_url).database
        with contextlib.closing(sqlite3.connect(str(path))) as db, db:
            db.executemany(
                "INSERT INTO users (user_id) VALUES (?)", [("u1",), ("a\x00b",), ("\x00",)]
            )
        key = w.create().key
        result = w.sync(key)
        assert result.status == RUN_SUCCEEDED, result.error
        assert w.current_members(key) == {"u1"}
        assert result.skipped == 2
    finally:
        w.close()


# PostgreSQL --------------------------------------------------------------------------------------


def _settings(
    tmp_path: Path,
    state_url: str,
    sources: dict[str, str],
    extra: str = "",
    *,
    workflow_urls: list[str] | None = None,
) -> Settings:
    path = write_settings(
        tmp_path / "settings-security.toml",
        state_url=state_url,
        sources=sources,
        workflow_urls=workflow_urls or ["https://example.trayapp.io/w"],
        shared_secret=TEST_SECRET,
        extra=extra,
    )
    return load_settings(str(path))


def _admin_sql(database_url: str, *statements: str) -> None:
    dsn = f"postgresql://{PG_ADMIN_ROLE}@{PG_HOST}:{PG_PORT}/{make_url(database_url).database}"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as db:
        for statement in statements:
            db.execute(statement.encode())


@pytest.fixture
def pg_source(
    tmp_path: Path, sqlite_url: str, receiver: Receiver, request: pytest.FixtureRequest
) -> Iterator[World]:
    """SQLite state; the source a PostgreSQL database of its own, reached as the ordinary role."""
    w = _make_world(request, tmp_path, sqlite_url, receiver, "postgres")
    try:
        w.set_users(["u1", "u2"])
        yield w
    finally:
        w.close()


def _as(w: World, role: str, *, extra: str = "") -> Settings:
    database = make_url(w.source_url).database
    assert database is not None
    section = f'[sources.default]\nurl = "{pg_database_url(database, role=role)}"\n{extra}'
    return _settings(w.tmp_path, w.state_url, {}, extra=section, workflow_urls=w.urls)


@pytest.mark.postgres
def test_a_superuser_source_is_refused_unless_allowed(pg_source: World) -> None:
    w = pg_source
    with pytest.raises(AudienceError) as caught:
        audiences.create(
            w.state, _as(w, PG_ADMIN_ROLE), name="Pro", sql="SELECT user_id FROM users"
        )
    message = str(caught.value)
    assert f"role '{PG_ADMIN_ROLE}' is a superuser" in message
    assert "CREATE ROLE syncer_reader LOGIN" in message
    assert "allow_privileged_role = true" in message
    allowed = _as(w, PG_ADMIN_ROLE, extra="allow_privileged_role = true\n")
    view = audiences.create(w.state, allowed, name="Pro", sql="SELECT user_id FROM users")
    [result] = _sync(w, allowed, view.key)
    assert result.status == RUN_SUCCEEDED
    assert w.current_members(view.key) == {"u1", "u2"}


@pytest.mark.postgres
@pytest.mark.parametrize(
    "group", ["pg_write_server_files", "pg_execute_server_program", "pg_read_server_files"]
)
def test_a_role_with_server_file_or_program_access_is_refused(pg_source: World, group: str) -> None:
    w = pg_source
    with (
        _login_role(w.source_url, grants=[f"GRANT {group} TO {{role}}"]) as role,
        pytest.raises(AudienceError, match=f"member of {group}"),
    ):
        audiences.create(w.state, _as(w, role), name="Pro", sql="SELECT user_id FROM users")


@pytest.mark.postgres
def test_a_role_that_can_use_dblink_is_refused(pg_source: World) -> None:
    with pg_admin() as admin:
        available = admin.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'dblink'"
        ).fetchone()
    if available is None:
        pytest.skip("the dblink extension is not available on this server")
    w = pg_source
    _admin_sql(w.source_url, "CREATE EXTENSION dblink")
    with pytest.raises(AudienceError, match="can use dblink"):
        w.create(sql="SELECT user_id FROM users")


@pytest.mark.postgres
def test_an_ordinary_role_works_and_cannot_write_files(pg_source: World, tmp_path: Path) -> None:
    w = pg_source
    target = tmp_path / "exported"
    attempts = [
        f"SELECT lo_export(lo_from_bytea(0, 'x'), '{target}')::text AS user_id",
        f"SELECT lo_export(1, '{target}')::text AS user_id",
        f"SELECT pg_read_file('{target}') AS user_id",
        f"COPY (SELECT 1) TO PROGRAM 'touch {target}'",
        "SELECT query_to_xml('copy (select 1) to program ''touch "
        + str(target)
        + "''', true, true, '')::text AS user_id",
    ]
    for sql in attempts:
        with pytest.raises(AudienceError):
            w.create(sql=sql)
    assert not target.exists()
    view = w.create()
    assert w.sync(view.key).status == RUN_SUCCEEDED
    assert w.current_members(view.key) == {"u1", "u2"}


@pytest.mark.postgres
def test_a_separate_source_whose_role_can_read_syncers_tables_is_refused(
    tmp_path: Path, pg_url: str, receiver: Receiver, request: pytest.FixtureRequest
) -> None:
    """The state database reached through a URL of its own, as the role that owns it."""
    w = _make_world(request, tmp_path, pg_url, receiver, WAREHOUSE)
    try:
        alias = pg_url.replace(PG_HOST, "localhost")
        settings = _settings(tmp_path, pg_url, {"default": alias})
        with pytest.raises(AudienceError, match="can read syncer's own tables"):
            audiences.create(
                w.state, settings, name="Salt", sql="SELECT value FROM syncer_settings"
            )
    finally:
        w.close()


@pytest.fixture
def pg_same(
    tmp_path: Path, pg_url: str, receiver: Receiver, request: pytest.FixtureRequest
) -> Iterator[World]:
    """PostgreSQL state database that is also the source, with a read_role (conftest)."""
    w = _make_world(request, tmp_path, pg_url, receiver, SAME)
    try:
        w.set_users(["u1", "u2"])
        yield w
    finally:
        w.close()


PG_SYNCER_TABLE_READS = [
    "SELECT value FROM syncer_settings",
    "SELECT CAST(id AS TEXT) AS user_id FROM destinations",
    "WITH s AS (SELECT value FROM syncer_settings) SELECT value FROM s",
    "SELECT query_to_xml('select * from syncer_settings', true, true, '')::text AS user_id",
    # SET ROLE would be undone by the SQL itself; a security-definer function refuses that
    "SELECT query_to_xml('select set_config(''role'', ''none'', true) AS r', true, true, '')"
    "::text || query_to_xml('select * from syncer_settings', true, true, '')::text AS user_id",
    "SELECT set_config('role', 'none', true) || (SELECT value FROM syncer_settings LIMIT 1)",
]


@pytest.mark.postgres
def test_postgresql_same_database_with_read_role_never_reads_syncers_tables(
    pg_same: World,
) -> None:
    w = pg_same
    assert w.read_role is not None
    for sql in PG_SYNCER_TABLE_READS:
        message = _refused(w, sql)
        assert "permission denied" in message or "cannot set parameter" in message, (sql, message)
    view = w.create()
    # stored SQL that reads them (written by hand, or before the checks): the run fails
    with w.state.begin() as conn:
        conn.execute(
            text("UPDATE audiences SET definition_sql = :sql"), {"sql": PG_SYNCER_TABLE_READS[3]}
        )
    result = w.sync(view.key)
    assert result.status == RUN_FAILED
    assert "permission denied" in (result.error or "")
    assert w.rx.requests() == []


@pytest.mark.postgres
def test_postgresql_same_database_runs_as_read_role(pg_same: World) -> None:
    w = pg_same
    view = w.create(
        sql="SELECT user_id FROM users WHERE current_user = "
        f"'{w.read_role}' AND session_user = '{PG_ROLE}'"
    )
    result = w.sync(view.key)
    assert result.status == RUN_SUCCEEDED, result.error
    assert w.current_members(view.key) == {"u1", "u2"}


@pytest.mark.postgres
def test_postgresql_same_database_without_read_role_is_refused(pg_same: World) -> None:
    w = pg_same
    settings = _settings(w.tmp_path, w.state_url, {}, workflow_urls=w.urls)
    with pytest.raises(AudienceError) as caught:
        audiences.create(w.state, settings, name="Pro", sql="SELECT user_id FROM users")
    message = str(caught.value)
    assert "is the state database" in message
    assert f"CREATE ROLE syncer_reader NOLOGIN; GRANT syncer_reader TO {PG_ROLE};" in message
    assert "read_role" in message
    # and at run time, for an audience stored while a read_role was set
    view = w.create()
    [result] = _sync(w, settings, view.key)
    assert result.status == RUN_FAILED
    assert "is the state database" in (result.error or "")
    assert w.rx.requests() == []


@pytest.mark.postgres
def test_a_read_role_with_privileges_on_syncers_tables_is_refused(pg_same: World) -> None:
    w = pg_same
    _admin_sql(w.state_url, f'GRANT SELECT ON sync_runs TO "{w.read_role}"')
    with pytest.raises(AudienceError, match=r"read_role .* has privileges on syncer's own tables"):
        w.create()


# helpers ------------------------------------------------------------------------------------------


def _sync(w: World, settings: Settings, key: str) -> list[RunResult]:
    return sync_audiences(w.state, settings, [key])


@contextlib.contextmanager
def _login_role(database_url: str, *, grants: list[str]) -> Iterator[str]:
    """A LOGIN role (random name: roles are cluster-wide) with SELECT on the database's tables
    and ``grants`` (``{role}`` is its name); dropped afterwards."""
    role = f"syncer_t_login_{secrets.token_hex(5)}"
    with pg_admin() as admin:
        admin.execute(pgsql.SQL("CREATE ROLE {} LOGIN").format(pgsql.Identifier(role)))
        for grant in grants:
            admin.execute(grant.format(role=role).encode())
    try:
        _admin_sql(
            database_url,
            f"GRANT USAGE ON SCHEMA public TO {role}",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}",
        )
        yield role
    finally:
        with contextlib.suppress(psycopg.OperationalError):
            _admin_sql(database_url, f"DROP OWNED BY {role}")
        with pg_admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            admin.execute(pgsql.SQL("DROP ROLE IF EXISTS {}").format(pgsql.Identifier(role)))


@pytest.mark.postgres
def test_session_settings_the_sql_makes_do_not_outlive_it(pg_same: World) -> None:
    """``set_config(…, false)`` survives a committed transaction: without a reset, syncer's own
    statements on the same connection would resolve names through the SQL's search_path."""
    w = pg_same
    view = w.create(
        sql="SELECT user_id FROM users "
        "WHERE set_config('search_path', 'nowhere', false) IS NOT NULL"
    )
    for _ in range(2):
        result = w.sync(view.key)
        assert result.status == RUN_SUCCEEDED, result.error
    assert w.current_members(view.key) == {"u1", "u2"}


# MySQL / MariaDB (with SYNCER_TEST_MARIADB=1, as CI runs) -----------------------------------------

if WITH_MARIADB:

    @contextlib.contextmanager
    def _mariadb_user(database: str, *tables: str) -> Iterator[str]:
        """An ordinary MariaDB user granted SELECT on these tables of ``database`` only."""
        import pymysql

        user = f"syncer_t_{secrets.token_hex(5)}"
        with pymysql.connect(**MARIADB_ADMIN, autocommit=True) as admin, admin.cursor() as cur:
            cur.execute(f"CREATE USER '{user}'@'%'")
            for table in tables:
                cur.execute(f"GRANT SELECT ON `{database}`.`{table}` TO '{user}'@'%'")
        try:
            yield user
        finally:
            with pymysql.connect(**MARIADB_ADMIN, autocommit=True) as admin, admin.cursor() as c:
                c.execute(f"DROP USER IF EXISTS '{user}'@'%'")

    @pytest.fixture
    def maria_world(
        request: pytest.FixtureRequest, tmp_path: Path, mariadb_url: str, receiver: Receiver
    ) -> Iterator[World]:
        """MariaDB state database; the source a SQLite warehouse (``configure`` changes it)."""
        w = _make_world(request, tmp_path, mariadb_url, receiver, WAREHOUSE)
        try:
            yield w
        finally:
            w.close()

    def test_mariadb_the_state_database_as_source_is_refused(maria_world: World) -> None:
        w = maria_world
        settings = _settings(w.tmp_path, w.state_url, {}, workflow_urls=w.urls)
        with pytest.raises(AudienceError) as caught:
            audiences.create(w.state, settings, name="Same", sql="SELECT 'u1' AS user_id")
        assert "is the state database" in str(caught.value)
        assert w.rows("SELECT `key` FROM audiences") == []

    def test_mariadb_a_source_user_that_sees_syncers_tables_is_refused_an_ordinary_one_works(
        maria_world: World, mariadb_url: str
    ) -> None:
        """root of the same server can read the state database's tables: refused. A user
        granted SELECT on the data table only syncs."""
        w = maria_world
        source = make_url(mariadb_url).set(database=f"{make_url(mariadb_url).database}_src")
        import pymysql

        with pymysql.connect(**MARIADB_ADMIN, autocommit=True) as admin, admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{source.database}`")
            cur.execute(f"CREATE TABLE `{source.database}`.users (user_id VARCHAR(64))")
            cur.execute(f"INSERT INTO `{source.database}`.users VALUES ('u1'), ('u2')")
        try:
            as_root = _settings(
                w.tmp_path,
                w.state_url,
                {"default": source.render_as_string(False)},
                workflow_urls=w.urls,
            )
            with pytest.raises(AudienceError) as caught:
                audiences.create(w.state, as_root, name="Root", sql="SELECT user_id FROM users")
            assert "can read syncer's own tables" in str(caught.value)
            with _mariadb_user(str(source.database), "users") as user:
                as_reader = _settings(
                    w.tmp_path,
                    w.state_url,
                    {"default": source.set(username=user).render_as_string(False)},
                    workflow_urls=w.urls,
                )
                view = audiences.create(
                    w.state, as_reader, name="Reader", sql="SELECT user_id FROM users"
                )
                [result] = sync_audiences(w.state, as_reader, [view.key])
                assert result.status == RUN_SUCCEEDED, result.error
                assert w.current_members(view.key) == {"u1", "u2"}
        finally:
            with pymysql.connect(**MARIADB_ADMIN, autocommit=True) as admin, admin.cursor() as c:
                c.execute(f"DROP DATABASE IF EXISTS `{source.database}`")


# What a read-only transaction still lets through, on the state database's own connection -------

PG_LEFT_BEHIND = [
    # session advisory locks outlive the transaction, and RESET ALL
    "SELECT user_id FROM users WHERE pg_advisory_lock(4242) IS NOT NULL",
    "SELECT user_id FROM users WHERE pg_try_advisory_lock_shared(4243)",
    # large objects are written even in a read-only transaction, and staging commits it
    "SELECT user_id FROM users WHERE lo_from_bytea(0, 'x') IS NOT NULL",
    "SELECT user_id FROM users WHERE lo_create(0) IS NOT NULL",
    # session settings
    "SELECT user_id FROM users WHERE set_config('search_path', 'pg_catalog', false) IS NOT NULL",
    "SELECT user_id FROM users WHERE set_config('default_transaction_read_only', 'on', false) "
    "IS NOT NULL",
]


@pytest.mark.postgres
def test_postgresql_what_the_sql_does_on_the_state_connection_does_not_outlive_it(
    pg_same: World,
) -> None:
    w = pg_same
    view = w.create()
    database = make_url(w.state_url).database
    for sql in PG_LEFT_BEHIND:
        with w.state.begin() as conn:
            conn.execute(text("UPDATE audiences SET definition_sql = :sql"), {"sql": sql})
        for _ in range(2):
            result = w.sync(view.key)
            assert result.status == RUN_SUCCEEDED, (sql, result.error)
        assert w.current_members(view.key) == {"u1", "u2"}, sql
        with pg_admin() as admin:
            locks = admin.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND d.datname = %s",
                (database,),
            ).fetchone()
        assert locks == (0,), sql
        assert w.scalar("SELECT count(*) FROM pg_largeobject_metadata") == 0, sql


@pytest.mark.postgres
def test_postgresql_the_sql_cannot_lift_its_own_timeout(pg_same: World) -> None:
    w = pg_same
    settings = _settings(
        w.tmp_path,
        w.state_url,
        {},
        extra=f'[sources.default]\nurl = "{w.state_url}"\nread_role = "{w.read_role}"\n'
        "query_timeout_seconds = 1\n",
        workflow_urls=w.urls,
    )
    sql = (
        "SELECT user_id FROM users WHERE set_config('statement_timeout', '0', true) IS NOT NULL "
        "AND pg_sleep(5) IS NOT NULL"
    )
    started = time.monotonic()
    with pytest.raises(AudienceError, match="statement timeout"):
        audiences.create(w.state, settings, name="Slow", sql=sql)
    assert time.monotonic() - started < 4


@pytest.mark.postgres
def test_a_role_that_may_set_role_to_a_superuser_is_refused(pg_source: World) -> None:
    """NOINHERIT: the role is no superuser until the SQL runs set_config('role', …, true), and
    then it reads files."""
    w = pg_source
    grants = ["ALTER ROLE {role} NOINHERIT", f"GRANT {PG_ADMIN_ROLE} TO {{role}}"]
    with (
        _login_role(w.source_url, grants=grants) as role,
        pytest.raises(AudienceError, match="may SET ROLE to one"),
    ):
        audiences.create(w.state, _as(w, role), name="Pro", sql="SELECT user_id FROM users")


@pytest.mark.postgres
def test_a_role_that_can_end_other_sessions_is_refused(pg_source: World) -> None:
    w = pg_source
    with (
        _login_role(w.source_url, grants=["GRANT pg_signal_backend TO {role}"]) as role,
        pytest.raises(AudienceError, match="pg_signal_backend"),
    ):
        audiences.create(w.state, _as(w, role), name="Pro", sql="SELECT user_id FROM users")
