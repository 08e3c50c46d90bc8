"""Alembic owns the schema: migrations give exactly the models, and round-trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

import syncer.db
from syncer.models import Base
from tests.helpers import REPO_ROOT, cli_env, write_settings

STATE_TABLES = {
    "alembic_version",
    "audiences",
    "audience_destinations",
    "deliveries",
    "delivery_pages",
    "destinations",
    "memberships",
    "service_leases",
    "syncer_settings",
    "user_deletions",
    "sync_leases",
    "sync_runs",
}


def schema_diff(url: URL) -> list[Any]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts=syncer.db.comparison_options(conn))
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def tables_and_version(url: URL) -> tuple[set[str], set[str]]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            versions = set(MigrationContext.configure(conn).get_current_heads())
        return tables, versions
    finally:
        engine.dispose()


def head() -> set[str]:
    return set(ScriptDirectory(str(syncer.db.migrations_dir())).get_heads())


def test_upgrade_on_an_empty_database_gives_exactly_the_models(state_url: str) -> None:
    url = make_url(state_url)

    syncer.db.upgrade(url)

    assert schema_diff(url) == []
    tables, version = tables_and_version(url)
    assert tables == STATE_TABLES
    assert version == head()
    # the code accepts the schema it just made
    engine = syncer.db.open_state(url)
    try:
        syncer.db.check_schema(engine)
    finally:
        engine.dispose()


def test_downgrade_to_base_and_upgrade_again(state_url: str) -> None:
    url = make_url(state_url)
    syncer.db.upgrade(url)

    syncer.db.downgrade(url, "base")

    assert tables_and_version(url) == ({"alembic_version"}, set())

    syncer.db.upgrade(url)

    assert schema_diff(url) == []
    assert tables_and_version(url) == (STATE_TABLES, head())


def test_alembic_upgrade_head_from_the_repo_root(tmp_path: Path, state_url: str) -> None:
    settings = write_settings(tmp_path / "settings.toml", state_url=state_url)
    env = cli_env({"SYNCER_SETTINGS": str(settings)})

    done = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    url = make_url(state_url)
    assert tables_and_version(url) == (STATE_TABLES, head())
    assert schema_diff(url) == []
