"""Alembic owns the schema: migrations give exactly the models, and round-trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

import syncer.db
from syncer.delivery import register_destinations
from syncer.models import Base
from syncer.settings import workflow_url_hash
from tests.helpers import REPO_ROOT, cli_env, write_settings
from tests.integration.conftest import World

STATE_TABLES = {
    "alembic_version",
    "alert_problems",
    "audiences",
    "audience_models",
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


def test_history_rows_name_runs_of_their_own_audience_and_survive_migration_0005(
    world: World,
) -> None:
    w = world
    w.set_users([f"u{i}" for i in range(10)])
    pro, trial = w.create("Pro Users"), w.create("Trial Users")
    w.sync(pro.key)
    w.set_users([f"u{i}" for i in range(1, 12)])
    pro_run = w.sync(pro.key).run_id
    trial_run = w.sync(trial.key).run_id
    history = (
        "SELECT audience_id, user_id, entered_run_id, exited_run_id FROM memberships"
        " ORDER BY audience_id, user_id",
        "SELECT id, run_id, audience_id, user_id, trait_value, status FROM deliveries ORDER BY id",
    )
    before = [w.rows(query) for query in history]
    assert len(before[0]) == 10 + 2 + 11 and len(before[1]) == 2 * (10 + 3 + 11)

    url = w.settings.database.url
    w.state.dispose()
    syncer.db.downgrade(url, "0004")
    syncer.db.upgrade(url)

    assert schema_diff(url) == []
    assert [w.rows(query) for query in history] == before
    if url.get_backend_name() == "sqlite":  # rebuilt by the migration, still keyed by its rows
        assert (
            w.scalar("SELECT sql FROM sqlite_master WHERE name = 'memberships'")
            .rstrip("\n ;")
            .endswith("WITHOUT ROWID")
        )
    # A hand-made row naming another audience's run is refused; with its own audience's, kept.
    refused = (
        "INSERT INTO memberships (audience_id, user_id, entered_run_id) VALUES (:a, 'x', :r)",
        "INSERT INTO deliveries (run_id, audience_id, destination_id, user_id, kind, status,"
        " attempts, created_at, owed_since, next_attempt_at) SELECT :r, :a, id, 'x',"
        " 'identify', 'sent', 1, first_seen_at, first_seen_at, first_seen_at FROM destinations",
    )
    for statement in refused:
        with pytest.raises(IntegrityError), w.state.begin() as conn:
            conn.execute(text(statement), {"a": pro.id, "r": trial_run})
        with w.state.begin() as conn:
            conn.execute(text(statement), {"a": pro.id, "r": pro_run})


def test_migration_0006_keeps_each_url_as_host_and_keyed_hash_and_round_trips(
    world: World,
) -> None:
    """0006 turns every stored URL into host + keyed hash; the sender then finds the same rows
    (no backfill); spellings of one URL and URLs no longer accepted are retired; a downgrade
    cannot give the URLs back, and upgrading again restores host and hash as they were."""
    w = world
    w.set_users([f"u{i}" for i in range(5)])
    audience = w.create()
    w.sync(audience.key)
    destinations = "SELECT id, host, url_hash FROM destinations ORDER BY id"
    before = w.rows(destinations)
    key = w.scalar("SELECT value FROM syncer_settings WHERE name = 'destination_hash_key'")
    assert [tuple(row) for row in before] == [
        (i + 1, f"127.0.0.1:{w.rx.port}", workflow_url_hash(key, url))
        for i, url in enumerate(w.urls)
    ]

    url = w.settings.database.url
    w.state.dispose()
    syncer.db.downgrade(url, "0005")
    placeholders = [row.url for row in w.rows("SELECT url FROM destinations ORDER BY id")]
    assert all(p.startswith("unrecoverable://127.0.0.1:") for p in placeholders)
    assert not any("/w1" in p or "/w2" in p for p in placeholders)
    syncer.db.upgrade(url)
    assert schema_diff(url) == []
    assert w.rows(destinations) == before

    # A database from before 0006, holding URLs as they were written in settings.
    syncer.db.downgrade(url, "0005")
    w1, w2 = w.urls
    old = [
        (1, w1.replace("http://", "HTTP://") + "?"),  # w1, another spelling
        (2, w2),
        (3, w1),  # w1 again: once normalised, the same URL as row 1
        (4, "https://user:pw@x.trayapp.io/tok"),  # no longer accepted
    ]
    with w.state.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO destinations (id, url, first_seen_at)"
                " SELECT 3, 'x3', first_seen_at FROM destinations WHERE id = 1"
                " UNION ALL SELECT 4, 'x4', first_seen_at FROM destinations WHERE id = 1"
            )
        )
        for row_id, old_url in old:
            conn.execute(
                text("UPDATE destinations SET url = :u WHERE id = :i"), {"u": old_url, "i": row_id}
            )
    syncer.db.upgrade(url)

    assert schema_diff(url) == []
    rows = w.rows(destinations)
    assert [tuple(row)[:2] for row in rows] == [
        (1, f"127.0.0.1:{w.rx.port}"),
        (2, f"127.0.0.1:{w.rx.port}"),
        (3, f"127.0.0.1:{w.rx.port}"),
        (4, "x.trayapp.io"),
    ]
    assert [tuple(row) for row in rows[:2]] == [tuple(row) for row in before]
    assert len({row.url_hash for row in rows}) == 4
    dumped = repr(w.rows("SELECT * FROM destinations"))
    assert "/w1" not in dumped and "/w2" not in dumped and "tok" not in dumped
    # The sender finds rows 1 and 2; the next run owes nothing new to either URL.
    assert [t.id for t in register_destinations(w.state, w.urls)] == [1, 2]
    w.set_users([f"u{i}" for i in range(6)])
    result = w.sync(audience.key)
    assert (result.status, result.sent) == ("succeeded", 2)
