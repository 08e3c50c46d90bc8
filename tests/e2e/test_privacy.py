"""User deletion and audience retirement end to end (issue 6): the real ``syncer`` command in a
subprocess, a loopback receiver standing in for two Tray workflow URLs, on SQLite and PostgreSQL.

- ``users delete``: one signed ``delete`` per user per URL, the same stable ``messageId`` on every
  URL and every retry; the raw id purged from every table of the state database (checked over a
  dump of all of them), a salted hash kept for auditors; suppression across later runs; restore.
- Bad input: an empty id, a missing file, a file without ids -> exit 2, nothing sent or written.
- A URL down: the delete stays owed and is delivered later; then the raw id is gone.
- ``audience delete`` with and without ``--unset``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import tomllib
import uuid
from collections.abc import Callable, Sequence

from sqlalchemy import create_engine, text

from syncer.settings import workflow_url_hash
from tests.e2e.conftest import Dump, Project, assert_usage_error
from tests.helpers import start_cli
from tests.receiver import Receiver, RecordedRequest

KEY_A, NAME_A, SQL_A = "pro_users", "Pro Users", "SELECT user_id FROM users"
KEY_B, NAME_B, SQL_B = (
    "early_users",
    "Early Users",
    "SELECT user_id FROM users WHERE user_id < 'u3'",
)
USERS = ["u1", "u2", "u3", "u4", "u5"]
PATHS = ("w1", "w2")
DELETE_FIELDS = {"type", "userId", "timestamp", "messageId"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")

ProjectFactory = Callable[..., Project]


# helpers ----------------------------------------------------------------------------------------


def _project(
    factory: ProjectFactory, state_url: str, rx: Receiver, users: Sequence[str]
) -> Project:
    p = factory(
        state_url,
        list(users),
        workflow_urls=[rx.url(path) for path in PATHS],
        shared_secret="${TRAY_SHARED_SECRET}",
    )
    p.cli("db", "upgrade")
    return p


def _synced_project(
    factory: ProjectFactory, state_url: str, rx: Receiver, users: Sequence[str]
) -> Project:
    """A project with audiences A and B, both synced once."""
    p = _project(factory, state_url, rx, users)
    p.cli_many(
        ("audience", "create", NAME_A, "--sql", SQL_A),
        ("audience", "create", NAME_B, "--sql", SQL_B),
    )
    p.cli("sync")
    return p


def _deletes(rx: Receiver, path: str) -> list[RecordedRequest]:
    """Every delete request that reached ``path`` (accepted or not), in arrival order."""
    return [r for r in rx.requests(path) if r.message_type == "delete"]


def _identifies(rx: Receiver, path: str) -> list[RecordedRequest]:
    return [r for r in rx.accepted(path) if r.message_type == "identify"]


def _sent_traits(rx: Receiver, path: str, user_id: str) -> list[dict[str, bool]]:
    return [r.json["traits"] for r in _identifies(rx, path) if r.user_id == user_id]


def _id_pattern(user_id: str) -> re.Pattern[str]:
    """The raw id as a value of its own or a word in a text (``u1`` but not ``u10``)."""
    return re.compile(rf"(?<![\w@.:-]){re.escape(user_id)}(?![\w@.-])")


def _rows_holding(dump: Dump, user_id: str) -> dict[str, list[str]]:
    """table -> the rows of a dump of every table in which ``user_id`` appears."""
    pattern = _id_pattern(user_id)
    found = {table: [row for row in rows if pattern.search(row)] for table, rows in dump.items()}
    return {table: rows for table, rows in found.items() if rows}


def _query(p: Project, sql: str, **params: object) -> list[tuple[object, ...]]:
    engine = create_engine(p.state_url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql), params).all()]
    finally:
        engine.dispose()


def _salt(p: Project) -> str:
    [(salt,)] = _query(p, "SELECT value FROM syncer_settings WHERE name = 'user_hash_salt'")
    assert isinstance(salt, str) and salt
    return salt


def _hash(p: Project, user_id: str) -> str:
    """What an auditor computes: sha256(salt || user_id), lowercase hex."""
    return hashlib.sha256((_salt(p) + user_id).encode()).hexdigest()


def _delete_rows(p: Project) -> list[tuple[object, ...]]:
    """(url, deletion_id, user_id, status) of every delete delivery, by id. The state database
    keeps a keyed hash of each URL, not the URL: the settings' URL with that hash is shown."""
    [(key,)] = _query(p, "SELECT value FROM syncer_settings WHERE name = 'destination_hash_key'")
    urls = tomllib.loads(p.settings.read_text(encoding="utf-8"))["tray"]["workflow_urls"]
    url_of = {workflow_url_hash(str(key), url): url for url in urls}
    rows = _query(
        p,
        "SELECT d.url_hash, dl.deletion_id, dl.user_id, dl.status FROM deliveries dl "
        "JOIN destinations d ON d.id = dl.destination_id "
        "WHERE dl.kind = 'delete' ORDER BY dl.id",
    )
    return [(url_of.get(str(url_hash), "?"), *rest) for url_hash, *rest in rows]


def _history(p: Project, key: str) -> list[dict[str, object]]:
    runs = json.loads(p.cli("history", key, "--json").stdout)
    assert isinstance(runs, list)
    return runs


def _assert_wire_format(requests: Sequence[RecordedRequest]) -> None:
    for r in requests:
        assert set(r.json) == DELETE_FIELDS, r.json
        assert r.json["type"] == "delete"
        assert TIMESTAMP.match(r.json["timestamp"]), r.json
        uuid.UUID(r.json["messageId"])
        assert r.signature_ok is True, r.headers
        assert r.headers["Content-Type"] == "application/json"


# users delete -----------------------------------------------------------------------------------


def test_users_delete_forwards_purges_and_suppresses(
    project_factory: ProjectFactory, state_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = _synced_project(project_factory, state_url, rx, USERS)
    for path in PATHS:
        assert sorted(map(json.dumps, _sent_traits(rx, path, "u1"))) == sorted(
            [json.dumps({KEY_A: True}), json.dumps({KEY_B: True})]
        )
    assert _rows_holding(p.dump(), "u1"), "the check below must be able to see a raw id"
    rx.clear_records()

    deleted = p.cli("users", "delete", "u1", "u2")
    assert deleted.stderr == ""
    assert "2 users deleted" in deleted.stdout and "4 delete messages queued" in deleted.stdout
    assert "sent 4, failed 0, still owed 0" in deleted.stdout

    # exactly one signed delete per user per URL, nothing else
    by_path = {path: _deletes(rx, path) for path in PATHS}
    for path, requests in by_path.items():
        assert sorted(r.user_id or "" for r in requests) == ["u1", "u2"], path
        assert all(r.accepted for r in requests)
        _assert_wire_format(requests)
    assert len(rx.requests()) == 4, [r.json for r in rx.requests()]
    ids = {(path, r.user_id): r.message_id for path, rs in by_path.items() for r in rs}
    assert ids["w1", "u1"] == ids["w2", "u1"] and ids["w1", "u2"] == ids["w2", "u2"]
    assert ids["w1", "u1"] != ids["w1", "u2"]
    stamps = {(path, r.user_id): r.json["timestamp"] for path, rs in by_path.items() for r in rs}
    assert stamps["w1", "u1"] == stamps["w2", "u1"]

    # purge: the raw ids are nowhere in the state database; a hash per request stays
    dump = p.dump()
    for user_id in ("u1", "u2"):
        assert _rows_holding(dump, user_id) == {}, user_id
    assert _rows_holding(dump, "u3"), "u3 was not deleted and still is a member"
    hashes = {user_id: _hash(p, user_id) for user_id in ("u1", "u2")}
    deletions = _query(p, "SELECT id, user_hash, requested_at, restored_at FROM user_deletions")
    assert len(deletions) == 2
    assert all(HEX64.match(str(h)) for _id, h, _at, _restored in deletions)
    assert {h for _id, h, _at, _restored in deletions} == set(hashes.values())
    assert all(at is not None and restored is None for _id, _h, at, restored in deletions)
    deletion_of = {h: i for i, h, _at, _restored in deletions}
    rows = _delete_rows(p)
    assert sorted((url, user, status) for url, _d, user, status in rows) == sorted(
        (rx.url(path), f"sha256:{hashes[user_id]}", "sent")
        for path in PATHS
        for user_id in ("u1", "u2")
    )
    assert all(d == deletion_of[str(user).removeprefix("sha256:")] for _u, d, user, _s in rows)
    # identify rows of the deleted users keep the hash: history still counts them
    [(hashed_identifies,)] = _query(
        p,
        "SELECT COUNT(*) FROM deliveries WHERE kind = 'identify' AND user_id = :h",
        h=f"sha256:{hashes['u1']}",
    )
    assert hashed_identifies == 4  # two audiences x two URLs

    # suppression: the source still returns u1 and u2; later runs never sync them again
    p.set_users([*USERS, "u6"])
    rx.clear_records()
    p.cli("sync")
    p.cli("sync")
    for path in PATHS:
        assert _deletes(rx, path) == []
        assert {r.user_id for r in _identifies(rx, path)} == {"u6"}
    [latest, previous, *_] = _history(p, KEY_A)
    assert (latest["members"], latest["added"], latest["removed"]) == (4, 0, 0)
    assert (previous["members"], previous["added"], previous["removed"]) == (4, 1, 0)
    assert _history(p, KEY_B)[0]["members"] == 0
    dump = p.dump()
    for user_id in ("u1", "u2"):
        assert _rows_holding(dump, user_id) == {}, user_id

    # restore: u1 is synced in again at the next run, u2 stays suppressed
    restored = p.cli("users", "restore", "u1")
    assert restored.stdout.startswith("restored"), restored.stdout
    again = p.cli("users", "restore", "u1")
    assert again.stdout.startswith("not suppressed"), again.stdout
    rx.clear_records()
    p.cli("sync")
    for path in PATHS:
        assert sorted((r.user_id, json.dumps(r.json["traits"])) for r in _identifies(rx, path)) == [
            ("u1", json.dumps({KEY_B: True})),
            ("u1", json.dumps({KEY_A: True})),
        ]
        assert _deletes(rx, path) == []
    assert _history(p, KEY_A)[0]["members"] == 5
    [(restored_at,)] = _query(
        p, "SELECT restored_at FROM user_deletions WHERE user_hash = :h", h=hashes["u1"]
    )
    assert restored_at is not None
    assert _rows_holding(p.dump(), "u2") == {}


def test_users_delete_thousands_from_a_file(
    project_factory: ProjectFactory, state_url: str, secret_receiver: Receiver
) -> None:
    """2000 ids at once, most of them unknown (deletion is idempotent, not an error)."""
    rx = secret_receiver
    members = [f"m{i:04d}" for i in range(300)]
    p = _project(project_factory, state_url, rx, members)
    p.cli("audience", "create", NAME_A, "--sql", SQL_A)
    p.cli("sync")
    rx.clear_records()
    wanted = members[:200] + [f"nobody-{i:04d}" for i in range(1800)]
    ids_file = p.root / "ids.txt"
    # blank lines and surrounding spaces are tolerated; a repeated id is one request
    ids_file.write_text("\n".join(wanted) + "\n\n  m0000  \n", encoding="utf-8")

    started = time.monotonic()
    result = p.cli("users", "delete", "--file", str(ids_file), timeout=300)
    took = time.monotonic() - started
    assert "2000 users deleted" in result.stdout, result.stdout
    assert "4000 delete messages queued" in result.stdout
    assert "sent 4000, failed 0, still owed 0" in result.stdout
    assert took < 120, f"users delete of 2000 ids took {took:.0f}s"

    message_ids: dict[str, set[str]] = {}
    for path in PATHS:
        requests = _deletes(rx, path)
        assert len(requests) == 2000, path
        assert sorted(r.user_id or "" for r in requests) == sorted(wanted)
        assert all(r.accepted and r.signature_ok for r in requests)
        for r in requests:
            message_ids.setdefault(r.user_id or "", set()).add(r.message_id or "")
    assert all(len(ids) == 1 for ids in message_ids.values())  # same on both URLs
    assert len({next(iter(ids)) for ids in message_ids.values()}) == 2000

    [(deletions,)] = _query(p, "SELECT COUNT(*) FROM user_deletions")
    assert deletions == 2000
    [(raw_left,)] = _query(
        p, "SELECT COUNT(*) FROM deliveries WHERE user_id NOT LIKE 'sha256:%' AND kind = 'delete'"
    )
    assert raw_left == 0
    [(still_members,)] = _query(p, "SELECT COUNT(*) FROM memberships")
    assert still_members == 100
    rx.clear_records()
    p.cli("sync")
    assert _history(p, KEY_A)[0]["members"] == 100
    assert _identifies(rx, "w1") == []


def test_bad_user_ids_are_refused_and_nothing_is_sent(
    project_factory: ProjectFactory, state_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = _project(project_factory, state_url, rx, USERS)
    p.cli("audience", "create", NAME_A, "--sql", SQL_A)
    p.cli("sync")
    rx.clear_records()
    before = p.dump()
    blank = p.root / "blank.txt"
    blank.write_text("\n   \n\t\n", encoding="utf-8")
    empty = p.root / "empty.txt"
    empty.write_text("", encoding="utf-8")
    missing = p.root / "missing.txt"

    refused = p.cli_many(
        ("users", "delete", ""),
        ("users", "delete", "u1", "  "),
        ("users", "delete", "--file", str(missing)),
        ("users", "delete", "--file", str(blank)),
        ("users", "delete", "--file", str(empty)),
        ("users", "delete"),
        ("users", "delete", "u1", "--file", str(missing)),
        ("users", "restore", ""),
        check=None,
    )
    assert_usage_error(refused[0], "empty")
    assert_usage_error(refused[1], "empty")
    assert_usage_error(refused[2], "missing.txt")
    for result in refused[3:6]:
        assert_usage_error(result, "user id")
    assert_usage_error(refused[6], "missing.txt")
    assert_usage_error(refused[7], "empty")
    assert rx.requests() == []
    assert p.dump() == before

    # an unknown id is not an error: the delete is forwarded all the same
    unknown = p.cli("users", "delete", "never-seen-0001")
    assert unknown.returncode == 0
    for path in PATHS:
        assert [r.user_id for r in _deletes(rx, path)] == ["never-seen-0001"]
    assert _rows_holding(p.dump(), "never-seen-0001") == {}


def test_a_delete_owed_to_a_down_url_is_delivered_later(
    project_factory: ProjectFactory, state_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = _project(project_factory, state_url, rx, USERS)
    p.cli("audience", "create", NAME_A, "--sql", SQL_A)
    p.cli("sync")
    rx.clear_records()
    rx.set_status("w2", 503)

    first = p.cli("users", "delete", "u1", check=1)
    assert "still owed 1" in first.stdout, first.stdout
    [on_w1] = _deletes(rx, "w1")
    assert on_w1.accepted and on_w1.user_id == "u1"
    tried = _deletes(rx, "w2")
    assert tried and not any(r.accepted for r in tried)
    assert {r.message_id for r in tried} == {on_w1.message_id}  # the same on every retry

    # owed: the raw id is kept only in the pending row, everything else holds the hash
    statuses = {(url, status) for url, _d, _user, status in _delete_rows(p)}
    assert statuses == {(rx.url("w1"), "sent"), (rx.url("w2"), "pending")}
    holding = _rows_holding(p.dump(), "u1")
    assert list(holding) == ["deliveries"], holding
    assert len(holding["deliveries"]) == 1, (
        "only the pending delete row may keep the raw id; the delete already sent to w1 "
        f"must hold the hash: {holding['deliveries']}"
    )
    [row] = holding["deliveries"]
    assert "'pending'" in row and "'delete'" in row, row
    assert _query(p, "SELECT COUNT(*) FROM memberships WHERE user_id = 'u1'") == [(0,)]

    # the next `users delete` (of another user) delivers what is still owed
    rx.set_status("w2", None)
    p.cli("users", "delete", "u2")
    delivered = [r for r in _deletes(rx, "w2") if r.accepted]
    assert sorted(r.user_id or "" for r in delivered) == ["u1", "u2"]
    [late] = [r for r in delivered if r.user_id == "u1"]
    assert late.message_id == on_w1.message_id
    assert late.json["timestamp"] == on_w1.json["timestamp"]
    assert [r.user_id for r in _deletes(rx, "w1")] == ["u1", "u2"]
    assert all(status == "sent" for _url, _d, _user, status in _delete_rows(p))
    dump = p.dump()
    assert _rows_holding(dump, "u1") == {} and _rows_holding(dump, "u2") == {}


def test_serve_retries_an_owed_delete(
    project_factory: ProjectFactory, sqlite_url: str, secret_receiver: Receiver
) -> None:
    """The background retry of ``syncer serve`` forwards owed deletes too (SQLite only: the
    retry is the same code as above; this checks that serve schedules it)."""
    rx = secret_receiver
    p = _project(project_factory, sqlite_url, rx, USERS)
    rx.set_status("w2", 503)
    p.cli("users", "delete", "u1", check=1)
    rx.set_status("w2", None)
    with start_cli("serve", settings=p.settings, env=p.env) as serve:
        rx.wait_for(1, path="w2", timeout=60)
        deadline = time.monotonic() + 10
        while _rows_holding(p.dump(), "u1") and time.monotonic() < deadline:
            time.sleep(0.2)  # the hash replaces the id right after the pass that sent it
        assert serve.stop() == 0, serve.read_stderr()
    assert [r.user_id for r in rx.accepted("w2")] == ["u1"]
    assert rx.accepted("w2")[0].message_id == rx.accepted("w1")[0].message_id
    assert _rows_holding(p.dump(), "u1") == {}


def test_a_failed_delete_is_never_resent_with_the_hash_as_user_id(
    project_factory: ProjectFactory, sqlite_url: str, secret_receiver: Receiver
) -> None:
    """A URL refuses a delete for good (HTTP 400): the row fails and keeps only the hash. A
    later ``syncer retry`` must not turn that row into a call carrying the hash as userId."""
    rx = secret_receiver
    p = _project(project_factory, sqlite_url, rx, USERS)
    rx.set_user_status("u1", 400)
    p.cli("users", "delete", "u1", check=1)
    assert {status for _u, _d, _user, status in _delete_rows(p)} == {"failed"}
    assert _rows_holding(p.dump(), "u1") == {}
    rx.set_user_status("u1", None)
    rx.clear_records()

    p.cli("retry", check=None)
    p.cli("users", "delete", "u2")
    sent = [r.user_id or "" for path in PATHS for r in _deletes(rx, path)]
    assert not [user for user in sent if user.startswith("sha256:")], sent
    assert sorted(sent) == ["u2", "u2"]


# audience delete --------------------------------------------------------------------------------


def test_audience_delete_retires_the_key_and_cancels_what_is_owed(
    project_factory: ProjectFactory, state_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = _synced_project(project_factory, state_url, rx, USERS)
    # a change of A still owed to w2 when A is deleted
    p.set_users([*USERS, "u6"])
    rx.set_status("w2", 503)
    p.cli("sync", KEY_A, check=1)
    [(audience_id,)] = _query(p, "SELECT a.id FROM audiences a WHERE a.key = :k", k=KEY_A)
    owed = _query(
        p,
        "SELECT id FROM deliveries WHERE audience_id = :a AND status = 'pending'",
        a=audience_id,
    )
    assert len(owed) == 1
    rx.set_status("w2", None)
    rx.clear_records()
    runs_of_a = len(_history(p, KEY_A))

    deleted = p.cli("audience", "delete", KEY_A)
    assert f"{KEY_A}: deleted" in deleted.stdout
    assert rx.requests() == []  # without --unset: no calls
    assert _query(p, "SELECT status, last_error FROM deliveries WHERE id = :i", i=owed[0][0]) == [
        ("cancelled", "the audience was deleted")
    ]
    assert _query(p, "SELECT a.status FROM audiences a WHERE a.key = :k", k=KEY_A) == [("deleted",)]

    p.set_users([*USERS, "u6", "u0"])
    synced = p.cli("sync")
    assert KEY_A not in synced.stdout and KEY_B in synced.stdout
    assert len(_history(p, KEY_A)) == runs_of_a
    for path in PATHS:
        traits = [r.json["traits"] for r in _identifies(rx, path)]
        assert traits == [{KEY_B: True}], traits  # u0 entered B; A is not synced any more

    create_again, sync_it, listing = p.cli_many(
        ("audience", "create", NAME_A, "--sql", SQL_A),
        ("sync", KEY_A),
        ("audience", "list", "--json"),
        check=None,
    )
    assert_usage_error(create_again, KEY_A, "never reused")
    assert_usage_error(sync_it, KEY_A)
    assert [a["key"] for a in json.loads(listing.stdout)] == [KEY_B]
    assert all(KEY_A not in r.body.decode() for r in rx.requests())

    # told nothing so far; --unset later still tells every member false
    rx.clear_records()
    p.cli("audience", "delete", KEY_A, "--unset")
    for path in PATHS:
        calls = _identifies(rx, path)
        assert sorted(r.user_id or "" for r in calls) == [*USERS, "u6"], path
        assert all(r.json["traits"] == {KEY_A: False} for r in calls)


def test_audience_delete_unset_tells_every_member_false(
    project_factory: ProjectFactory, state_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    p = _synced_project(project_factory, state_url, rx, [*USERS, "u6"])
    p.set_users(USERS)  # u6 left A: it was told false already
    p.cli("sync", KEY_A)
    p.cli("users", "delete", "u1")  # a deleted user is never told anything again
    rx.clear_records()

    retired = p.cli("audience", "delete", KEY_A, "--unset")
    assert f"{KEY_A}: deleted" in retired.stdout, retired.stdout
    for path in PATHS:
        calls = _identifies(rx, path)
        assert sorted(r.user_id or "" for r in calls) == ["u2", "u3", "u4", "u5"], path
        assert all(r.json["traits"] == {KEY_A: False} for r in calls)
        assert all(r.signature_ok for r in calls)
    assert len(rx.requests()) == 8
    assert _query(
        p,
        "SELECT COUNT(*) FROM memberships m JOIN audiences a ON a.id = m.audience_id "
        "WHERE a.key = :k AND m.exited_run_id IS NULL",
        k=KEY_A,
    ) == [(0,)]
    assert _query(p, "SELECT a.status FROM audiences a WHERE a.key = :k", k=KEY_A) == [("deleted",)]
    last = _history(p, KEY_A)[0]
    assert (last["status"], last["members"], last["removed"], last["sent"]) == (
        "succeeded",
        0,
        4,
        8,
    )

    # again on the deleted audience: allowed, and nothing new to send
    rx.clear_records()
    again = p.cli("audience", "delete", KEY_A, "--unset")
    assert f"{KEY_A}: deleted" in again.stdout
    assert rx.requests() == []
    synced = p.cli("sync")
    assert KEY_A not in synced.stdout
    assert [r.json["traits"] for r in rx.accepted()] == []
    assert _rows_holding(p.dump(), "u1") == {}
