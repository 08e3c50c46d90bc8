"""Delivery to the workflow URLs: failures, retries, what each URL is owed, last value wins.

The receiver injects the faults; assertions are on what it accepted (what Tray would know),
the ``deliveries`` rows, the run results and ``history``.
"""

from __future__ import annotations

from syncer import history
from syncer.delivery import TRIES_PER_PASS, register_destinations
from tests.integration.conftest import World

KEY = "pro_users"


def users(first: int, last: int) -> list[str]:
    return [f"u{i:03d}" for i in range(first, last + 1)]


def truth(members: set[str], ever: set[str]) -> dict[str, dict[str, bool]]:
    """What a URL should know: true for members, false for everyone who has left."""
    return {u: {KEY: u in members} for u in ever}


def values_sent(w: World, path: str, user_id: str) -> list[bool]:
    """The trait values of the accepted identify calls for one user on one URL, in order."""
    return [r.json["traits"][KEY] for r in w.rx.accepted(path) if r.user_id == user_id]


def test_url_answering_500_leaves_its_deliveries_owed_until_it_recovers(world: World) -> None:
    w = world
    members = users(1, 20)
    w.set_users(members)
    w.create()
    w.rx.set_status("w2", 500)

    first = w.sync(KEY)

    assert (first.kind, first.status) == ("initial", "partial")
    assert (first.sent, first.failed) == (20, 20)
    assert w.rx.final_traits("w1") == truth(set(members), set(members))
    assert w.rx.final_traits("w2") == {}
    owed = w.deliveries(KEY, path="w2")
    assert len(owed) == 20
    tries = TRIES_PER_PASS  # a run tries each message this often, then leaves it owed
    for row in owed:
        assert (row.status, row.attempts, row.last_status_code) == ("pending", tries, 500)
        assert row.last_error is not None and "500" in row.last_error
        assert row.delivered_at is None
    assert len(w.rx.requests("w2")) == 20 * tries
    assert w.statuses(KEY, path="w1") == {"sent": 20}
    [record] = history.runs(w.state, KEY)
    assert (record.status, record.sent, record.failed, record.pending) == ("partial", 20, 20, 20)
    [run] = w.rows("SELECT status, error FROM sync_runs WHERE id = :r", r=first.run_id)
    assert run.status == "partial"
    assert "20 deliveries not made" in run.error and "still owed" in run.error

    w.rx.set_status("w2", None)
    second = w.sync(KEY)

    assert (second.kind, second.status, second.added, second.removed) == (
        "incremental",
        "succeeded",
        0,
        0,
    )
    assert (second.sent, second.failed) == (20, 0)
    assert w.rx.final_traits("w2") == truth(set(members), set(members))
    # the owed messages went out unchanged: same messageId, same timestamp, same bytes
    refused = {r.body for r in w.rx.requests("w2") if not r.accepted}
    assert all(r.body in refused for r in w.rx.accepted("w2"))
    assert len(w.rx.requests("w1")) == 20  # w1 was not sent anything again
    assert w.statuses(KEY) == {"sent": 40}
    assert all(r.attempts == tries + 1 for r in w.deliveries(KEY, path="w2"))
    newer, older = history.runs(w.state, KEY)
    assert (older.run_id, older.sent, older.failed, older.pending) == (first.run_id, 40, 0, 0)
    assert (newer.sent, newer.failed) == (0, 0)  # run 2 queued nothing of its own


def test_every_url_down_fails_the_run_but_keeps_the_snapshot(world: World) -> None:
    w = world
    w.set_users(users(1, 5))
    w.create()
    w.rx.set_status("w1", 503)
    w.rx.set_status("w2", 503)

    first = w.sync(KEY)

    assert (first.status, first.sent, first.failed) == ("failed", 0, 10)
    error = w.scalar("SELECT error FROM sync_runs WHERE id = :r", r=first.run_id)
    assert "10 deliveries not made" in error
    assert w.current_members(KEY) == set(users(1, 5))
    assert w.statuses(KEY) == {"pending": 10}

    w.rx.set_status("w1", None)
    w.rx.set_status("w2", None)
    second = w.sync(KEY)

    assert (second.status, second.sent, second.failed) == ("succeeded", 10, 0)
    for path in ("w1", "w2"):
        assert w.rx.final_traits(path) == truth(set(users(1, 5)), set(users(1, 5)))


def test_a_run_that_could_not_deliver_says_why(world: World) -> None:
    """The RunResult (what `syncer sync` prints) carries the same reason as sync_runs.error."""
    w = world
    w.set_users(users(1, 3))
    w.create()
    w.rx.set_status("w2", 500)

    result = w.sync(KEY)

    assert result.status == "partial"
    stored = w.scalar("SELECT error FROM sync_runs WHERE id = :r", r=result.run_id)
    assert stored is not None
    assert result.error == stored


def test_400_for_one_user_fails_that_delivery_only(world: World) -> None:
    w = world
    members = users(1, 10)
    w.set_users(members)
    w.create()
    w.rx.fail_next(1, 400, path="w2")

    result = w.sync(KEY)

    assert (result.status, result.sent, result.failed) == ("partial", 19, 1)
    [refused] = [r for r in w.rx.requests("w2") if not r.accepted]
    assert refused.status == 400
    victim = refused.user_id
    assert victim is not None
    for row in w.deliveries(KEY):
        if (row.user_id, row.url) == (victim, w.rx.url("w2")):
            assert (row.status, row.attempts, row.last_status_code) == ("failed", 1, 400)
            assert row.last_error is not None and "400" in row.last_error
        else:
            assert (row.status, row.attempts) == ("sent", 1)
    assert w.rx.final_traits("w1") == truth(set(members), set(members))
    assert set(w.rx.final_traits("w2")) == set(members) - {victim}
    assert len(w.rx.requests("w2")) == 10  # a 400 is not retried
    [record] = history.runs(w.state, KEY)
    assert (record.sent, record.failed, record.pending) == (19, 1, 0)

    # failed for good: a later run does not send it again
    calls = len(w.rx.requests())
    again = w.sync(KEY)
    assert again.status == "succeeded"
    assert len(w.rx.requests()) == calls


def test_redirects_are_not_followed_and_fail_at_once(world: World) -> None:
    w = world
    w.set_users(["u1"])
    w.create()
    w.rx.set_status("w2", 302)

    result = w.sync(KEY)

    assert (result.status, result.sent, result.failed) == ("partial", 1, 1)
    [row] = w.deliveries(KEY, path="w2")
    assert (row.status, row.attempts, row.last_status_code) == ("failed", 1, 302)
    assert len(w.rx.requests("w2")) == 1


def test_503_429_and_dropped_connections_are_retried_within_the_run(world: World) -> None:
    w = world
    members = users(1, 10)
    w.set_users(members)
    w.create()
    w.rx.fail_next(2, "503", path="w1")
    w.rx.fail_next(2, "429", path="w1")
    w.rx.fail_next(1, "drop", path="w2")

    result = w.sync(KEY)

    assert (result.status, result.sent, result.failed) == ("succeeded", 20, 0)
    for path, faults in (("w1", 4), ("w2", 1)):
        requests = w.rx.requests(path)
        assert len(requests) == 10 + faults
        assert w.rx.final_traits(path) == truth(set(members), set(members))
        accepted = {r.message_id: r.body for r in requests if r.accepted}
        for failed in (r for r in requests if not r.accepted):
            # the retry is the same message: same messageId, same bytes
            assert accepted[failed.message_id] == failed.body
        rows = w.deliveries(KEY, path=path)
        assert {r.status for r in rows} == {"sent"}
        assert sum(r.attempts for r in rows) == len(requests)
        assert all(r.last_status_code == 200 for r in rows)


def test_retry_after_is_honoured(world: World) -> None:
    w = world
    w.set_users(["u1"])
    w.configure(w.urls[:1], backoff_max_seconds=2)
    w.create()
    w.rx.retry_after = "0.6"
    w.rx.fail_next(1, "429", path="w1")

    result = w.sync(KEY)

    assert result.status == "succeeded"
    first, retry = w.rx.requests("w1")
    assert first.status == 429 and retry.accepted
    assert retry.monotonic - first.monotonic >= 0.55


def test_random_faults_converge_to_the_source_truth(world: World) -> None:
    w = world
    w.rx.set_faults(fail_ratio=0.3, fault_modes=["503", "429", "drop"], seed=20261122)
    snapshots = [
        set(users(0, 59)),
        set(users(10, 69)),  # 10 leave, 10 enter
        set(users(5, 40)) | set(users(65, 79)),  # some come back, many leave, more enter
    ]
    w.set_users(sorted(snapshots[0]))
    w.create()
    ever: set[str] = set()
    for members in snapshots:
        w.set_users(sorted(members))
        ever |= members
        result = w.sync(KEY)
        assert result.status in ("succeeded", "partial")
        catch_up = 0
        while w.statuses(KEY).get("pending"):
            catch_up += 1
            assert catch_up <= 3, "deliveries still owed after three catch-up runs"
            w.sync(KEY)
        for path in ("w1", "w2"):
            assert w.rx.final_traits(path) == truth(members, ever), path
    assert any(not r.accepted for r in w.rx.requests())  # faults did happen
    assert all(r.signature_ok for r in w.rx.requests())
    assert "failed" not in w.statuses(KEY)


def test_last_value_wins_when_a_user_leaves_while_a_url_is_down(world: World) -> None:
    w = world
    w.set_users(users(1, 5))
    w.create()
    w.rx.set_status("w2", 500)

    first = w.sync(KEY)  # u001 enters: a true for w2, owed
    assert first.status == "partial"

    w.set_users(users(2, 5))  # u001 leaves before w2 took the true
    second = w.sync(KEY)
    assert (second.added, second.removed) == (0, 1)
    u1_on_w2 = [r for r in w.deliveries(KEY, path="w2") if r.user_id == "u001"]
    assert [(r.run_id, r.trait_value, r.status) for r in u1_on_w2] == [
        (first.run_id, True, "superseded"),
        (second.run_id, False, "pending"),
    ]
    assert values_sent(w, "w1", "u001") == [True, False]

    w.rx.set_status("w2", None)
    third = w.sync(KEY)

    assert third.status == "succeeded"
    assert values_sent(w, "w2", "u001") == [False]
    assert w.rx.final_traits("w2") == truth(set(users(2, 5)), set(users(1, 5)))
    assert [r.status for r in w.deliveries(KEY, path="w2") if r.user_id == "u001"] == [
        "superseded",
        "sent",
    ]
    # nothing superseded is ever counted as owed
    older = history.runs(w.state, KEY)[-1]
    assert (older.run_id, older.pending) == (first.run_id, 0)


def test_a_user_who_leaves_and_returns_while_a_url_is_down_gets_only_true(world: World) -> None:
    w = world
    w.set_users(["u1", "u2"])
    w.create()
    w.sync(KEY)
    w.rx.set_status("w2", 500)

    w.set_users(["u2"])
    w.sync(KEY)  # false for u1, owed to w2
    w.set_users(["u1", "u2"])
    w.sync(KEY)  # true for u1 again: the false is superseded

    w.rx.set_status("w2", None)
    w.sync(KEY)

    assert values_sent(w, "w2", "u1") == [True, True]  # initial sync, then the latest value
    assert w.rx.final_traits("w2") == truth({"u1", "u2"}, {"u1", "u2"})
    assert [r.status for r in w.deliveries(KEY, path="w2") if r.user_id == "u1"] == [
        "sent",
        "superseded",
        "sent",
    ]


def test_a_url_added_later_gets_a_backfill_of_current_members(world: World) -> None:
    w = world
    w.configure(w.urls[:1])
    w.set_users(users(1, 10))
    audience = w.create()
    first = w.sync(KEY)
    assert first.sent == 10

    w.configure(w.urls)
    now = users(2, 11)  # u001 leaves, u011 enters
    w.set_users(now)
    second = w.sync(KEY)

    assert (second.kind, second.status, second.added, second.removed) == (
        "incremental",
        "succeeded",
        1,
        1,
    )
    assert second.sent == 2 + 10
    assert [(r.user_id, r.json["traits"][KEY]) for r in w.rx.requests("w1")][10:] in (
        [("u001", False), ("u011", True)],
        [("u011", True), ("u001", False)],
    )
    backfill = w.rx.requests("w2")
    assert sorted(r.user_id for r in backfill) == now
    assert all(r.json["traits"] == {KEY: True} for r in backfill)
    assert w.rx.final_traits("w2") == truth(set(now), set(now))
    assert w.rx.final_traits("w1") == truth(set(now), set(users(1, 11)))
    since = w.rows(
        "SELECT destination_id, since_run_id FROM audience_destinations WHERE audience_id = :a",
        a=audience.id,
    )
    url_of = {t.id: t.url for t in register_destinations(w.state, w.urls)}
    assert sorted((url_of[d], run) for d, run in since) == [
        (w.urls[0], first.run_id),
        (w.urls[1], second.run_id),
    ]
    newer = history.runs(w.state, KEY)[0]
    assert (newer.sent, newer.failed) == (12, 0)

    calls = len(w.rx.requests())
    assert w.sync(KEY).sent == 0
    assert len(w.rx.requests()) == calls


def test_a_url_removed_and_added_back_is_brought_up_to_date(world: World) -> None:
    """A URL dropped from settings for a while is owed what changed meanwhile when it returns."""
    w = world
    w.set_users(users(1, 5))
    w.create()
    w.sync(KEY)

    w.configure(w.urls[:1])  # w2 taken out of settings
    w.set_users(users(2, 6))  # u001 leaves, u006 enters
    w.sync(KEY)

    w.configure(w.urls)  # w2 back
    w.sync(KEY)

    assert w.rx.final_traits("w1") == truth(set(users(2, 6)), set(users(1, 6)))
    assert w.rx.final_traits("w2") == truth(set(users(2, 6)), set(users(1, 6)))


def test_unicode_and_case_distinct_ids_arrive_intact_and_signed(world: World) -> None:
    w = world
    ids = ["üser-ß", "用户-1", "u1", "U1", "emoji-😀"]
    w.set_users(ids)
    w.create()

    result = w.sync(KEY)

    assert (result.status, result.members) == ("succeeded", 5)
    assert w.current_members(KEY) == set(ids)
    for path in ("w1", "w2"):
        assert w.rx.final_traits(path) == truth(set(ids), set(ids))
        assert all(r.signature_ok for r in w.rx.requests(path))
    assert w.sync(KEY).sent == 0  # read back from the state DB, the ids still match


def test_no_signature_header_without_a_shared_secret(world: World) -> None:
    w = world
    w.configure(w.urls[:1], secret=None)
    w.set_users(["u1"])
    w.create()

    assert w.sync(KEY).status == "succeeded"
    [request] = w.rx.requests("w1")
    assert "X-Signature" not in request.headers
    assert request.signature_ok is False
