"""Integration fixtures: a state database with the schema, a source with a users table, a
settings file pointing at the loopback receiver, and plain-SQL readers of the state tables.

``world`` is the usual entry point: the state database comes from ``state_url`` (so every test
that uses it runs on SQLite and on PostgreSQL) and the source is a SQLite warehouse file.
``any_source_world`` also runs with the source being the state database itself (no
``[sources.default]``: the audience SQL runs there via ``INSERT … SELECT``; on PostgreSQL a
``[sources.default]`` naming the state database with a ``read_role``, ``pg_reader_role``).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql as pgsql
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

import syncer.db
from syncer import audiences
from syncer.audiences import AudienceView
from syncer.settings import Settings, load_settings
from syncer.sync import RunResult, sync_audiences
from tests.helpers import (
    PG_ADMIN_ROLE,
    PG_DATABASE_PREFIX,
    PG_HOST,
    PG_PORT,
    PG_ROLE,
    TEST_SECRET,
    make_warehouse,
    pg_admin,
    postgres_database,
    toml_value,
    write_settings,
)
from tests.receiver import Receiver

WAREHOUSE = "warehouse"  # a SQLite file of its own
SAME = "same"  # the state database itself
POSTGRES = "postgres"  # a PostgreSQL database of its own

USERS_DDL = "CREATE TABLE users (user_id TEXT, email TEXT, plan TEXT)"
DEFAULT_SQL = "SELECT user_id FROM users"


@contextlib.contextmanager
def pg_reader_role(database_url: str) -> Iterator[str]:
    """A NOLOGIN role with a random name (roles are cluster-wide) that PG_ROLE may act as, with
    USAGE on schema public and SELECT on the tables PG_ROLE creates in that database from now
    on (create it after ``db upgrade``: syncer's tables stay out of reach). It is the
    ``read_role`` of a source that is the state database. Dropped afterwards."""
    role = f"syncer_t_reader_{secrets.token_hex(5)}"
    name = pgsql.Identifier(role)
    database = make_url(database_url).database
    dsn = f"postgresql://{PG_ADMIN_ROLE}@{PG_HOST}:{PG_PORT}/{database}"
    with pg_admin() as admin:
        admin.execute(pgsql.SQL("CREATE ROLE {} NOLOGIN").format(name))
        admin.execute(pgsql.SQL("GRANT {} TO {}").format(name, pgsql.Identifier(PG_ROLE)))
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as db:
            db.execute(pgsql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(name))
            db.execute(
                pgsql.SQL(
                    "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA public "
                    "GRANT SELECT ON TABLES TO {}"
                ).format(pgsql.Identifier(PG_ROLE), name)
            )
        yield role
    finally:
        with (
            contextlib.suppress(psycopg.OperationalError),  # the database may be gone
            psycopg.connect(dsn, autocommit=True, connect_timeout=5) as db,
        ):
            db.execute(pgsql.SQL("DROP OWNED BY {}").format(name))
        with pg_admin() as admin:
            admin.execute(pgsql.SQL("DROP ROLE IF EXISTS {}").format(name))


@pytest.fixture
def source_pg_url() -> Iterator[str]:
    """A second fresh PostgreSQL database (owned by and reached as the ordinary role PG_ROLE),
    for a source apart from the state database."""
    with postgres_database(f"{PG_DATABASE_PREFIX}src_") as url:
        yield url


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """A row of ``deliveries`` with its destination's URL."""

    id: int
    run_id: int
    url: str
    user_id: str
    kind: str
    trait_value: bool | None
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    delivered_at: Any


class World:
    """Everything one run-level test touches, wired together."""

    def __init__(
        self, tmp_path: Path, state_url: str, rx: Receiver, *, source_kind: str, source_url: str
    ) -> None:
        self.tmp_path = tmp_path
        self.state_url = state_url
        self.rx = rx
        self.source_kind = source_kind
        self.source_url = source_url
        self.urls = [rx.url("w1"), rx.url("w2")]
        self.read_role: str | None = None
        self._roles = contextlib.ExitStack()
        self.configure(self.urls)
        syncer.db.upgrade(self.settings.database.url)
        if source_kind == SAME and make_url(state_url).get_backend_name() == "postgresql":
            self.read_role = self._roles.enter_context(pg_reader_role(state_url))
            self.configure(self.urls)
        self.state = syncer.db.open_state(self.settings.database.url)
        # A writable connection to the source, for the test to set up and change its data.
        self.source_db = create_engine(source_url, poolclass=NullPool)
        if source_kind != WAREHOUSE:
            self.source_sql(USERS_DDL)

    # settings -----------------------------------------------------------------------------------

    def configure(
        self,
        workflow_urls: Sequence[str] | None,
        *,
        secret: str | None = TEST_SECRET,
        **tray: object,
    ) -> Settings:
        """(Re)write settings.toml with these workflow URLs (None: no key) and load it."""
        sources = {} if self.source_kind == SAME else {"default": self.source_url}
        extra = ""
        if self.read_role is not None:  # the state database as the source, on PostgreSQL
            extra = (
                f"[sources.default]\nurl = {toml_value(self.state_url)}\n"
                f"read_role = {toml_value(self.read_role)}\n"
            )
        path = write_settings(
            self.tmp_path / "settings.toml",
            state_url=self.state_url,
            sources=sources,
            workflow_urls=None if workflow_urls is None else list(workflow_urls),
            shared_secret=secret,
            tray=tray,
            extra=extra,
        )
        self.settings = load_settings(str(path))
        return self.settings

    # the source ---------------------------------------------------------------------------------

    def source_sql(self, statement: str, params: Sequence[dict[str, Any]] | None = None) -> None:
        with self.source_db.begin() as conn:
            conn.execute(text(statement), list(params) if params else None)

    def source_rows(self, query: str) -> list[tuple[Any, ...]]:
        with self.source_db.connect() as conn:
            return [tuple(row) for row in conn.execute(text(query)).all()]

    def set_users(self, user_ids: Iterable[str | None], *, table: str = "users") -> None:
        """Replace the source's users (``None`` is a NULL id)."""
        rows = [{"u": uid, "e": None if uid is None else f"{uid}@example.com"} for uid in user_ids]
        with self.source_db.begin() as conn:
            conn.execute(text(f"DELETE FROM {table}"))
            if rows:
                conn.execute(
                    text(f"INSERT INTO {table} (user_id, email, plan) VALUES (:u, :e, 'pro')"),
                    rows,
                )

    # syncer -------------------------------------------------------------------------------------

    def create(self, name: str = "Pro Users", sql: str = DEFAULT_SQL) -> AudienceView:
        return audiences.create(self.state, self.settings, name=name, sql=sql)

    def sync(self, key: str) -> RunResult:
        [result] = sync_audiences(self.state, self.settings, [key])
        return result

    # the state database, in plain SQL -----------------------------------------------------------

    def rows(self, query: str, **params: Any) -> list[Any]:
        with self.state.connect() as conn:
            return list(conn.execute(text(query), params).all())

    def scalar(self, query: str, **params: Any) -> Any:
        with self.state.connect() as conn:
            return conn.execute(text(query), params).scalar()

    def members_as_of(self, key: str, run_id: int) -> set[str]:
        """docs/schema.md: "Members of the audience as of run 42"."""
        return {
            row.user_id
            for row in self.rows(
                "SELECT m.user_id FROM memberships m JOIN audiences a ON a.id = m.audience_id "
                "WHERE a.key = :key AND m.entered_run_id <= :run "
                "AND (m.exited_run_id IS NULL OR m.exited_run_id > :run)",
                key=key,
                run=run_id,
            )
        }

    def current_members(self, key: str) -> set[str]:
        return {
            row.user_id
            for row in self.rows(
                "SELECT m.user_id FROM memberships m JOIN audiences a ON a.id = m.audience_id "
                "WHERE a.key = :key AND m.exited_run_id IS NULL",
                key=key,
            )
        }

    def deliveries(self, key: str, *, path: str | None = None) -> list[Delivery]:
        """Delivery rows of an audience (for one workflow URL when ``path`` is given), by id.

        The state database holds no URL: a row's ``url`` is the one of this world's URLs (or
        ``path``'s) whose keyed hash its destination has, as the sender matches them."""
        from syncer.models import DESTINATION_HASH_KEY
        from syncer.settings import normalize_workflow_url, workflow_url_hash

        rows = self.rows(
            "SELECT dl.id, dl.run_id, d.url_hash, dl.user_id, dl.kind, dl.trait_value, "
            "dl.status, dl.attempts, dl.last_status_code, dl.last_error, dl.delivered_at "
            "FROM deliveries dl JOIN destinations d ON d.id = dl.destination_id "
            "JOIN audiences a ON a.id = dl.audience_id WHERE a.key = :key ORDER BY dl.id",
            key=key,
        )
        if not rows:
            return []
        wanted = None if path is None else self.rx.url(path)
        hash_key = self.scalar(
            "SELECT value FROM syncer_settings WHERE name = :name", name=DESTINATION_HASH_KEY
        )
        known = [*self.urls, *self.settings.tray.workflow_urls, *([wanted] if wanted else [])]
        url_of = {
            workflow_url_hash(hash_key, normalize_workflow_url(url, what="test")): url
            for url in known
        }
        found = []
        for row in rows:
            fields = row._asdict()
            fields["url"] = url_of.get(fields.pop("url_hash"), "?")
            fields["trait_value"] = None if row.trait_value is None else bool(row.trait_value)
            if wanted is None or fields["url"] == wanted:
                found.append(Delivery(**fields))
        return found

    def statuses(self, key: str, *, path: str | None = None) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.deliveries(key, path=path):
            counts[row.status] = counts.get(row.status, 0) + 1
        return counts

    def close(self) -> None:
        self.state.dispose()
        self.source_db.dispose()
        self._roles.close()


def _make_world(
    request: pytest.FixtureRequest, tmp_path: Path, state_url: str, rx: Receiver, kind: str
) -> World:
    if kind == WAREHOUSE:
        source_url = make_warehouse(tmp_path / "warehouse.db", [])
    elif kind == SAME:
        source_url = state_url
    else:
        source_url = str(request.getfixturevalue("source_pg_url"))
    return World(tmp_path, state_url, rx, source_kind=kind, source_url=source_url)


@pytest.fixture
def world(
    request: pytest.FixtureRequest, tmp_path: Path, state_url: str, receiver: Receiver
) -> Iterator[World]:
    """State DB on SQLite and PostgreSQL; the source is a SQLite warehouse file."""
    w = _make_world(request, tmp_path, state_url, receiver, WAREHOUSE)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(params=[WAREHOUSE, SAME])
def any_source_world(
    request: pytest.FixtureRequest, tmp_path: Path, state_url: str, receiver: Receiver
) -> Iterator[World]:
    """Like ``world``, and once more with the state database as the source."""
    w = _make_world(request, tmp_path, state_url, receiver, request.param)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(params=[WAREHOUSE, SAME, pytest.param(POSTGRES, marks=pytest.mark.postgres)])
def every_source_world(
    request: pytest.FixtureRequest, tmp_path: Path, state_url: str, receiver: Receiver
) -> Iterator[World]:
    """A SQLite warehouse, the state database itself, and a PostgreSQL database of its own."""
    w = _make_world(request, tmp_path, state_url, receiver, request.param)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def lite_world(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite_url: str, receiver: Receiver
) -> Iterator[World]:
    """SQLite state and a SQLite warehouse: for checks that are not about the state database."""
    w = _make_world(request, tmp_path, sqlite_url, receiver, WAREHOUSE)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(
    params=[
        pytest.param("own", id="pg-source", marks=pytest.mark.postgres),
        pytest.param("same", id="pg-state-is-source", marks=pytest.mark.postgres),
    ]
)
def pg_source_world(
    request: pytest.FixtureRequest, tmp_path: Path, receiver: Receiver
) -> Iterator[World]:
    """A PostgreSQL source: a database of its own (SQLite state), or the PostgreSQL state DB."""
    if request.param == "own":
        state_url = str(request.getfixturevalue("sqlite_url"))
        w = _make_world(request, tmp_path, state_url, receiver, POSTGRES)
    else:
        state_url = str(request.getfixturevalue("pg_url"))
        w = _make_world(request, tmp_path, state_url, receiver, SAME)
    try:
        yield w
    finally:
        w.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """MySQL/MariaDB refuses a source that is the state database (a user's privileges cannot be
    narrowed for one query; docs/security.md): the SAME cases of the source fixtures do not
    exist there. test_source_security proves the refusal."""
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        same = SAME in (params.get("any_source_world"), params.get("every_source_world"))
        (dropped if same and params.get("state_url") == "mariadb" else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
