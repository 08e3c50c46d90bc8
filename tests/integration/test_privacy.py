"""User deletion at the level of one run (issue 6): suppression in the SQL diff on both staging
paths (streamed from a warehouse, and ``INSERT … SELECT`` when the state database is the source),
what happens to an identify still owed to a deleted user, and the auditor's queries of
docs/privacy.md run verbatim.
"""

from __future__ import annotations

import hashlib

from syncer import audiences, diff, privacy, sync
from syncer.delivery import register_destinations
from syncer.sources import open_source
from tests.integration.conftest import World

KEY = "pro_users"
USERS = ["u1", "u2", "u3", "u4", "u5"]

# docs/privacy.md, "Was user X deleted, and did every URL take it?" (keep the two in step)
AUDIT_PER_URL = """
SELECT ud.id AS deletion_id, ud.requested_at, ud.restored_at, d.id AS destination_id, d.host,
       dl.status, dl.attempts, dl.delivered_at, dl.last_status_code, dl.last_error
FROM user_deletions ud
LEFT JOIN deliveries dl ON dl.deletion_id = ud.id AND dl.kind = 'delete'
LEFT JOIN destinations d ON d.id = dl.destination_id
WHERE ud.user_hash = :user_hash
ORDER BY ud.id, d.id
"""
AUDIT_SUMMARY = """
SELECT ud.id AS deletion_id, ud.requested_at,
       COUNT(dl.id) AS urls,
       SUM(CASE WHEN dl.status = 'sent' THEN 1 ELSE 0 END) AS taken,
       SUM(CASE WHEN dl.status = 'pending' THEN 1 ELSE 0 END) AS still_owed,
       SUM(CASE WHEN dl.status = 'failed' THEN 1 ELSE 0 END) AS failed,
       MAX(dl.delivered_at) AS last_taken_at
FROM user_deletions ud
LEFT JOIN deliveries dl ON dl.deletion_id = ud.id AND dl.kind = 'delete'
WHERE ud.user_hash = :user_hash
GROUP BY ud.id, ud.requested_at
ORDER BY ud.id
"""
PG_HASH = """
SELECT encode(sha256(convert_to(value || :user_id, 'UTF8')), 'hex') AS user_hash
FROM syncer_settings
WHERE name = 'user_hash_salt'
"""
PG_AUDIT = """
WITH target AS (
  SELECT encode(sha256(convert_to(value || :user_id, 'UTF8')), 'hex') AS user_hash
  FROM syncer_settings WHERE name = 'user_hash_salt'
)
SELECT ud.id AS deletion_id, ud.requested_at, ud.restored_at, d.id AS destination_id, d.host,
       dl.status, dl.delivered_at
FROM user_deletions ud
JOIN target t ON t.user_hash = ud.user_hash
LEFT JOIN deliveries dl ON dl.deletion_id = ud.id AND dl.kind = 'delete'
LEFT JOIN destinations d ON d.id = dl.destination_id
ORDER BY ud.id, d.id
"""
NOT_TAKEN = """
SELECT ud.id AS deletion_id, ud.requested_at, d.id AS destination_id, d.host,
       dl.status, dl.attempts, dl.last_error
FROM deliveries dl
JOIN user_deletions ud ON ud.id = dl.deletion_id
JOIN destinations d ON d.id = dl.destination_id
WHERE dl.kind = 'delete' AND dl.status <> 'sent'
ORDER BY ud.id, d.id
"""


def _delete(w: World, user_ids: list[str], *, forward: bool = True) -> None:
    """What ``syncer users delete`` does, in-process."""
    destinations = register_destinations(w.state, w.settings.tray.require_urls())
    privacy.delete_users(w.state, user_ids, [d.id for d in destinations])
    if forward:
        privacy.forward_deletes(w.state, w.settings)


def _auditor_hash(w: World, user_id: str) -> str:
    salt = w.scalar("SELECT value FROM syncer_settings WHERE name = 'user_hash_salt'")
    return hashlib.sha256((salt + user_id).encode("utf-8")).hexdigest()


def _sent_ids(w: World, path: str) -> list[str]:
    return [r.user_id or "" for r in w.rx.accepted(path) if r.message_type == "identify"]


def test_deleted_users_are_dropped_on_every_staging_path(any_source_world: World) -> None:
    """Suppression works whether ids are streamed from a warehouse or staged by
    ``INSERT … SELECT`` in the state database itself."""
    w = any_source_world
    w.set_users(USERS)
    w.create()
    assert w.sync(KEY).members == 5
    _delete(w, ["u1", "u9"])  # u9 was never seen: suppressed before it ever shows up
    assert w.current_members(KEY) == {"u2", "u3", "u4", "u5"}
    w.rx.clear_records()

    w.set_users([*USERS, "u6", "u9", "u9", None])
    result = w.sync(KEY)
    assert (result.status, result.added, result.removed) == ("succeeded", 1, 0)
    assert result.members == 5  # u2..u6: the deleted users do not count
    assert result.skipped == 3  # the NULL id, and u1 and u9 suppressed
    assert w.current_members(KEY) == {"u2", "u3", "u4", "u5", "u6"}
    for path in ("w1", "w2"):
        assert _sent_ids(w, path) == ["u6"]
    [(members, added, skipped)] = w.rows(
        "SELECT members, added, skipped_ids FROM sync_runs WHERE id = :r", r=result.run_id
    )
    assert (members, added, skipped) == (5, 1, 3)

    # a second run: still nothing for them
    again = w.sync(KEY)
    assert (again.added, again.removed, again.members) == (0, 0, 5)

    # restore lifts it for one user only
    assert privacy.restore_user(w.state, "u1") == 1
    assert privacy.restore_user(w.state, "u1") == 0
    w.rx.clear_records()
    restored = w.sync(KEY)
    assert (restored.added, restored.members) == (1, 6)
    for path in ("w1", "w2"):
        assert _sent_ids(w, path) == ["u1"]
    assert "u9" not in w.current_members(KEY)


def test_many_deleted_users_in_one_run(any_source_world: World) -> None:
    """More suppressed ids than one batch of the diff's delete, on an initial sync."""
    w = any_source_world
    doomed = [f"d{i:05d}" for i in range(1_200)]
    kept = [f"k{i:05d}" for i in range(300)]
    _delete(w, doomed, forward=False)  # the deletes stay owed; suppression holds at once
    w.set_users(doomed + kept)
    w.create()
    result = w.sync(KEY)
    assert (result.kind, result.added, result.members, result.skipped) == (
        "initial",
        300,
        300,
        1_200,
    )
    assert w.current_members(KEY) == set(kept)
    assert sorted(_sent_ids(w, "w1")) == kept
    assert w.scalar("SELECT COUNT(*) FROM user_deletions WHERE restored_at IS NULL") == 1_200


def test_an_identify_owed_to_a_deleted_user_is_never_sent(world: World) -> None:
    """A delete is never followed by an identify: what a user was still owed is cancelled."""
    w = world
    w.set_users(USERS)
    w.create()
    w.rx.set_status("w2", 503)
    assert w.sync(KEY).status == "partial"
    assert w.statuses(KEY, path="w2") == {"pending": 5}
    w.rx.set_status("w2", None)
    w.rx.clear_records()
    _delete(w, ["u1"])  # while w2 is still owed u1's {key: true}

    hashed = f"sha256:{_auditor_hash(w, 'u1')}"
    rows = [r for r in w.deliveries(KEY) if r.user_id == hashed]
    assert sorted((r.url, r.status) for r in rows) == [
        (w.rx.url("w1"), "sent"),
        (w.rx.url("w2"), "cancelled"),
    ]
    assert [r.last_error for r in rows if r.status == "cancelled"] == ["the user was deleted"]
    assert w.rx.deletes("w1") == ["u1"] and w.rx.deletes("w2") == ["u1"]
    assert w.sync(KEY).status == "succeeded"  # delivers the 4 still owed to w2
    assert sorted(_sent_ids(w, "w2")) == ["u2", "u3", "u4", "u5"]
    assert w.rx.accepted("w2")[0].message_type == "delete"
    assert w.scalar("SELECT COUNT(*) FROM deliveries WHERE user_id = 'u1'") == 0


def test_a_url_added_back_is_never_sent_a_hashed_id(world: World) -> None:
    """A workflow URL removed from settings and added back gets the audience anew (a backfill,
    with ``false`` for users it was last told were members). A deleted user's rows hold
    ``sha256:<hash>``: that must never go out as a userId, and the user gets nothing."""
    w = world
    w.set_users(USERS)
    w.create()
    w.sync(KEY)
    _delete(w, ["u1"])
    w.configure([w.rx.url("w1")])
    w.sync(KEY)
    w.configure(w.urls)
    w.rx.clear_records()

    result = w.sync(KEY)
    sent = [r.user_id or "" for r in w.rx.requests()]
    assert not [user for user in sent if user.startswith("sha256:")], sent
    assert "u1" not in sent
    assert sorted(_sent_ids(w, "w2")) == ["u2", "u3", "u4", "u5"]
    assert result.status == "succeeded"


def test_the_auditor_queries_of_the_docs(world: World) -> None:
    """docs/privacy.md's queries answer "was user X deleted and did every URL take it?"."""
    w = world
    w.set_users(USERS)
    w.create()
    w.sync(KEY)
    w.rx.set_status("w2", 503)
    _delete(w, ["u1"])
    w.rx.set_status("w2", None)
    _delete(w, ["u2"])  # also delivers u1's delete still owed to w2
    w.rx.set_user_status("u3", 400)
    _delete(w, ["u3"])

    u1 = _auditor_hash(w, "u1")
    assert u1 == w.scalar("SELECT user_hash FROM user_deletions WHERE id = 1")
    per_url = w.rows(AUDIT_PER_URL, user_hash=u1)
    # The database names a URL by its host and keyed hash; the sender's rows tell which is which.
    url_of = {t.id: t.url for t in register_destinations(w.state, w.urls)}
    assert {r.host for r in per_url} == {f"127.0.0.1:{w.rx.port}"}
    assert [(url_of[r.destination_id], r.status) for r in per_url] == [
        (w.rx.url("w1"), "sent"),
        (w.rx.url("w2"), "sent"),
    ]
    assert all(r.delivered_at is not None and r.restored_at is None for r in per_url)
    assert [r.attempts for r in per_url] == [1, 4]  # three tries while w2 was down, then one
    [summary] = w.rows(AUDIT_SUMMARY, user_hash=u1)
    assert (summary.urls, summary.taken, summary.still_owed, summary.failed) == (2, 2, 0, 0)

    [refused] = w.rows(AUDIT_SUMMARY, user_hash=_auditor_hash(w, "u3"))
    assert (refused.urls, refused.taken, refused.failed) == (2, 0, 2)
    assert {
        r.last_status_code for r in w.rows(AUDIT_PER_URL, user_hash=_auditor_hash(w, "u3"))
    } == {400}
    assert w.rows(AUDIT_SUMMARY, user_hash=_auditor_hash(w, "u4")) == []  # never deleted

    assert [(r.deletion_id, url_of[r.destination_id], r.status) for r in w.rows(NOT_TAKEN)] == [
        (3, w.rx.url("w1"), "failed"),
        (3, w.rx.url("w2"), "failed"),
    ]
    if w.state.dialect.name == "postgresql":  # SQLite has no SHA-256: Python computes it
        assert w.scalar(PG_HASH, user_id="u1") == u1
        assert [(r.destination_id, r.status) for r in w.rows(PG_AUDIT, user_id="u1")] == [
            (r.destination_id, r.status) for r in per_url
        ]


def test_a_user_deleted_while_a_run_is_in_progress_does_not_stay_a_member(world: World) -> None:
    """The deletion commits between a run's diff and its commit (the run evaluated the source
    before the user was deleted). Once that run and the next one are over, the user must not
    be stored as a member: suppression means later runs never keep them in an audience."""
    w = world
    w.set_users(USERS)
    w.create()
    w.sync(KEY)
    w.set_users([*USERS, "u6"])
    view = audiences.get(w.state, KEY)
    targets = register_destinations(w.state, w.settings.tray.require_urls())
    run_id, _kind = sync.start_run(w.state, view.id)
    source = open_source(w.settings, view.source)
    try:
        with w.state.connect() as conn:
            staged = diff.stage(conn, source, view.sql)
            changes = diff.compute(conn, view.id)
            assert changes.added == 1  # u6 enters
            _delete(w, ["u6"])  # meanwhile, from `syncer users delete`
            diff.commit_snapshot(
                conn,
                audience_id=view.id,
                run_id=run_id,
                destination_ids=[t.id for t in targets],
                staged=staged,
                diff=changes,
            )
            diff.reset_temp_tables(conn)
    finally:
        source.engine.dispose()
    sync.finish_run(w.state, run_id, "succeeded")

    w.sync(KEY)
    assert "u6" not in w.current_members(KEY)
    assert w.scalar("SELECT COUNT(*) FROM memberships WHERE user_id = 'u6'") == 0
