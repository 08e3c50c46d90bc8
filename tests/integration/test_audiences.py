"""Audiences: keys, validation of the SQL against the source (never a write), updates,
pause/resume/delete, and which audiences a run picks up.
"""

from __future__ import annotations

import pytest

from syncer import audiences
from syncer.audiences import parse_schedule
from syncer.errors import AudienceError
from syncer.sync import sync_audiences
from tests.integration.conftest import DEFAULT_SQL, World

KEY = "pro_users"

SQL_THAT_FAILS = [
    "",
    "   ;  ",
    "SELEC user_id FROM users",
    "SELECT user_id FROM no_such_table",
    "SELECT no_such_column FROM users",
    "DELETE FROM users",
    "UPDATE users SET plan = 'free'",
    "DROP TABLE users",
    "INSERT INTO users (user_id) VALUES ('intruder')",
    "SELECT user_id FROM users; DELETE FROM users",
    "CREATE TABLE x AS SELECT user_id FROM users",
]


def audience_rows(w: World) -> list[tuple[str, str]]:
    return [tuple(r) for r in w.rows("SELECT a.key, a.status FROM audiences a ORDER BY a.id")]


def users_now(w: World) -> list[tuple[object, ...]]:
    return sorted(w.source_rows("SELECT user_id, email, plan FROM users"))


def test_create_derives_the_key_and_stores_the_definition(lite_world: World) -> None:
    w = lite_world
    w.set_users(["u1"])

    view = w.create("  Order   Completed Last 30days ", "  SELECT user_id FROM users ;; ")

    assert view.key == "order_completed_last_30days"
    assert view.name == "Order Completed Last 30days"
    assert view.sql == "SELECT user_id FROM users"
    assert (view.status, view.source) == ("active", "default")
    assert view.schedule == audiences.Schedule()
    [row] = w.rows("SELECT key, name, definition_sql, status, source_name FROM audiences")
    assert tuple(row) == (
        "order_completed_last_30days",
        "Order Completed Last 30days",
        "SELECT user_id FROM users",
        "active",
        "default",
    )
    assert audiences.get(w.state, view.key) == view


@pytest.mark.parametrize("name", ["", "   ", "!!! ???"])
def test_a_name_without_letters_or_digits_is_refused(lite_world: World, name: str) -> None:
    w = lite_world
    w.set_users(["u1"])
    with pytest.raises(AudienceError, match="name"):
        w.create(name)
    assert audience_rows(w) == []


def test_sql_that_fails_or_writes_is_refused_and_nothing_changes(any_source_world: World) -> None:
    w = any_source_world
    w.set_users(["u1", "u2"])
    before = users_now(w)
    for sql in SQL_THAT_FAILS:
        with pytest.raises(AudienceError) as caught:
            w.create(sql=sql)
        message = str(caught.value)
        assert "\n" not in message, sql
        assert users_now(w) == before, sql
        assert audience_rows(w) == [], sql
    with pytest.raises(AudienceError, match=r"source 'default'.*no_such_table"):
        w.create(sql="SELECT user_id FROM no_such_table")


def test_writes_are_refused_on_a_postgresql_source(pg_source_world: World) -> None:
    w = pg_source_world
    w.set_users(["u1", "u2", "u3"])
    w.source_sql("CREATE SEQUENCE s")
    w.source_sql("CREATE TABLE audit (n INTEGER)")
    w.source_sql(
        "CREATE FUNCTION bump(uid TEXT) RETURNS TEXT LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO audit (n) VALUES (1); RETURN uid; END $$"
    )
    before = users_now(w)
    writes = [
        "DELETE FROM users",
        "WITH d AS (DELETE FROM users RETURNING user_id) SELECT user_id FROM d",
        "WITH d AS (UPDATE users SET plan = 'free' RETURNING user_id) SELECT user_id FROM d",
        "SELECT nextval('s')",
        "SELECT nextval('s') AS user_id FROM users",
        "SELECT bump(user_id) FROM users",
    ]
    for sql in writes:
        with pytest.raises(AudienceError, match=r"source 'default'|read-only SELECT"):
            w.create(sql=sql)
        assert users_now(w) == before, sql
        assert w.source_rows("SELECT last_value, is_called FROM s") == [(1, False)], sql
        assert w.source_rows("SELECT COUNT(*) FROM audit") == [(0,)], sql
        assert audience_rows(w) == [], sql


def test_audience_sql_cannot_write_at_run_time_either(pg_source_world: World) -> None:
    """A definition whose write only shows once the data changes is still run read-only."""
    w = pg_source_world
    w.set_users(["u1", "u2"])
    w.source_sql("CREATE TABLE audit (n INTEGER)")
    w.source_sql(
        "CREATE FUNCTION bump(uid TEXT) RETURNS TEXT LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO audit (n) VALUES (1); RETURN uid; END $$"
    )
    key = w.create(
        sql="SELECT CASE WHEN plan = 'vip' THEN bump(user_id) ELSE user_id END AS user_id "
        "FROM users"
    ).key
    w.source_sql("UPDATE users SET plan = 'vip' WHERE user_id = 'u1'")

    result = w.sync(key)

    assert w.source_rows("SELECT COUNT(*) FROM audit") == [(0,)]
    assert result.status == "failed"
    assert result.error is not None and "source 'default'" in result.error


def test_two_columns_without_user_id_are_refused(lite_world: World) -> None:
    w = lite_world
    w.set_users(["u1"])
    with pytest.raises(AudienceError, match="user_id") as caught:
        w.create(sql="SELECT email, plan FROM users")
    assert "2 columns" in str(caught.value)
    assert audience_rows(w) == []


def test_user_id_among_several_columns_is_the_id(world: World) -> None:
    w = world
    w.set_users(["u1", "u2"])
    key = w.create(sql="SELECT email, user_id, plan FROM users").key

    result = w.sync(key)

    assert (result.status, result.members) == ("succeeded", 2)
    assert set(w.rx.final_traits("w1")) == {"u1", "u2"}
    assert w.current_members(key) == {"u1", "u2"}


def test_keys_are_unique_and_a_deleted_key_is_never_reused(lite_world: World) -> None:
    w = lite_world
    w.set_users(["u1"])
    w.create("Pro Users")

    for same_key in ("Pro Users", "pro users", "Pro-Users", "ProUsers"):
        with pytest.raises(AudienceError, match="already exists"):
            w.create(same_key)
    assert audience_rows(w) == [(KEY, "active")]

    deleted = audiences.set_status(w.state, KEY, "deleted")
    assert deleted.status == "deleted"
    with pytest.raises(AudienceError, match="never reused"):
        w.create("Pro Users")
    assert audience_rows(w) == [(KEY, "deleted")]
    assert audiences.list_all(w.state) == []
    assert [a.key for a in audiences.list_all(w.state, include_deleted=True)] == [KEY]
    with pytest.raises(AudienceError, match="no audience"):
        audiences.get(w.state, KEY)
    assert w.scalar("SELECT deleted_at FROM audiences") is not None


def test_update_changes_sql_and_schedule_but_never_the_key(world: World) -> None:
    w = world
    w.set_users(["u1", "u2", "u3"])
    created = w.create()
    w.sync(KEY)

    updated = audiences.update_definition(
        w.state,
        w.settings,
        KEY,
        sql="SELECT user_id FROM users WHERE user_id <> 'u1'",
        schedule=parse_schedule("1h", None),
    )

    assert (updated.key, updated.id, updated.name) == (KEY, created.id, created.name)
    assert updated.sql == "SELECT user_id FROM users WHERE user_id <> 'u1'"
    assert updated.schedule == audiences.Schedule(every_seconds=3600)
    assert updated.updated_at >= created.updated_at
    result = w.sync(KEY)
    assert (result.kind, result.added, result.removed) == ("incremental", 0, 1)
    assert w.rx.final_traits("w1")["u1"] == {KEY: False}

    by_cron = audiences.update_definition(
        w.state, w.settings, KEY, schedule=parse_schedule(None, "0 */3 * * *")
    )
    assert by_cron.schedule == audiences.Schedule(cron="0 */3 * * *")
    assert by_cron.sql == updated.sql

    with pytest.raises(AudienceError):
        audiences.update_definition(w.state, w.settings, KEY, sql="DELETE FROM users")
    with pytest.raises(AudienceError):
        audiences.update_definition(w.state, w.settings, KEY, sql="SELECT nope FROM users")
    with pytest.raises(AudienceError, match="nothing to update"):
        audiences.update_definition(w.state, w.settings, KEY)
    assert audiences.get(w.state, KEY).sql == updated.sql
    assert users_now(w) == [(u, f"{u}@example.com", "pro") for u in ("u1", "u2", "u3")]
    assert [tuple(r) for r in w.rows("SELECT a.key, a.every_seconds, a.cron FROM audiences a")] == [
        (KEY, None, "0 */3 * * *")
    ]


def test_paused_and_deleted_audiences_are_not_synced(world: World) -> None:
    w = world
    w.set_users(["u1"])
    w.create("Pro Users")
    w.create("Trial Users")
    w.create("Gone Users")

    paused = audiences.set_status(w.state, "trial_users", "paused")
    deleted = audiences.set_status(w.state, "gone_users", "deleted")
    assert (paused.status, deleted.status) == ("paused", "deleted")
    assert [a.key for a in audiences.list_all(w.state)] == ["pro_users", "trial_users"]

    results = sync_audiences(w.state, w.settings)

    assert [r.audience_key for r in results] == ["pro_users"]
    assert w.rx.final_traits("w1") == {"u1": {"pro_users": True}}
    ran = w.rows("SELECT a.key FROM sync_runs r JOIN audiences a ON a.id = r.audience_id")
    assert [r.key for r in ran] == ["pro_users"]

    resumed = audiences.set_status(w.state, "trial_users", "active")
    assert resumed.status == "active"
    results = sync_audiences(w.state, w.settings)
    assert {r.audience_key: r.kind for r in results} == {
        "pro_users": "incremental",
        "trial_users": "initial",
    }
    assert w.rx.final_traits("w1") == {"u1": {"pro_users": True, "trial_users": True}}

    with pytest.raises(AudienceError):
        audiences.set_status(w.state, "gone_users", "active")
    with pytest.raises(AudienceError):
        audiences.update_definition(w.state, w.settings, "gone_users", sql=DEFAULT_SQL)
    assert audiences.get(w.state, "gone_users", include_deleted=True).status == "deleted"
