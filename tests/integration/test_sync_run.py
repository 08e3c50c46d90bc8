"""One run of an audience end to end: source -> snapshot -> diff -> outbox -> the receiver.

Every test runs with the state database on SQLite and on PostgreSQL; most also with the
audience SQL running on the state database itself, and some on a PostgreSQL source of its own.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import pytest

from syncer import history
from syncer.errors import ConfigError
from syncer.sync import sync_audiences
from tests.integration.conftest import World

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
PATHS = ("w1", "w2")


def users(first: int, last: int) -> list[str]:
    """``u000`` … : ids from ``first`` to ``last`` inclusive."""
    return [f"u{i:03d}" for i in range(first, last + 1)]


def sent_user_ids(w: World, path: str, since: int = 0) -> dict[str, list[bool]]:
    """userId -> the trait values accepted on ``path``, from request number ``since`` on."""
    got: dict[str, list[bool]] = {}
    for request in w.rx.accepted(path)[since:]:
        [value] = request.json["traits"].values()
        got.setdefault(request.user_id, []).append(value)
    return got


def test_initial_sync_sends_every_member_true_to_every_url(every_source_world: World) -> None:
    w = every_source_world
    members = users(1, 25)
    w.set_users(members)
    audience = w.create("Order Completed Last 30days")
    key = audience.key
    assert key == "order_completed_last_30days"

    before = datetime.now(UTC) - timedelta(seconds=1)
    result = w.sync(key)
    after = datetime.now(UTC) + timedelta(seconds=1)

    assert result.run_id is not None
    assert (result.audience_key, result.kind, result.status) == (key, "initial", "succeeded")
    assert (result.members, result.added, result.removed, result.skipped) == (25, 25, 0, 0)
    assert (result.sent, result.failed, result.error) == (50, 0, None)

    message_ids: dict[str, dict[str, str]] = {}
    for path in PATHS:
        requests = w.rx.requests(path)
        assert len(requests) == 25
        assert all(r.accepted for r in requests)
        assert w.rx.final_traits(path) == {u: {key: True} for u in members}
        for request in requests:
            assert request.method == "POST"
            assert request.signature_ok is True
            assert request.headers["Content-Type"].startswith("application/json")
            body = request.json
            assert body["type"] == "identify"
            assert body["userId"] in members
            assert body["traits"] == {key: True}
            assert body["context"]["personas"] == {
                "computation_class": "audience",
                "computation_key": key,
                "computation_id": str(audience.id),
            }
            assert body["context"]["library"]["name"] == "syncer"
            assert body["integrations"] == {"All": False}
            assert TIMESTAMP.fullmatch(body["timestamp"]), body["timestamp"]
            sent_at = datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
            assert before <= sent_at.replace(tzinfo=UTC) <= after
            assert isinstance(body["messageId"], str) and body["messageId"]
        message_ids[path] = {r.user_id: r.message_id for r in requests}
        assert len(set(message_ids[path].values())) == 25
    # stable per (run, audience, user): the same message on both workflow URLs
    assert message_ids["w1"] == message_ids["w2"]

    [record] = history.runs(w.state, key)
    assert (record.run_id, record.kind, record.status) == (result.run_id, "initial", "succeeded")
    assert (record.members, record.added, record.removed, record.skipped_ids) == (25, 25, 0, 0)
    assert (record.sent, record.failed, record.pending) == (50, 0, 0)
    assert record.finished_at is not None and record.finished_at >= record.started_at

    run = w.rows("SELECT status, committed_at, finished_at FROM sync_runs")
    assert [r.status for r in run] == ["succeeded"]
    assert run[0].committed_at is not None and run[0].finished_at is not None
    assert w.current_members(key) == set(members)
    assert w.statuses(key) == {"sent": 50}
    assert w.rows("SELECT * FROM sync_leases") == []


def test_incremental_sends_only_who_entered_and_left(every_source_world: World) -> None:
    w = every_source_world
    w.set_users(users(0, 19))
    key = w.create().key
    w.sync(key)
    seen = {path: len(w.rx.requests(path)) for path in PATHS}

    now = [u for u in users(0, 19) if u not in ("u000", "u001")] + users(20, 22)
    w.set_users(now)
    result = w.sync(key)

    assert (result.kind, result.status) == ("incremental", "succeeded")
    assert (result.members, result.added, result.removed) == (21, 3, 2)
    assert (result.sent, result.failed) == (10, 0)
    for path in PATHS:
        assert len(w.rx.requests(path)) == seen[path] + 5
        assert sent_user_ids(w, path, seen[path]) == {
            "u000": [False],
            "u001": [False],
            "u020": [True],
            "u021": [True],
            "u022": [True],
        }
        expected = {u: {"pro_users": True} for u in now} | {
            u: {"pro_users": False} for u in ("u000", "u001")
        }
        assert w.rx.final_traits(path) == expected

    # no change in the source: not a single call
    calls = len(w.rx.requests())
    quiet = w.sync(key)
    assert (quiet.kind, quiet.status) == ("incremental", "succeeded")
    assert (quiet.members, quiet.added, quiet.removed, quiet.sent, quiet.failed) == (21, 0, 0, 0, 0)
    assert len(w.rx.requests()) == calls
    assert w.rows("SELECT id FROM deliveries WHERE run_id = :r", r=quiet.run_id) == []
    assert [r.kind for r in history.runs(w.state, "pro_users")] == [
        "incremental",
        "incremental",
        "initial",
    ]


def test_duplicates_collapse_and_blank_ids_are_skipped(any_source_world: World) -> None:
    w = any_source_world
    w.set_users(["u1", "u1", "u2", None, None, "", "   ", "u3", "u2", "u1"])
    key = w.create().key

    result = w.sync(key)

    assert (result.status, result.members, result.added, result.skipped) == ("succeeded", 3, 3, 4)
    assert w.scalar("SELECT skipped_ids FROM sync_runs WHERE id = :r", r=result.run_id) == 4
    assert w.scalar("SELECT members FROM sync_runs WHERE id = :r", r=result.run_id) == 3
    [record] = history.runs(w.state, key)
    assert record.skipped_ids == 4
    for path in PATHS:
        assert sorted(r.user_id for r in w.rx.requests(path)) == ["u1", "u2", "u3"]
    assert w.current_members(key) == {"u1", "u2", "u3"}

    # counted afresh on every run
    again = w.sync(key)
    assert (again.members, again.added, again.skipped) == (3, 0, 4)


def test_whitespace_only_ids_are_skipped_on_every_source(any_source_world: World) -> None:
    """A blank id is blank whatever the source: tabs and newlines are not user ids."""
    w = any_source_world
    w.set_users(["u1", "\t", " \n ", "\r\n"])
    key = w.create().key

    result = w.sync(key)

    assert (result.members, result.skipped) == (1, 3)
    assert w.current_members(key) == {"u1"}
    assert sorted(r.user_id for r in w.rx.requests("w1")) == ["u1"]


def test_ids_longer_than_255_characters_are_skipped_not_cut(any_source_world: World) -> None:
    w = any_source_world
    long_id = "x" * 300
    w.set_users(["u1", long_id, "y" * 255])
    key = w.create().key

    result = w.sync(key)

    assert (result.members, result.skipped) == (2, 1)
    assert w.current_members(key) == {"u1", "y" * 255}
    assert sorted(r.user_id for r in w.rx.requests("w1")) == ["u1", "y" * 255]


def test_ids_arrive_exactly_as_the_source_holds_them(every_source_world: World) -> None:
    """Inner whitespace, escapes of PostgreSQL's COPY format, ids starting with a blank or a
    control character, the lowest printable character: all are ids, stored and sent as is."""
    w = every_source_world
    odd = [
        "back\\slash",
        "\\.",
        "tab\tinside",
        "line\nbreak",
        "cr\rhere",
        " leading space",
        "trailing space ",
        "\x01control",
        "!",
        "ünïcödé",
        "é" * 255,
    ]
    w.set_users(["u1", *odd, "u2"])
    key = w.create().key

    result = w.sync(key)

    assert (result.members, result.skipped) == (len(odd) + 2, 0)
    assert w.current_members(key) == {"u1", "u2", *odd}
    assert sorted(r.user_id for r in w.rx.requests("w1")) == sorted(["u1", "u2", *odd])


def test_integer_ids_from_the_source_become_strings(every_source_world: World) -> None:
    w = every_source_world
    w.source_sql("CREATE TABLE accounts (id BIGINT, name TEXT)")
    w.source_sql(
        "INSERT INTO accounts (id, name) VALUES (:id, 'a')",
        [{"id": i} for i in (1, 2, 2, 30, 12345678901234, None)],
    )
    key = w.create("Accounts", "SELECT id FROM accounts").key

    result = w.sync(key)

    assert (result.members, result.skipped) == (4, 1)
    expected = {"1", "2", "30", "12345678901234"}
    assert w.current_members(key) == expected
    for path in PATHS:
        assert set(w.rx.final_traits(path)) == expected
        assert all(isinstance(r.json["userId"], str) for r in w.rx.requests(path))

    # the same integers next time are the same members: no change, no call
    calls = len(w.rx.requests())
    again = w.sync(key)
    assert (again.added, again.removed) == (0, 0)
    assert len(w.rx.requests()) == calls


def test_members_as_of_any_run_match_the_source_then(any_source_world: World) -> None:
    w = any_source_world
    key = w.create(sql="SELECT user_id FROM users").key
    other = w.create("Other", "SELECT user_id FROM users WHERE user_id = 'b'").key
    snapshots = [
        {"a", "b", "c", "d"},
        {"b", "c", "e"},  # a and d leave, e enters
        {"a", "c", "e", "f"},  # a comes back, b leaves, f enters
        {"a", "c", "e", "f"},  # no change
    ]
    w.set_users(snapshots[0])  # create() validates against the source; give it rows
    run_ids: list[int] = []
    other_runs: list[int] = []
    for members in snapshots:
        w.set_users(sorted(members))
        result = w.sync(key)
        assert result.status == "succeeded"
        assert result.run_id is not None
        run_ids.append(result.run_id)
        other_result = w.sync(other)  # another audience's run in between
        assert other_result.run_id is not None
        other_runs.append(other_result.run_id)

    for run_id, other_run, members in zip(run_ids, other_runs, snapshots, strict=True):
        assert w.members_as_of(key, run_id) == members
        # any run id works: another audience's run shows this one's last committed snapshot
        assert w.members_as_of(key, other_run) == members
    assert w.current_members(key) == snapshots[-1]

    stays = w.rows(
        "SELECT m.entered_run_id, m.exited_run_id FROM memberships m "
        "JOIN audiences a ON a.id = m.audience_id WHERE a.key = :k AND m.user_id = 'a' "
        "ORDER BY m.entered_run_id",
        k=key,
    )
    assert [tuple(s) for s in stays] == [(run_ids[0], run_ids[1]), (run_ids[2], None)]

    # added/removed per run equal the membership rows that entered/exited in it
    for run_id in run_ids:
        added, removed = w.rows("SELECT added, removed FROM sync_runs WHERE id = :r", r=run_id)[0]
        entered = w.scalar("SELECT COUNT(*) FROM memberships WHERE entered_run_id = :r", r=run_id)
        exited = w.scalar("SELECT COUNT(*) FROM memberships WHERE exited_run_id = :r", r=run_id)
        assert (added, removed) == (entered, exited)
    assert [(r.added, r.removed) for r in history.runs(w.state, key)] == [
        (0, 0),
        (2, 1),
        (1, 2),
        (4, 0),
    ]

    assert sent_user_ids(w, "w1")["a"] == [True, False, True]
    assert w.rx.final_traits("w2") == {
        "a": {key: True},
        "b": {key: False, other: False},
        "c": {key: True},
        "d": {key: False},
        "e": {key: True},
        "f": {key: True},
    }


def test_source_query_failing_fails_the_run_and_changes_nothing(any_source_world: World) -> None:
    w = any_source_world
    w.set_users(users(1, 10))
    key = w.create().key
    first = w.sync(key)
    calls = len(w.rx.requests())

    w.source_sql("DROP TABLE users")
    result = w.sync(key)

    assert (result.kind, result.status) == ("incremental", "failed")
    assert result.run_id is not None and result.run_id != first.run_id
    assert result.error is not None
    assert "source 'default'" in result.error
    assert "users" in result.error
    assert (result.members, result.added, result.removed, result.sent) == (0, 0, 0, 0)
    assert len(w.rx.requests()) == calls
    assert w.current_members(key) == set(users(1, 10))
    assert w.members_as_of(key, result.run_id) == set(users(1, 10))
    assert w.rows("SELECT id FROM deliveries WHERE run_id = :r", r=result.run_id) == []
    [run] = w.rows(
        "SELECT status, committed_at, finished_at, members, error FROM sync_runs WHERE id = :r",
        r=result.run_id,
    )
    assert run.status == "failed"
    assert run.committed_at is None and run.members is None
    assert run.finished_at is not None and "source 'default'" in run.error
    assert [r.status for r in history.runs(w.state, key)] == ["failed", "succeeded"]
    assert w.rows("SELECT * FROM sync_leases") == []


def test_a_source_whose_query_no_longer_fits_fails_only_its_audience(world: World) -> None:
    """A warehouse table that grew a column makes that audience's run fail, not the others'."""
    w = world
    w.set_users(users(1, 5))
    w.source_sql("CREATE TABLE vip (uid TEXT)")
    w.source_sql("INSERT INTO vip (uid) VALUES ('u001'), ('u002')")
    vip = w.create("VIP", "SELECT * FROM vip").key
    pro = w.create("Pro Users").key
    w.source_sql("ALTER TABLE vip ADD COLUMN note TEXT")

    results = {r.audience_key: r for r in sync_audiences(w.state, w.settings)}

    assert results[vip].status == "failed"
    assert results[vip].error is not None and "columns" in results[vip].error
    assert results[pro].status == "succeeded"
    assert set(w.rx.final_traits("w1")) == set(users(1, 5))
    assert w.current_members(vip) == set()


def test_sync_without_a_workflow_url_is_a_config_error(world: World) -> None:
    w = world
    w.set_users(["u1"])
    key = w.create().key
    settings = w.configure(None)
    with pytest.raises(ConfigError, match="workflow_urls"):
        sync_audiences(w.state, settings, [key])
    assert w.rows("SELECT id FROM sync_runs") == []


@pytest.mark.parametrize(
    "state_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_on_postgresql_an_exit_rewrites_its_row_without_touching_an_index(world: World) -> None:
    """docs/schema.md: no index on ``exited_run_id`` there and a tenth of every page free, so
    an exit is a heap-only (HOT) update while a run's exits fit in that room (5 % here)."""
    w = world
    members = users(1, 400)
    w.set_users(members)
    view = w.create()
    w.sync(view.key)
    w.set_users(m for n, m in enumerate(members) if n % 20)  # 20 leave

    assert w.sync(view.key).status == "succeeded"

    # The statistics of a backend are written when it ends: close syncer's connections, then
    # wait for PostgreSQL to have counted their updates.
    w.state.dispose()
    query = "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'memberships'"
    deadline = time.monotonic() + 10
    while (counts := w.rows(query)[0]).n_tup_upd < 20 and time.monotonic() < deadline:
        w.state.dispose()
        time.sleep(0.1)
    assert (counts.n_tup_upd, counts.n_tup_hot_upd) == (20, 20)
