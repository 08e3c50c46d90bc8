"""A DuckDB file as an audience's source: stage, diff, incremental runs, the time limit, files
audience SQL may and may not read, statements refused before they run, and DuckDB's
one-writer lock.

The warehouse is a real DuckDB file written with the ``duckdb`` module (read-write, closed
after each change: DuckDB lets one process write a file, or any number read it). The state
database is SQLite and PostgreSQL; checks that are not about the state database run on SQLite
only.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pytest

from syncer import audiences, history
from syncer.errors import AudienceError
from syncer.models import RUN_FAILED, RUN_SUCCEEDED
from syncer.settings import Settings, load_settings
from syncer.sync import RunResult
from tests.helpers import TEST_SECRET, toml_value, write_settings
from tests.integration.conftest import USERS_DDL, WAREHOUSE, World
from tests.receiver import Receiver

PATHS = ("w1", "w2")
MEMBERS_VIEW = "CREATE OR REPLACE VIEW members AS SELECT user_id FROM users"
# Runs for hours: DuckDB has no statement timeout, so only syncer's interrupt ends it.
FOREVER_SQL = (
    "SELECT CAST(count(*) AS VARCHAR) AS user_id FROM range(1000000000000) a, range(1000000) b"
)
FOREVER_VIEW = f"CREATE OR REPLACE VIEW members AS {FOREVER_SQL}"

# A process that holds the DuckDB file open for writing until it is killed.
HOLD_FOR_WRITING = """
import sys, time, duckdb
db = duckdb.connect(sys.argv[1])
db.execute("SELECT 1").fetchall()
print("holding", flush=True)
time.sleep(60)
"""

# Opens the file for writing every 50 ms until DuckDB refuses (prints why, exit 1) or the
# time given is up (exit 0).
PROBE_FOR_LOCK = """
import sys, time, duckdb
deadline = time.monotonic() + float(sys.argv[2])
print("probing", flush=True)
while time.monotonic() < deadline:
    try:
        duckdb.connect(sys.argv[1]).close()
    except duckdb.Error as exc:
        print(exc)
        sys.exit(1)
    time.sleep(0.05)
"""

# Opens the file read-write, writes, and says what happened (exit 0: it could).
TRY_TO_WRITE = """
import sys, duckdb
try:
    with duckdb.connect(sys.argv[1]) as db:
        db.execute("CREATE OR REPLACE TABLE written_by_other (n INTEGER)")
except duckdb.Error as exc:
    print(exc)
    sys.exit(1)
"""


def users(first: int, last: int) -> list[str]:
    return [f"u{i:03d}" for i in range(first, last + 1)]


class DuckWorld(World):
    """``World`` with a DuckDB file as ``[sources.default]``, its ``exports/`` folder in
    ``allowed_directories``."""

    def __init__(self, tmp_path: Path, state_url: str, rx: Receiver) -> None:
        self.duck_path = (tmp_path / "warehouse.duckdb").resolve()
        self.exports = (tmp_path / "exports").resolve()
        self.exports.mkdir()
        self.query_timeout: float = 30
        self.allowed: list[Path] = [self.exports]
        with duckdb.connect(str(self.duck_path)) as db:
            db.execute(USERS_DDL)
            db.execute(MEMBERS_VIEW)
        super().__init__(
            tmp_path,
            state_url,
            rx,
            source_kind=WAREHOUSE,
            source_url=f"duckdb:///{self.duck_path}",
        )

    def configure(
        self,
        workflow_urls: Sequence[str] | None,
        *,
        secret: str | None = TEST_SECRET,
        **tray: object,
    ) -> Settings:
        source = [
            "[sources.default]",
            f"url = {toml_value(self.source_url)}",
            f"query_timeout_seconds = {toml_value(self.query_timeout)}",
        ]
        if self.allowed:
            source.append(f"allowed_directories = {toml_value([str(p) for p in self.allowed])}")
        path = write_settings(
            self.tmp_path / "settings.toml",
            state_url=self.state_url,
            workflow_urls=None if workflow_urls is None else list(workflow_urls),
            shared_secret=secret,
            tray=tray,
            extra="\n".join(source),
        )
        self.settings = load_settings(str(path))
        return self.settings

    def source_as(
        self, *, query_timeout: float | None = None, allowed: Sequence[Path] = ()
    ) -> None:
        """Rewrite settings.toml with this query timeout and these allowed directories."""
        if query_timeout is not None:
            self.query_timeout = query_timeout
        self.allowed = list(allowed)
        self.configure(self.urls)

    @contextmanager
    def duck(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The DuckDB file, open for writing (with every file readable) until the block ends."""
        db = duckdb.connect(str(self.duck_path))
        try:
            yield db
        finally:
            db.close()

    def set_users(self, user_ids: Iterable[str | None], *, table: str = "users") -> None:
        rows = [(uid, None if uid is None else f"{uid}@example.com") for uid in user_ids]
        with self.duck() as db:
            db.execute(f"DELETE FROM {table}")
            if rows:
                db.executemany(f"INSERT INTO {table} VALUES (?, ?, 'pro')", rows)

    def sent(self, path: str, since: int = 0) -> dict[str, list[bool]]:
        """userId -> the trait values accepted on ``path``, from request number ``since`` on."""
        got: dict[str, list[bool]] = {}
        for request in self.rx.accepted(path)[since:]:
            assert request.json["type"] == "identify"
            [value] = request.json["traits"].values()
            got.setdefault(str(request.user_id), []).append(value)
        return got


def _duck_world(tmp_path: Path, state_url: str, receiver: Receiver) -> Iterator[DuckWorld]:
    w = DuckWorld(tmp_path, state_url, receiver)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def duck(tmp_path: Path, state_url: str, receiver: Receiver) -> Iterator[DuckWorld]:
    """State on SQLite and on PostgreSQL; the source a DuckDB file."""
    yield from _duck_world(tmp_path, state_url, receiver)


@pytest.fixture
def lite_duck(tmp_path: Path, sqlite_url: str, receiver: Receiver) -> Iterator[DuckWorld]:
    """SQLite state, a DuckDB source: for checks that are not about the state database."""
    yield from _duck_world(tmp_path, sqlite_url, receiver)


def _refused(w: World, sql: str, *fragments: str) -> str:
    """audiences.create refuses ``sql`` with one line naming ``fragments``; nothing stored."""
    before = w.rows("SELECT * FROM audiences ORDER BY id")
    with pytest.raises(AudienceError) as caught:
        w.create(name=f"Refused {len(before)}", sql=sql)
    message = str(caught.value)
    assert "\n" not in message, (sql, message)
    for fragment in fragments:
        assert fragment.lower() in message.lower(), (sql, message)
    assert w.rows("SELECT * FROM audiences ORDER BY id") == before, sql
    return message


def _assert_failed_quietly(w: DuckWorld, result: RunResult, key: str, members: set[str]) -> None:
    """The run failed, nothing was sent, the snapshot is what it was."""
    assert result.status == RUN_FAILED, result
    assert (result.sent, result.added, result.removed) == (0, 0, 0), result
    assert w.current_members(key) == members
    assert w.rows("SELECT id FROM deliveries WHERE run_id = :r", r=result.run_id) == []


# --- runs -----------------------------------------------------------------------------------


def test_initial_run_sends_every_member_then_only_who_entered_and_left(duck: DuckWorld) -> None:
    w = duck
    w.set_users(users(0, 19))
    key = w.create().key

    first = w.sync(key)

    assert (first.kind, first.status, first.error) == ("initial", RUN_SUCCEEDED, None)
    assert (first.members, first.added, first.removed, first.skipped) == (20, 20, 0, 0)
    assert (first.sent, first.failed) == (40, 0)
    assert w.current_members(key) == set(users(0, 19))
    for path in PATHS:
        assert w.sent(path) == {u: [True] for u in users(0, 19)}
        assert all(r.signature_ok for r in w.rx.requests(path))

    seen = {path: len(w.rx.requests(path)) for path in PATHS}
    now = users(2, 19) + users(20, 22)
    w.set_users(now)
    second = w.sync(key)

    assert (second.kind, second.status) == ("incremental", RUN_SUCCEEDED)
    assert (second.members, second.added, second.removed, second.sent) == (21, 3, 2, 10)
    for path in PATHS:
        assert w.sent(path, seen[path]) == {
            "u000": [False],
            "u001": [False],
            "u020": [True],
            "u021": [True],
            "u022": [True],
        }
    assert w.members_as_of(key, first.run_id or 0) == set(users(0, 19))
    assert w.current_members(key) == set(now)

    # no change in the DuckDB file: not a single call
    calls = len(w.rx.requests())
    quiet = w.sync(key)
    assert (quiet.members, quiet.added, quiet.removed, quiet.sent) == (21, 0, 0, 0)
    assert len(w.rx.requests()) == calls
    assert [r.kind for r in history.runs(w.state, key)] == ["incremental", "incremental", "initial"]


def test_bad_ids_are_skipped_and_counted_duplicates_collapse_integers_become_text(
    duck: DuckWorld,
) -> None:
    w = duck
    w.set_users(
        ["u1", "u1", "u2", None, "", "   ", "\t\n", "x" * 256, "y" * 255, "u2", " lead", "ünï"]
    )
    key = w.create().key

    result = w.sync(key)

    kept = {"u1", "u2", "y" * 255, " lead", "ünï"}
    assert (result.status, result.members, result.added, result.skipped) == (
        RUN_SUCCEEDED,
        5,
        5,
        5,
    )
    assert w.current_members(key) == kept
    [record] = history.runs(w.state, key)
    assert record.skipped_ids == 5
    for path in PATHS:
        assert sorted(str(r.user_id) for r in w.rx.requests(path)) == sorted(kept)

    with w.duck() as db:
        db.execute("CREATE TABLE accounts (id BIGINT, small TINYINT, big HUGEINT)")
        db.execute(
            "INSERT INTO accounts VALUES (1, 1, 1), (2, 2, 2), (2, 2, 2), (30, 30, 30), "
            "(12345678901234, NULL, 170141183460469231731687303715884105727), (NULL, 5, NULL)"
        )
    numbers = w.create("Accounts", "SELECT id FROM accounts").key
    huge = w.create("Huge", "SELECT big FROM accounts").key

    by_id = w.sync(numbers)
    by_huge = w.sync(huge)

    assert (by_id.members, by_id.skipped) == (4, 1)
    assert (by_huge.members, by_huge.skipped) == (4, 1)
    assert w.current_members(numbers) == {"1", "2", "30", "12345678901234"}
    assert w.current_members(huge) == {"1", "2", "30", "170141183460469231731687303715884105727"}
    traits = w.rx.final_traits("w1")
    assert traits["12345678901234"] == {numbers: True}
    assert traits["2"] == {numbers: True, huge: True}
    assert all(isinstance(r.json["userId"], str) for r in w.rx.requests())

    # the same integers next time are the same members: no change, no call
    calls = len(w.rx.requests())
    again = w.sync(numbers)
    assert (again.added, again.removed, again.members) == (0, 0, 4)
    assert len(w.rx.requests()) == calls


# --- the time limit -------------------------------------------------------------------------


def test_a_query_that_runs_forever_ends_at_the_timeout_and_changes_nothing(
    duck: DuckWorld,
) -> None:
    w = duck
    w.set_users(users(0, 4))
    key = w.create("Members", "SELECT user_id FROM members").key
    assert w.sync(key).status == RUN_SUCCEEDED
    calls = len(w.rx.requests())

    # the view the audience reads becomes a cross join that would run for hours
    with w.duck() as db:
        db.execute(FOREVER_VIEW)
    w.source_as(query_timeout=1, allowed=w.allowed)
    started = time.monotonic()
    slow = w.sync(key)
    took = time.monotonic() - started

    assert took < 8, took  # the query would run for hours
    _assert_failed_quietly(w, slow, key, set(users(0, 4)))
    assert slow.error is not None and "query_timeout_seconds" in slow.error, slow.error
    assert "\n" not in slow.error
    assert len(w.rx.requests()) == calls

    # a normal query again: the next run works and catches up
    with w.duck() as db:
        db.execute(MEMBERS_VIEW)
    w.set_users(users(0, 5))
    fine = w.sync(key)
    assert (fine.status, fine.added, fine.removed, fine.members) == (RUN_SUCCEEDED, 1, 0, 6)
    assert w.sent("w1", calls // 2) == {"u005": [True]}

    # such a query is refused at audience create, as soon as the timeout is up
    started = time.monotonic()
    _refused(w, FOREVER_SQL, "query_timeout_seconds")
    assert time.monotonic() - started < 8


# --- files ----------------------------------------------------------------------------------


def test_audience_sql_reads_no_file_outside_the_allowed_directories(lite_duck: DuckWorld) -> None:
    w = lite_duck
    w.set_users(["u1"])
    settings_toml = w.tmp_path / "settings.toml"
    outside = w.tmp_path / "outside.csv"
    outside.write_text("user_id\nstolen\n")
    (w.exports / "ok.csv").write_text("user_id\nc1\n")
    reads = [
        f"SELECT content AS user_id FROM read_text('{settings_toml}')",
        f"SELECT user_id FROM read_csv('{outside}')",
        f"SELECT user_id FROM '{outside}'",
        f"SELECT user_id FROM read_csv('{w.exports}/../outside.csv')",
        f"SELECT content AS user_id FROM read_text('{w.exports}/../settings.toml')",
        f"SELECT user_id FROM read_csv('{w.tmp_path}/*.csv')",
        "SELECT file AS user_id FROM glob('/*')",
        "SELECT file AS user_id FROM glob('/etc/*')",
        "SELECT content AS user_id FROM read_text('/etc/passwd')",
        "SELECT content AS user_id FROM read_blob('/proc/self/environ')",
        f"SELECT content AS user_id FROM read_text('file://{settings_toml}')",
    ]
    for sql in reads:
        _refused(w, sql, "disabled by configuration")
    # no environment: the function is not there at all
    _refused(w, "SELECT getenv('HOME') AS user_id", "getenv")
    _refused(w, "SELECT user_id FROM users WHERE getenv('HOME') IS NOT NULL", "getenv")

    # a link inside an allowed folder does not lead out of it
    (w.exports / "link.csv").symlink_to(outside)
    _refused(w, f"SELECT user_id FROM read_csv('{w.exports}/link.csv')", "disabled")
    assert w.rows("SELECT key FROM audiences") == []


def test_csv_and_parquet_files_in_allowed_directories_are_audiences(lite_duck: DuckWorld) -> None:
    w = lite_duck
    (w.exports / "signups.csv").write_text("user_id,plan\nc1,pro\nc2,free\nc3,pro\n")
    (w.exports / "daily").mkdir()
    with w.duck() as db:
        db.execute(
            "COPY (SELECT 'p' || i AS user_id FROM range(3) t(i)) "
            f"TO '{w.exports}/daily/part-1.parquet' (FORMAT parquet)"
        )
        db.execute(
            "COPY (SELECT 'p' || i AS user_id FROM range(2, 5) t(i)) "
            f"TO '{w.exports}/daily/part-2.parquet' (FORMAT parquet)"
        )

    csv = w.create(
        "Pro Signups", f"SELECT user_id FROM '{w.exports}/signups.csv' WHERE plan = 'pro'"
    )
    parquet = w.create("Daily", f"SELECT user_id FROM read_parquet('{w.exports}/daily/*.parquet')")

    from_csv = w.sync(csv.key)
    from_parquet = w.sync(parquet.key)

    assert (from_csv.status, from_csv.members) == (RUN_SUCCEEDED, 2)
    assert (from_parquet.status, from_parquet.members) == (RUN_SUCCEEDED, 5)
    assert w.current_members(csv.key) == {"c1", "c3"}
    assert w.current_members(parquet.key) == {"p0", "p1", "p2", "p3", "p4"}
    traits = w.rx.final_traits("w1")
    assert traits["c1"] == {csv.key: True}
    assert traits["p4"] == {parquet.key: True}

    # the folder taken out of allowed_directories: the next run fails and sends nothing
    calls = len(w.rx.requests())
    w.source_as(allowed=[])
    refused = w.sync(csv.key)
    _assert_failed_quietly(w, refused, csv.key, {"c1", "c3"})
    assert refused.error is not None and "disabled by configuration" in refused.error
    assert len(w.rx.requests()) == calls


def test_a_view_in_the_file_that_reads_settings_fails_the_run_and_sends_nothing(
    lite_duck: DuckWorld,
) -> None:
    """Whoever writes the DuckDB file can define views; a view runs with syncer's rules, so
    one that reads settings.toml fails the run."""
    w = lite_duck
    w.set_users(["u1", "u2"])
    key = w.create("Members", "SELECT user_id FROM members").key
    assert w.sync(key).members == 2
    calls = len(w.rx.requests())

    settings_toml = w.tmp_path / "settings.toml"
    with w.duck() as db:
        db.execute(
            "CREATE OR REPLACE VIEW members AS "
            f"SELECT content AS user_id FROM read_text('{settings_toml}')"
        )
    leaked = w.sync(key)

    _assert_failed_quietly(w, leaked, key, {"u1", "u2"})
    assert leaked.error is not None and "disabled by configuration" in leaked.error
    assert len(w.rx.requests()) == calls
    assert TEST_SECRET not in str(w.rows("SELECT * FROM sync_runs"))


# --- statements refused before they reach DuckDB ----------------------------------------------


REFUSED_STATEMENTS = [
    ("INSERT INTO users VALUES ('x', NULL, NULL)", "writes data"),
    ("DELETE FROM users", "writes data"),
    ("CREATE TABLE stolen AS SELECT user_id FROM users", "schema"),
    ("COPY users TO 'x.csv'", "COPY"),
    ("COPY (SELECT user_id FROM users) TO '{exports}/x.csv'", "COPY"),
    ("ATTACH '{exports}/other.duckdb' AS other", "attach"),
    ("INSTALL httpfs", "INSTALL"),
    ("LOAD httpfs", "LOAD"),
    ("SET enable_external_access = true", "SET"),
    ("RESET allowed_directories", "RESET"),
    ("PRAGMA version", "PRAGMA"),
    ("EXPORT DATABASE '{exports}/dump'", "EXPORT"),
    ("SELECT user_id FROM users; SELECT 1", "2 statements"),
    ("SELECT user_id FROM users; DROP TABLE users", "2 statements"),
    ("WITH x AS (DELETE FROM users RETURNING user_id) SELECT user_id FROM x", "writes data"),
]


def test_statements_that_write_or_change_the_session_are_refused_unrun(
    lite_duck: DuckWorld,
) -> None:
    w = lite_duck
    w.set_users(["u1", "u2"])
    key = w.create().key  # one audience there already
    before = w.rows("SELECT * FROM audiences ORDER BY id")

    for sql, reason in REFUSED_STATEMENTS:
        message = _refused(w, sql.format(exports=w.exports), reason)
        assert message.startswith("the audience SQL "), message

    assert w.rows("SELECT * FROM audiences ORDER BY id") == before
    assert sorted(p.name for p in w.exports.iterdir()) == []
    assert not Path("x.csv").exists() and not (w.tmp_path / "x.csv").exists()
    with w.duck() as db:
        assert db.execute("SELECT user_id FROM users ORDER BY 1").fetchall() == [("u1",), ("u2",)]
        tables = db.execute("SELECT table_name FROM information_schema.tables ORDER BY 1")
        assert [name for (name,) in tables.fetchall()] == ["members", "users"]
    # an update to such SQL is refused too, and the audience keeps its query
    for sql in ("INSERT INTO users VALUES ('x', NULL, NULL)", "SET threads = 1"):
        with pytest.raises(AudienceError):
            audiences.update_definition(w.state, w.settings, key, sql=sql)
    assert w.rows("SELECT * FROM audiences ORDER BY id") == before


# --- DuckDB's lock: one writer or many readers ------------------------------------------------


@contextmanager
def writer_holding(path: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_FOR_WRITING, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "holding"
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def try_to_write(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", TRY_TO_WRITE, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_file_another_process_writes_fails_the_run_clearly_then_works(
    lite_duck: DuckWorld,
) -> None:
    w = lite_duck
    w.set_users(["u1", "u2"])
    key = w.create().key
    w.source_as(query_timeout=1, allowed=w.allowed)

    with writer_holding(w.duck_path) as writer:
        started = time.monotonic()
        locked = w.sync(key)
        took = time.monotonic() - started

    # syncer waits for the writer up to query_timeout_seconds, then says who holds the file
    assert 0.9 <= took < 8, took
    assert locked.status == RUN_FAILED
    assert (locked.members, locked.sent) == (0, 0)
    assert w.current_members(key) == set()
    assert w.rx.requests() == []
    error = locked.error or ""
    assert "\n" not in error
    assert "could not set lock on file" in error.lower(), error
    assert str(w.duck_path) in error, error
    assert f"PID {writer.pid}" in error, error
    assert "source 'default'" in error, error

    # the writer is gone: the next run works
    fine = w.sync(key)
    assert (fine.status, fine.kind, fine.members, fine.sent) == (RUN_SUCCEEDED, "initial", 2, 4)

    # a writer that lets go within query_timeout_seconds is waited for
    w.set_users(["u1", "u2", "u3"])
    w.source_as(query_timeout=10, allowed=w.allowed)
    with writer_holding(w.duck_path) as writer:
        threading.Timer(1.0, writer.kill).start()
        started = time.monotonic()
        waited = w.sync(key)
        took = time.monotonic() - started
    assert (waited.status, waited.added, waited.members) == (RUN_SUCCEEDED, 1, 3), waited.error
    assert 0.9 <= took < 9, took


def test_the_file_is_closed_after_a_run_and_locked_only_while_the_query_runs(
    lite_duck: DuckWorld,
) -> None:
    w = lite_duck
    w.set_users(["u1", "u2"])
    key = w.create("Members", "SELECT user_id FROM members").key
    assert w.sync(key).status == RUN_SUCCEEDED

    # after `syncer sync`, another process can open the file for writing
    wrote = try_to_write(w.duck_path)
    assert wrote.returncode == 0, wrote.stdout + wrote.stderr

    # while a query runs, syncer holds DuckDB's read lock: a writer is locked out
    with w.duck() as db:
        db.execute(FOREVER_VIEW)
    w.source_as(query_timeout=3, allowed=w.allowed)
    with subprocess.Popen(
        [sys.executable, "-c", PROBE_FOR_LOCK, str(w.duck_path), "30"],
        stdout=subprocess.PIPE,
        text=True,
    ) as probe:
        assert probe.stdout is not None
        assert probe.stdout.readline().strip() == "probing"
        slow = w.sync(key)
        try:
            said, _ = probe.communicate(timeout=30)
        finally:
            probe.kill()
    assert probe.returncode == 1, said
    assert "Could not set lock on file" in said, said
    assert slow.status == RUN_FAILED and "query_timeout_seconds" in (slow.error or ""), slow

    # and once the run has ended, the writer gets in again
    again = try_to_write(w.duck_path)
    assert again.returncode == 0, again.stdout + again.stderr
