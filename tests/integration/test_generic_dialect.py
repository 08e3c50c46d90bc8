"""A source whose SQLAlchemy dialect syncer has no entry for: the generic rules.

The dialect here is DuckDB's under another name (``plainduck``), registered in this process, so
that syncer treats it as it would any dialect it does not know: the SQL is parse-checked, the
ids are fetched in batches through SQLAlchemy, the query timeout is kept by syncer (the driver's
own cancel, here DuckDB's ``interrupt``) and the log says once that the generic rules apply.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import duckdb
import pytest
from duckdb_engine import Dialect as DuckDBDialect
from sqlalchemy.dialects import registry

import syncer.db
from syncer import audiences, dialects
from syncer.errors import AudienceError
from syncer.settings import Settings, load_settings
from syncer.sync import sync_audiences
from tests.helpers import write_settings
from tests.receiver import Receiver


class PlainDuck(DuckDBDialect):
    name = "plainduck"
    supports_statement_cache = True


registry.register("plainduck", __name__, "PlainDuck")


def _source_file(path: Path, count: int) -> Path:
    with duckdb.connect(str(path)) as conn:
        conn.execute(
            "CREATE TABLE users AS SELECT 'u' || i AS user_id, i % 2 AS plan FROM range(?) t(i)",
            [count],
        )
    return path


def _setup(tmp_path: Path, receiver: Receiver, *, timeout: float = 30) -> Settings:
    source = _source_file(tmp_path / "plain.duckdb", 25_000)
    path = write_settings(
        tmp_path / "settings.toml",
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        workflow_urls=[receiver.url("w1")],
        extra=(
            f'[sources.plain]\nurl = "plainduck:///{source}"\nquery_timeout_seconds = {timeout}\n'
        ),
    )
    settings = load_settings(str(path))
    syncer.db.upgrade(settings.database.url)
    return settings


def test_an_unknown_dialect_syncs_by_the_generic_rules_and_says_so_once(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _setup(tmp_path, receiver)
    state = syncer.db.open_state(settings.database.url)
    dialects._announced.discard("plainduck")
    caplog.set_level(logging.WARNING, logger="syncer.dialects")
    audiences.create(
        state,
        settings,
        name="Odd Plan",
        sql="SELECT user_id FROM users WHERE plan = 1",
        source="plain",
    )
    [first] = sync_audiences(state, settings, ["odd_plan"])
    [second] = sync_audiences(state, settings, ["odd_plan"])
    assert (first.status, first.members, first.added) == ("succeeded", 12_500, 12_500)
    assert (second.status, second.added, second.removed) == ("succeeded", 0, 0)
    traits = receiver.final_traits("w1")
    assert len(traits) == 12_500
    assert traits["u1"] == {"odd_plan": True} and "u0" not in traits
    warnings = [r.getMessage() for r in caplog.records if "no entry for" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "'plainduck'" in warnings[0] and "'plain'" in warnings[0]


def test_an_unknown_dialect_s_query_is_cancelled_at_the_timeout(
    tmp_path: Path, receiver: Receiver
) -> None:
    settings = _setup(tmp_path, receiver, timeout=1)
    state = syncer.db.open_state(settings.database.url)
    audiences.create(state, settings, name="Quick", sql="SELECT user_id FROM users", source="plain")
    endless = (
        "SELECT a.user_id FROM users a, users b, users c "
        "WHERE length(a.user_id || b.user_id || c.user_id) < 0"
    )
    started = time.monotonic()
    with pytest.raises(AudienceError, match="query_timeout_seconds"):
        audiences.create(state, settings, name="Endless", sql=endless, source="plain")
    assert time.monotonic() - started < 15
    assert [a.key for a in audiences.list_all(state)] == ["quick"]
