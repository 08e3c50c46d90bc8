"""Preview: what a run would do, evaluated as a run evaluates it, with nothing written or sent.

Each test runs with the state database on SQLite and on PostgreSQL; the first also with the
source being the state database itself and a PostgreSQL database of its own. "Nothing
written" is a dump of every row of every table of the state database, before and after.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from syncer import audiences, preview, privacy
from syncer.errors import AudienceError, SourceError
from syncer.guard import GuardOverrides
from syncer.preview import Preview
from tests.e2e.conftest import dump_database
from tests.integration.conftest import World


def users(first: int, last: int) -> list[str]:
    return [f"u{i:03d}" for i in range(first, last + 1)]


def counts(p: Preview) -> tuple[int, int, int, int]:
    return (p.members, p.entering, p.leaving, p.skipped)


def test_preview_is_the_next_runs_diff_and_writes_nothing(every_source_world: World) -> None:
    w = every_source_world
    w.set_users([*users(1, 30), None, "  "])
    audience = w.create()

    before = dump_database(w.state_url)
    first = preview.preview_audience(w.state, w.settings, audience)
    assert dump_database(w.state_url) == before
    assert counts(first) == (30, 30, 0, 2)
    assert first.initial and not first.held and not first.approved
    assert first.audience_key == audience.key
    assert first.sample == tuple(users(1, 10)) == first.sample_entering
    assert first.sample_leaving == ()

    result = w.sync(audience.key)
    assert (result.members, result.added, result.removed) == (30, 30, 0)
    sent = len(w.rx.requests())

    w.set_users(users(6, 35))  # u001-u005 leave, u031-u035 enter
    before = dump_database(w.state_url)
    again = preview.preview_audience(w.state, w.settings, audience, sample_size=3)
    assert dump_database(w.state_url) == before
    assert len(w.rx.requests()) == sent
    assert counts(again) == (30, 5, 5, 0)
    assert not again.initial and not again.held
    assert again.sample == ("u006", "u007", "u008")
    assert again.sample_entering == ("u031", "u032", "u033")
    assert again.sample_leaving == ("u001", "u002", "u003")
    assert again.as_json() == {
        "audience_key": audience.key,
        "members": 30,
        "entering": 5,
        "leaving": 5,
        "skipped": 0,
        "sample": ["u006", "u007", "u008"],
        "sample_entering": ["u031", "u032", "u033"],
        "sample_leaving": ["u001", "u002", "u003"],
        "held": False,
        "approved": False,
        "initial": False,
    }

    # The run that follows does what the preview said.
    result = w.sync(audience.key)
    assert (result.members, result.added, result.removed, result.skipped) == counts(again)


def test_sql_preview_is_everyone_entering(world: World) -> None:
    w = world
    w.set_users([*users(1, 12), None])
    before = dump_database(w.state_url)
    found = preview.preview(
        w.state,
        w.settings,
        sql="SELECT user_id FROM users WHERE user_id > 'u004'",
        params=None,
        source_name="default",
        audience=None,
        sample_size=4,
    )
    assert dump_database(w.state_url) == before
    assert counts(found) == (8, 8, 0, 0)
    assert found.sample == ("u005", "u006", "u007", "u008") == found.sample_entering
    assert found.initial and not found.held
    assert "audience_key" not in found.as_json()


def test_deleted_users_are_skipped_and_never_shown(world: World) -> None:
    w = world
    w.set_users(users(1, 10))
    audience = w.create()
    w.sync(audience.key)
    privacy.delete_users(w.state, ["u002"], [])
    w.set_users(users(1, 12))  # the source still returns u002

    found = preview.preview_audience(w.state, w.settings, audience, sample_size=5)
    assert counts(found) == (11, 2, 0, 1)
    assert found.sample == ("u001", "u003", "u004", "u005", "u006")
    assert found.sample_entering == ("u011", "u012")
    result = w.sync(audience.key)
    assert (result.members, result.added, result.removed, result.skipped) == counts(found)

    by_sql = preview.preview(
        w.state,
        w.settings,
        sql="SELECT user_id FROM users",
        params=None,
        source_name="default",
        audience=None,
    )
    assert counts(by_sql) == (11, 11, 0, 1)
    assert "u002" not in by_sql.sample + by_sql.sample_entering


def test_the_guard_verdict_follows_thresholds_overrides_and_approval(world: World) -> None:
    w = world
    w.set_users(users(1, 20))
    audience = w.create()
    w.sync(audience.key)
    w.set_users(users(1, 5))  # 15 of 20 would leave: 75 %, but fewer than min_removed (100)

    default = preview.preview_audience(w.state, w.settings, audience)
    assert (default.leaving, default.held) == (15, False)

    strict = dataclasses.replace(
        audience, guard=GuardOverrides(max_removed_percent=50, min_removed=10)
    )
    held = preview.preview_audience(w.state, w.settings, strict)
    assert (held.leaving, held.held, held.approved) == (15, True, False)

    lenient = dataclasses.replace(strict, guard=GuardOverrides(max_removed_percent=80))
    assert not preview.preview_audience(w.state, w.settings, lenient).held

    approved = dataclasses.replace(strict, removal_approved_at=datetime.now(UTC))
    let_through = preview.preview_audience(w.state, w.settings, approved)
    assert (let_through.held, let_through.approved) == (False, True)


def test_a_failing_source_raises_as_a_run_would_and_leaves_nothing(world: World) -> None:
    w = world
    w.set_users(users(1, 10))
    audience = w.create()
    w.sync(audience.key)
    before = dump_database(w.state_url)

    w.source_sql("ALTER TABLE users RENAME TO customers")
    with pytest.raises(SourceError, match="the audience query failed on source 'default'"):
        preview.preview_audience(w.state, w.settings, audience)
    with pytest.raises(AudienceError):
        preview.preview(
            w.state,
            w.settings,
            sql="DELETE FROM customers",
            params=None,
            source_name="default",
            audience=None,
        )
    assert dump_database(w.state_url) == before

    # The state engine's connections came back clean: a preview and a run go on as usual.
    w.source_sql("ALTER TABLE customers RENAME TO users")
    assert counts(preview.preview_audience(w.state, w.settings, audience)) == (10, 0, 0, 0)
    assert w.sync(audience.key).status == "succeeded"


def test_dry_run_previews_what_sync_would_run(world: World) -> None:
    w = world
    w.set_users(users(1, 10))
    a = w.create("Pro Users")
    b = w.create("Few Users", "SELECT user_id FROM users WHERE user_id <= 'u003'")
    paused = w.create("Paused Users")
    audiences.set_status(w.state, paused.key, "paused")
    w.sync(a.key)
    before = dump_database(w.state_url)

    every = preview.dry_run(w.state, w.settings)
    assert [(r.audience_key, r.error) for r in every] == [(b.key, None), (a.key, None)]
    assert [counts(r.preview) for r in every if r.preview] == [(3, 3, 0, 0), (10, 0, 0, 0)]

    [only] = preview.dry_run(w.state, w.settings, [paused.key])
    assert only.preview is not None and only.preview.initial
    assert only.as_json()["audience_key"] == paused.key

    with pytest.raises(AudienceError, match="no audience with key 'nope'"):
        preview.dry_run(w.state, w.settings, [a.key, "nope"])

    w.source_sql("ALTER TABLE users RENAME TO customers")
    broken = preview.dry_run(w.state, w.settings, [a.key])
    assert broken[0].preview is None and "no such table" in str(broken[0].error)
    assert broken[0].as_json() == {"audience_key": a.key, "error": broken[0].error}
    assert dump_database(w.state_url) == before
    with w.state.connect() as conn:  # no run was opened by any of it
        assert conn.execute(text("SELECT count(*) FROM sync_runs")).scalar() == 1
