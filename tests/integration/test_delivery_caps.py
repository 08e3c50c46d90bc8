"""Delivery caps and the operator's outbox tools, against real databases and a loopback receiver.

- ``[tray] max_attempts`` counts tries across runs; ``max_age`` gives up on what is too old;
- a URL that keeps failing trips a breaker: the rest of what it is owed waits for a later pass;
- ``outbox.retry`` sends failed deliveries again, unless a newer value exists (last value wins);
- ``[tray] max_requests_per_second`` caps the calls to one URL.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from syncer import audiences, outbox
from syncer.delivery import BREAKER_MIN_FAILURES, TRIES_PER_PASS
from syncer.models import AUDIENCE_DELETED, DELIVERIES
from tests.integration.conftest import World

KEY = "pro_users"


def users(first: int, last: int) -> list[str]:
    return [f"u{i:03d}" for i in range(first, last + 1)]


def values_sent(w: World, path: str, user_id: str) -> list[bool]:
    """The trait values of the accepted identify calls for one user on one URL, in order."""
    return [r.json["traits"][KEY] for r in w.rx.accepted(path) if r.user_id == user_id]


def age_pending(w: World, user_ids: list[str], by: timedelta) -> int:
    """Move these users' pending deliveries back in time (when they were queued, and since
    when they are owed, where the schema tells the two apart); how many moved."""
    clocks = [c for c in (DELIVERIES.c.created_at, DELIVERIES.c.get("owed_since")) if c is not None]
    with w.state.begin() as conn:
        rows = conn.execute(
            select(DELIVERIES.c.id, *clocks).where(
                DELIVERIES.c.status == "pending", DELIVERIES.c.user_id.in_(user_ids)
            )
        ).all()
        for row in rows:
            conn.execute(
                update(DELIVERIES)
                .where(DELIVERIES.c.id == row.id)
                .values({c.name: getattr(row, c.name) - by for c in clocks})
            )
    return len(rows)


# max_attempts ----------------------------------------------------------------------------------


def test_max_attempts_counts_tries_across_runs_then_fails_with_the_last_answer(
    world: World,
) -> None:
    w = world
    w.configure(w.urls, max_attempts=4)
    members = users(1, 5)
    w.set_users(members)
    w.create()
    w.rx.set_status("w2", 503)

    first = w.sync(KEY)

    assert (first.status, first.sent) == ("partial", 5)
    owed = w.deliveries(KEY, path="w2")
    assert [(r.status, r.attempts, r.last_status_code) for r in owed] == [
        ("pending", TRIES_PER_PASS, 503)
    ] * 5
    assert len(w.rx.requests("w2")) == 5 * TRIES_PER_PASS

    second = w.sync(KEY)

    assert second.failed == 5
    gave_up = w.deliveries(KEY, path="w2")
    for row in gave_up:
        assert (row.status, row.attempts, row.last_status_code) == ("failed", 4, 503)
        assert row.last_error is not None and "gave up after 4 attempts" in row.last_error
        assert "503" in row.last_error
        assert row.delivered_at is None
    assert len(w.rx.requests("w2")) == 5 * 4  # one more try each, no more
    # the other URL took everything on the first try and was not called again
    assert w.statuses(KEY, path="w1") == {"sent": 5}
    assert len(w.rx.requests("w1")) == 5
    assert w.rx.final_traits("w1") == {u: {KEY: True} for u in members}

    # failed for good: a third run does not call again
    third = w.sync(KEY)
    assert third.status == "succeeded"
    assert len(w.rx.requests("w2")) == 20


# max_age ---------------------------------------------------------------------------------------


def test_deliveries_older_than_max_age_fail_and_are_not_sent(world: World) -> None:
    w = world
    members = users(1, 5)
    w.set_users(members)
    w.create()
    w.rx.set_status("w2", 503)
    w.sync(KEY)
    assert w.statuses(KEY, path="w2") == {"pending": 5}
    calls = len(w.rx.requests("w2"))

    too_old = users(1, 3)
    assert age_pending(w, too_old, timedelta(hours=25)) == 3  # default max_age: 24 h
    w.rx.set_status("w2", None)

    w.sync(KEY)

    rows = {r.user_id: r for r in w.deliveries(KEY, path="w2")}
    for user in too_old:
        row = rows[user]
        assert row.status == "failed", row
        assert row.last_error is not None and "not delivered within max_age" in row.last_error
        assert row.last_status_code == 503  # the last answer the URL gave is kept
        assert row.delivered_at is None
    for user in users(4, 5):  # younger than max_age: sent now
        assert rows[user].status == "sent", rows[user]
    sent_now = [r.user_id for r in w.rx.requests("w2")[calls:]]
    assert sorted(sent_now) == users(4, 5)
    assert set(w.rx.final_traits("w2")) == set(users(4, 5))
    assert w.statuses(KEY, path="w1") == {"sent": 5}


def test_max_age_setting_is_honoured(world: World) -> None:
    w = world
    w.configure(w.urls, max_age="2h")
    w.set_users(users(1, 2))
    w.create()
    w.rx.set_status("w2", 500)
    w.sync(KEY)
    age_pending(w, ["u001"], timedelta(hours=3))
    age_pending(w, ["u002"], timedelta(hours=1))
    w.rx.set_status("w2", None)

    w.sync(KEY)

    rows = {r.user_id: r for r in w.deliveries(KEY, path="w2")}
    assert rows["u001"].status == "failed"
    assert rows["u001"].last_error is not None and "2h" in rows["u001"].last_error
    assert rows["u002"].status == "sent"
    assert w.rx.final_traits("w2") == {"u002": {KEY: True}}


# the breaker -----------------------------------------------------------------------------------


def test_a_failing_url_is_left_alone_for_the_rest_of_the_run(world: World) -> None:
    w = world
    concurrency = 2
    # a long pass delay, so "later" is clearly in the future when checked
    w.configure(w.urls, max_concurrency=concurrency, backoff_max_seconds=30)
    members = users(1, 100)
    w.set_users(members)
    w.create()
    w.rx.set_status("w2", 500)

    before = datetime.now(UTC)
    result = w.sync(KEY)

    assert (result.status, result.sent) == ("partial", 100)
    assert w.rx.final_traits("w1") == {u: {KEY: True} for u in members}
    calls = len(w.rx.requests("w2"))
    threshold = max(BREAKER_MIN_FAILURES, concurrency)
    bound = (threshold + concurrency) * TRIES_PER_PASS
    assert calls <= bound, f"{calls} calls to a URL that is down (bound {bound}, not 100 x 3)"
    assert calls >= threshold * TRIES_PER_PASS
    with w.state.connect() as conn:
        rows = conn.execute(
            select(DELIVERIES.c.status, DELIVERIES.c.attempts, DELIVERIES.c.next_attempt_at).where(
                DELIVERIES.c.destination_id
                == select(DELIVERIES.c.destination_id)
                .where(DELIVERIES.c.status == "pending")
                .limit(1)
                .scalar_subquery()
            )
        ).all()
    assert len(rows) == 100
    now = datetime.now(UTC)
    assert all(row.status == "pending" for row in rows)
    assert all(row.next_attempt_at > now + timedelta(seconds=20) for row in rows), [
        row.next_attempt_at - before for row in rows
    ]
    assert sum(row.attempts for row in rows) == calls
    assert result.seconds < 10


# retry -----------------------------------------------------------------------------------------


def _fail_one_on_w2(w: World) -> str:
    """A first sync in which w2 answers 400 to one identify; returns that user."""
    w.rx.fail_next(1, 400, path="w2")
    result = w.sync(KEY)
    assert (result.status, result.failed) == ("partial", 1)
    [refused] = [r for r in w.rx.requests("w2") if not r.accepted]
    assert refused.user_id is not None
    return refused.user_id


def test_retry_sends_a_failed_delivery_again(world: World) -> None:
    w = world
    members = users(1, 5)
    w.set_users(members)
    w.create()
    victim = _fail_one_on_w2(w)
    [refused] = [r for r in w.rx.requests("w2") if not r.accepted]
    calls_w1 = len(w.rx.requests("w1"))

    requeued, results = outbox.retry(w.state, w.settings)

    assert requeued == 1
    [only] = results
    assert only.audience_key == KEY and only.totals is not None
    assert (only.totals.sent, only.totals.failed, only.totals.retry_later) == (1, 0, 0)
    [row] = [r for r in w.deliveries(KEY, path="w2") if r.user_id == victim]
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == (
        "sent",
        1,
        200,
        None,
    )
    assert values_sent(w, "w2", victim) == [True]
    # the same message: same messageId, same value
    [resent] = [r for r in w.rx.accepted("w2") if r.user_id == victim]
    assert resent.message_id == refused.message_id
    assert resent.json["traits"] == refused.json["traits"] == {KEY: True}
    assert len(w.rx.requests("w1")) == calls_w1  # nothing else was sent again
    assert w.statuses(KEY) == {"sent": 10}

    # nothing failed any more: a second retry sends nothing
    calls = len(w.rx.requests())
    assert outbox.retry(w.state, w.settings, KEY) == (0, [])
    assert len(w.rx.requests()) == calls


def test_retry_sends_the_message_as_it_was_with_its_timestamp(world: World) -> None:
    """A retried message is the same message: the timestamp says when the change happened
    (the run), not when an operator asked for a retry; created_at stays the queueing time."""
    w = world
    w.set_users(users(1, 3))
    w.create()
    victim = _fail_one_on_w2(w)
    [refused] = [r for r in w.rx.requests("w2") if not r.accepted]
    [queued] = [r for r in w.deliveries(KEY, path="w2") if r.user_id == victim]
    created = w.scalar("SELECT created_at FROM deliveries WHERE id = :i", i=queued.id)

    outbox.retry(w.state, w.settings)

    [resent] = [r for r in w.rx.accepted("w2") if r.user_id == victim]
    assert resent.json["timestamp"] == refused.json["timestamp"]
    assert resent.body == refused.body
    assert w.scalar("SELECT created_at FROM deliveries WHERE id = :i", i=queued.id) == created


def test_retry_never_sends_a_stale_value_after_a_newer_one(world: World) -> None:
    w = world
    w.set_users(users(1, 5))
    w.create()
    victim = _fail_one_on_w2(w)  # its true failed on w2

    w.set_users([u for u in users(1, 5) if u != victim])  # ... and it left since
    left = w.sync(KEY)
    assert (left.status, left.removed) == ("succeeded", 1)
    assert values_sent(w, "w2", victim) == [False]
    calls = len(w.rx.requests())

    requeued, _ = outbox.retry(w.state, w.settings)

    assert requeued == 0
    assert len(w.rx.requests()) == calls
    assert values_sent(w, "w2", victim) == [False]
    assert w.rx.final_traits("w2")[victim] == {KEY: False}
    assert [
        (r.trait_value, r.status) for r in w.deliveries(KEY, path="w2") if r.user_id == victim
    ] == [
        (True, "superseded"),
        (False, "sent"),
    ]


def test_retry_of_a_value_the_newer_one_failed_too_sends_only_the_newest(world: World) -> None:
    w = world
    w.set_users(users(1, 5))
    w.create()
    victim = _fail_one_on_w2(w)
    w.rx.set_user_status(victim, 400)  # its false fails too, on both URLs
    w.set_users([u for u in users(1, 5) if u != victim])
    w.sync(KEY)
    w.rx.set_user_status(victim, None)

    requeued, _ = outbox.retry(w.state, w.settings)

    assert requeued == 2  # the false, once per URL; the old true is superseded
    assert values_sent(w, "w2", victim) == [False]
    assert values_sent(w, "w1", victim) == [True, False]
    assert [
        (r.trait_value, r.status) for r in w.deliveries(KEY, path="w2") if r.user_id == victim
    ] == [
        (True, "superseded"),
        (False, "sent"),
    ]


def test_retry_after_a_url_was_removed_and_added_back_sends_nothing_stale(world: World) -> None:
    """The returning URL got a backfill of the current members; a failed true from before
    it was removed is older than that backfill and must not be sent after it."""
    w = world
    w.set_users(users(1, 5))
    w.create()
    victim = _fail_one_on_w2(w)  # its true failed on w2

    w.configure(w.urls[:1])  # w2 removed from settings
    w.set_users([u for u in users(1, 5) if u != victim])  # the victim leaves
    w.sync(KEY)
    w.configure(w.urls)  # w2 back: it is owed the current members
    back = w.sync(KEY)
    assert back.status == "succeeded"
    assert victim not in w.rx.final_traits("w2")

    outbox.retry(w.state, w.settings)

    assert w.rx.final_traits("w2").get(victim, {}).get(KEY) is not True, (
        f"{victim} left the audience, yet retry told w2 it is a member: "
        f"{values_sent(w, 'w2', victim)}"
    )


def test_retry_does_not_strand_deliveries_of_a_deleted_audience(world: World) -> None:
    w = world
    w.set_users(users(1, 5))
    w.create()
    _fail_one_on_w2(w)
    audiences.set_status(w.state, KEY, AUDIENCE_DELETED)

    outbox.retry(w.state, w.settings)

    # either left failed (visible) or sent, never owed forever to an audience nothing runs
    assert "pending" not in w.statuses(KEY), w.statuses(KEY)


def test_retry_skips_urls_no_longer_configured(world: World) -> None:
    w = world
    w.set_users(users(1, 5))
    w.create()
    _fail_one_on_w2(w)
    w.configure(w.urls[:1])
    calls = len(w.rx.requests())

    requeued, _ = outbox.retry(w.state, w.settings)

    assert requeued == 0
    assert len(w.rx.requests()) == calls
    assert w.statuses(KEY, path="w2") == {"sent": 4, "failed": 1}


def test_a_dropped_connection_is_recorded_as_such_not_as_a_timeout(lite_world: World) -> None:
    """The error text is what an operator reads in ``syncer deliveries``: it should name what
    went wrong (the receiver dropped the connection at once; no timeout was involved)."""
    w = lite_world
    w.configure(w.urls[:1], timeout_seconds=30)
    w.set_users(["u1"])
    w.create()
    w.rx.set_status("w1", "drop")

    w.sync(KEY)

    [row] = w.deliveries(KEY)
    assert row.status == "pending" and row.last_error is not None
    assert "timeout" not in row.last_error.lower(), row.last_error
    assert "connection" in row.last_error.lower(), row.last_error


# list_deliveries ------------------------------------------------------------------------------


def test_list_deliveries_filters_and_shows_hosts_only(world: World) -> None:
    w = world
    token_urls = [w.rx.url("hooks/tok-one-secret"), w.rx.url("hooks/tok-two-secret")]
    w.configure(token_urls)
    w.set_users(users(1, 4))
    w.create()
    w.create("Few Users", "SELECT user_id FROM users WHERE user_id <= 'u002'")
    w.rx.set_user_status("u003", 400)
    w.sync(KEY)
    w.sync("few_users")

    everything = outbox.list_deliveries(w.state)
    assert len(everything) == 2 * 4 + 2 * 2
    assert [r.id for r in everything] == sorted((r.id for r in everything), reverse=True)
    assert {r.destination_host for r in everything} == {f"127.0.0.1:{w.rx.port}"}
    shown = repr([r.as_json() for r in everything])
    assert "tok-" not in shown and "/hooks/" not in shown
    failed = outbox.list_deliveries(w.state, status="failed")
    assert {(r.audience_key, r.user_id, r.last_status_code) for r in failed} == {(KEY, "u003", 400)}
    assert len(failed) == 2
    few = outbox.list_deliveries(w.state, "few_users")
    assert {r.user_id for r in few} == {"u001", "u002"} and len(few) == 4
    assert outbox.list_deliveries(w.state, limit=3) == everything[:3]
    assert outbox.list_deliveries(w.state, "few_users", status="failed") == []


# rate limit ------------------------------------------------------------------------------------


def _most_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    most, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


def test_max_requests_per_second_caps_calls_to_a_url(world: World) -> None:
    w = world
    rate = 20
    w.configure(w.urls, max_requests_per_second=rate)
    members = users(1, 60)
    w.set_users(members)
    w.create()

    result = w.sync(KEY)

    assert (result.status, result.sent) == ("succeeded", 120)
    for path in ("w1", "w2"):
        times = [r.monotonic for r in w.rx.requests(path)]
        assert len(times) == 60
        span = max(times) - min(times)
        assert span >= 1.9, f"{path}: 60 calls at {rate}/s in {span:.2f}s"
        most = _most_in_one_second(times)
        assert most <= rate + 1, f"{path}: {most} calls within one second at {rate}/s"
        assert w.rx.final_traits(path) == {u: {KEY: True} for u in members}
    # the two URLs are limited each on its own, side by side, not one after the other
    assert result.seconds < 2 * 1.9 + 1
