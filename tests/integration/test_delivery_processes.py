"""``[tray] delivery_processes``: helper processes share a delivery pass.

Each process claims pages of owed rows (``delivery_pages``, ``FOR UPDATE SKIP LOCKED`` on
PostgreSQL) and records who sent each row in ``deliveries.claimed_by``; no message may be sent
twice and none left out.
"""

from __future__ import annotations

from collections import Counter

from syncer import delivery
from tests.integration.conftest import World

KEY = "pro_users"
USERS = [f"user-{i:05d}" for i in range(3000)]


def test_two_processes_share_a_pass_and_send_every_message_once(world: World) -> None:
    w = world
    w.set_users(USERS)
    w.configure(w.urls, delivery_processes=2, max_concurrency=8)
    w.create()

    result = w.sync(KEY)

    assert (result.status, result.sent, result.failed) == ("succeeded", 2 * len(USERS), 0)
    for path in ("w1", "w2"):
        requests = w.rx.requests(path)
        assert len(requests) == len(USERS), "a message was sent twice or not at all"
        assert sorted(r.user_id for r in requests) == USERS
        assert all(r.accepted and r.signature_ok for r in requests)
    # Both processes took part: the rows name two different pids.
    claimers = Counter(
        row.claimed_by.rsplit(":", 2)[1]
        for row in w.rows("SELECT claimed_by FROM deliveries WHERE status = 'sent'")
    )
    assert len(claimers) == 2, claimers
    assert min(claimers.values()) >= 500, claimers  # pages of 500: each took at least one
    # Nothing is left owed, and the pass's pages are gone.
    assert w.scalar("SELECT count(*) FROM deliveries WHERE status = 'pending'") == 0
    assert w.scalar("SELECT count(*) FROM delivery_pages") == 0


def test_a_shutdown_stops_the_helpers_and_what_they_held_is_sent_next_time(
    world: World,
) -> None:
    w = world
    w.set_users(USERS)
    w.configure(w.urls[:1], delivery_processes=2, max_concurrency=2)
    w.create()
    w.rx.set_status("w1", "slow")  # every call times out: the first pass gets nowhere fast
    w.configure(w.urls[:1], delivery_processes=2, max_concurrency=2, timeout_seconds=0.2)

    first = w.sync(KEY)

    assert first.sent == 0
    # The stopped pass left no page claimed: everything is owed to the next one.
    assert w.scalar("SELECT count(*) FROM delivery_pages") == 0
    assert w.scalar("SELECT count(*) FROM deliveries WHERE status = 'pending'") == len(USERS)
    w.rx.set_status("w1", None)
    w.rx.clear_records()
    second = w.sync(KEY)
    assert second.status == "succeeded"
    assert second.sent == len(USERS)
    accepted = [r.user_id for r in w.rx.accepted("w1")]
    assert sorted(set(accepted)) == USERS
    # At least once: a call the first pass gave up on can still reach the receiver after its
    # status was lifted, and count as accepted. No more than the first pass had in flight.
    assert len(accepted) - len(USERS) <= 2 * 2, Counter(accepted).most_common(5)


def test_what_is_owed_is_cut_into_pages_of_500_that_cover_every_row_once(world: World) -> None:
    """The pages a pass cuts hold every owed row of the URL exactly once, in id order."""
    w = world
    users = USERS[:1234]
    w.set_users(users)
    w.configure(w.urls[:1], backoff_base_seconds=0.01, backoff_max_seconds=0.02)
    view = w.create()
    w.rx.set_status("w1", "503")  # nothing gets through: every row stays owed
    assert w.sync(KEY).sent == 0
    [destination] = w.rows("SELECT id FROM destinations")

    total = delivery.cut_pages(w.state, view.id, [destination.id], None, delivery.PAGE_SIZE)

    owed = [r.id for r in w.rows("SELECT id FROM deliveries WHERE status = 'pending' ORDER BY id")]
    pages = w.rows("SELECT first_id, last_id, owed, claimed_by FROM delivery_pages ORDER BY id")
    assert total == len(owed) == len(users)
    assert [p.owed for p in pages] == [500, 500, 234]
    assert all(p.claimed_by is None for p in pages)
    covered = [i for p in pages for i in owed if p.first_id <= i <= p.last_id]
    assert covered == owed
    delivery.drop_pages(w.state, view.id, [destination.id])
    assert w.scalar("SELECT count(*) FROM delivery_pages") == 0
