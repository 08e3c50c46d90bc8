"""``syncer serve`` end to end: the real daemon in a subprocess, real SQLite files or PostgreSQL,
a loopback receiver standing in for Tray.

Every wait polls against a deadline; the only fixed waits are observation windows that prove
something does *not* happen (no run of a paused audience) and the downtime of the catch-up test.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, create_engine, text

from tests.helpers import (
    TEST_SECRET,
    CliProcess,
    children,
    gone,
    run_cli,
    set_warehouse_users,
    start_cli,
    write_settings,
)
from tests.receiver import Receiver

T = TypeVar("T")

SQL = "SELECT user_id FROM users"
PRO_SQL = "SELECT user_id FROM users WHERE plan = 'pro'"
NAME_A, KEY_A = "Serve Every Two", "serve_every_two"
NAME_B, KEY_B = "Serve Hourly", "serve_hourly"
GRACE_SECONDS = 5
GRACE = f'[schedule]\nshutdown_grace = "{GRACE_SECONDS}s"'
LEADING = "leading: this process schedules"
STANDING_BY = "standing by"
RUN_LOG_FIELDS = ("audience_key", "kind", "status", "members", "added", "removed", "sent", "failed")


# -- helpers ---------------------------------------------------------------------------------


class SlowReceiver(Receiver):
    """A receiver whose every answer takes ``delay`` seconds, then a plain 200.

    (The receiver's own "slow" fault is meant to trip the client's timeout and is never counted
    as accepted; this one is a slow but healthy Tray, so a run's delivery takes a while.)
    """

    def __init__(self, *, delay: float, **options: Any) -> None:
        super().__init__(**options)
        self.delay = delay

    def _decide(self, path: str, user_id: str | None, body_size: int) -> Any:
        decision = super()._decide(path, user_id, body_size)
        if self.delay:
            time.sleep(self.delay)
        return decision


def _tail(process: CliProcess, lines: int = 30) -> str:
    return "\n".join(process.read_stderr().splitlines()[-lines:])


def wait_until(
    condition: Callable[[], T],
    what: str,
    timeout: float,
    *watched: CliProcess,
    poll: float = 0.05,
) -> T:
    """Poll ``condition`` until it returns something truthy (returned); fail after ``timeout``
    seconds, or at once when a watched ``serve`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for process in watched:
            if process.poll() is not None:
                pytest.fail(
                    f"syncer serve exited ({process.returncode}) before {what}\n"
                    f"--- stderr\n{_tail(process)}"
                )
        if time.monotonic() > deadline:
            logs = "".join(f"\n--- serve stderr\n{_tail(p)}" for p in watched)
            pytest.fail(f"timed out after {timeout}s waiting for {what}{logs}")
        time.sleep(poll)


def holds_for(condition: Callable[[], bool], what: str, seconds: float) -> None:
    """``condition`` stays true for ``seconds`` (an observation window for 'nothing happens')."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), f"no longer true: {what}"
        time.sleep(0.1)
    assert condition(), f"no longer true: {what}"


def traits_of(rx: Receiver, key: str, path: str = "w1") -> dict[str, bool]:
    """user -> last accepted value of trait ``key`` at the receiver."""
    return {user: traits[key] for user, traits in rx.final_traits(path).items() if key in traits}


def sends_per_change(rx: Receiver, key: str, path: str = "w1") -> Counter[tuple[str, bool]]:
    """How many accepted identifies carried each (user, value) of trait ``key``."""
    counts: Counter[tuple[str, bool]] = Counter()
    for record in rx.accepted(path):
        traits = record.json.get("traits") if isinstance(record.json, dict) else None
        if record.user_id is not None and isinstance(traits, dict) and key in traits:
            counts[(record.user_id, bool(traits[key]))] += 1
    return counts


def assert_each_change_sent_once(rx: Receiver, key: str) -> None:
    repeated = {change: n for change, n in sends_per_change(rx, key).items() if n != 1}
    assert not repeated, f"changes of {key} sent more than once: {repeated}"


@dataclass(kw_only=True)
class Site:
    """A folder with settings.toml, a SQLite warehouse, and a state database (schema upgraded)."""

    root: Path
    settings: Path
    warehouse: Path
    state: Engine
    started: list[CliProcess] = field(default_factory=list)

    def cli(self, *args: str, check: bool | int = True) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, settings=self.settings, check=check, timeout=90)

    def create(self, name: str, sql: str, every: str) -> str:
        return self.cli("audience", "create", name, "--sql", sql, "--every", every).stdout.strip()

    def serve(self, *options: str) -> CliProcess:
        process = start_cli(*options, "serve", settings=self.settings)
        self.started.append(process)
        return process

    def set_users(self, user_ids: Sequence[str]) -> None:
        set_warehouse_users(self.warehouse, user_ids)

    def runs(self, key: str | None = None) -> list[Any]:
        query = (
            "SELECT r.id, a.key, r.kind, r.status, r.started_at, r.finished_at, r.pid, r.error "
            "FROM sync_runs r JOIN audiences a ON a.id = r.audience_id"
        )
        params = {}
        if key is not None:
            query += " WHERE a.key = :key"
            params["key"] = key
        with self.state.connect() as conn:
            return list(conn.execute(text(query + " ORDER BY r.id"), params).all())

    def running(self, key: str | None = None) -> list[Any]:
        return [run for run in self.runs(key) if run.status == "running"]

    def deliveries(self) -> Counter[str]:
        with self.state.connect() as conn:
            rows = conn.execute(text("SELECT status, count(*) FROM deliveries GROUP BY status"))
            return Counter({status: int(n) for status, n in rows.all()})


SiteFactory = Callable[..., Site]


@pytest.fixture
def make_site(tmp_path: Path) -> Iterator[SiteFactory]:
    """``make_site(state_url, users, upgrade=True, **write_settings options)``."""
    sites: list[Site] = []

    def make(state_url: str, users: Sequence[str], *, upgrade: bool = True, **options: Any) -> Site:
        root = tmp_path / f"site{len(sites)}"
        root.mkdir()
        warehouse = root / "warehouse.db"
        set_warehouse_users(warehouse, users)
        options.setdefault("shared_secret", TEST_SECRET)
        settings = write_settings(
            root / "settings.toml",
            state_url=state_url,
            sources={"default": f"sqlite:///{warehouse}"},
            **options,
        )
        site = Site(
            root=root, settings=settings, warehouse=warehouse, state=create_engine(state_url)
        )
        sites.append(site)
        if upgrade:
            site.cli("db", "upgrade")
        return site

    yield make
    for site in sites:
        for process in site.started:
            process.stop(timeout=15)
        site.state.dispose()


# -- 1. scheduling, live changes -------------------------------------------------------------


def test_serve_runs_audiences_and_follows_cli_changes(
    make_site: SiteFactory, sqlite_url: str, receiver: Receiver
) -> None:
    rx = receiver
    users = ["u1", "u2", "u3", "u4", "u5"]
    site = make_site(sqlite_url, users, workflow_urls=[rx.url("w1")])
    assert site.create(NAME_A, SQL, "2s") == KEY_A

    with site.serve() as serve:
        # the initial sync runs at once: every member gets true
        wait_until(
            lambda: traits_of(rx, KEY_A) == dict.fromkeys(users, True),
            "the initial sync of A",
            20,
            serve,
        )
        assert site.runs(KEY_A)[0].kind == "initial"

        # an audience created from another process gets its initial sync within seconds,
        # not after its hour
        assert site.create(NAME_B, PRO_SQL, "1h") == KEY_B
        wait_until(
            lambda: traits_of(rx, KEY_B) == dict.fromkeys(users, True),
            "the initial sync of B, created while serve runs",
            10,
            serve,
        )
        [b_run] = site.runs(KEY_B)
        assert b_run.kind == "initial"

        # a source change reaches the receiver within a few seconds
        site.set_users(["u2", "u3", "u4", "u5", "u9"])
        expected = dict.fromkeys(["u2", "u3", "u4", "u5", "u9"], True) | {"u1": False}
        wait_until(
            lambda: traits_of(rx, KEY_A) == expected, "the source change of A sent", 10, serve
        )
        # B keeps its own interval: an hour, so it did not run again
        assert len(site.runs(KEY_B)) == 1
        assert "u9" not in traits_of(rx, KEY_B)

        # pause: no more runs of it
        site.cli("audience", "pause", KEY_A)
        wait_until(lambda: not site.running(KEY_A), "the run in flight to finish", 10, serve)
        paused = len(site.runs(KEY_A))
        holds_for(lambda: len(site.runs(KEY_A)) == paused, "no run of a paused audience", 5)

        # resume: it runs again
        site.cli("audience", "resume", KEY_A)
        wait_until(lambda: len(site.runs(KEY_A)) > paused, "a run after resume", 10, serve)

        # delete: unscheduled, no more runs
        site.cli("audience", "delete", KEY_A)
        wait_until(
            lambda: f"unscheduled audience {KEY_A}" in serve.read_stderr(),
            "A unscheduled",
            10,
            serve,
        )
        wait_until(lambda: not site.running(KEY_A), "the run in flight to finish", 10, serve)
        deleted = len(site.runs(KEY_A))
        holds_for(lambda: len(site.runs(KEY_A)) == deleted, "no run of a deleted audience", 4.5)

        assert serve.stop() == 0, _tail(serve)

    assert_each_change_sent_once(rx, KEY_A)
    assert_each_change_sent_once(rx, KEY_B)
    assert all(r.signature_ok for r in rx.requests())
    assert not site.running()
    assert "Traceback" not in serve.read_stderr()


def _helpers_of(pid: int) -> list[int]:
    """The delivery helper processes (``python -m syncer.workers``) whose parent is ``pid``."""
    found = []
    for child in children(pid):
        with contextlib.suppress(OSError):
            if b"syncer.workers" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
    return found


def test_serve_keeps_a_helper_warm_for_the_next_pass_and_it_dies_with_serve(
    make_site: SiteFactory, sqlite_url: str, receiver: Receiver
) -> None:
    """After a pass with a helper, serve starts the next pass's helper at once; it waits with
    its libraries loaded, the next large pass hands it its plan, and a ``kill -9`` of serve
    takes it down too."""
    rx = receiver
    # 2,400 users each time: enough for a pass to use a helper (2,000 rows owed or more)
    first = [f"user-{i:05d}" for i in range(2400)]
    more = first + [f"user-{i:05d}" for i in range(2400, 4800)]
    key = "warm_helpers"
    site = make_site(
        sqlite_url,
        first,
        workflow_urls=[rx.url("w1")],
        tray={"max_concurrency": 8, "delivery_processes": 2},
    )
    assert site.create("Warm Helpers", SQL, "2s") == key
    serve = site.serve()
    wait_until(
        lambda: traits_of(rx, key) == dict.fromkeys(first, True), "the initial sync", 60, serve
    )
    wait_until(lambda: site.runs(key)[0].status == "succeeded", "the initial run done", 30, serve)
    # The initial pass's helper is gone; one for the next pass waits in its place.
    [warm] = wait_until(lambda: _helpers_of(serve.pid), "a warm helper", 30, serve)
    holds_for(lambda: _helpers_of(serve.pid) == [warm], "the warm helper waits, alone", 2.5)

    site.set_users(more)
    wait_until(
        lambda: traits_of(rx, key) == dict.fromkeys(more, True), "the second sync", 60, serve
    )
    wait_until(
        lambda: site.deliveries() == Counter({"sent": len(more)}),
        "every outcome recorded",
        30,
        serve,
    )
    # The warm helper sent part of the second pass: its pid is in the rows it sent.
    with site.state.connect() as conn:
        sent_by = conn.execute(
            text("SELECT claimed_by FROM deliveries WHERE user_id >= 'user-02400'")
        ).scalars()
        claimers = Counter(claimer.rsplit(":", 2)[1] for claimer in sent_by)
    assert str(warm) in claimers, claimers
    assert len(claimers) == 2, claimers
    assert_each_change_sent_once(rx, key)

    # kill -9: serve's helpers, the waiting one included, do not outlive it.
    helpers = wait_until(
        lambda: [pid for pid in _helpers_of(serve.pid) if pid != warm],
        "the next warm helper",
        30,
        serve,
    )
    serve.send_signal(signal.SIGKILL)
    assert serve.wait(timeout=10) == -signal.SIGKILL
    wait_until(lambda: all(gone(pid) for pid in [warm, *helpers]), "the helpers gone with serve", 5)


# -- 2. SIGTERM ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("processes", "count"),
    # 2,400 users: enough for the run to start a helper process (2,000 rows owed or more)
    [(1, 400), (2, 2400)],
    ids=["one-process", "with-a-helper"],
)
def test_sigterm_exits_within_the_grace_and_loses_nothing(
    make_site: SiteFactory, sqlite_url: str, processes: int, count: int
) -> None:
    users = [f"user-{i:04d}" for i in range(count)]
    key = "sigterm_audience"
    with SlowReceiver(secret=TEST_SECRET, delay=0.05) as rx:
        site = make_site(
            sqlite_url,
            users,
            workflow_urls=[rx.url("w1")],
            tray={"max_concurrency": 4, "delivery_processes": processes},
            extra=GRACE,
        )
        assert site.create("SIGTERM Audience", SQL, "1h") == key
        serve = site.serve()
        # 400 calls, 4 at a time, 50 ms each: about 5 s of delivery; stop it early on
        wait_until(lambda: len(rx.accepted()) >= 40, "delivery under way", 30, serve)
        signalled = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(timeout=GRACE_SECONDS + 20)
        took = time.monotonic() - signalled
        assert code == 0, _tail(serve)
        assert took < GRACE_SECONDS + 1, f"exit took {took:.1f}s, grace is {GRACE_SECONDS}s"
        assert "Traceback" not in serve.read_stderr()

        # stopped mid-delivery: the run says so, and what it did not send is still owed
        received = {r.user_id for r in rx.accepted()}
        assert len(received) == len(rx.accepted()), "a user was sent twice"
        assert len(received) < len(users), "the stop came too late to test anything"
        [stopped] = site.runs(key)
        assert stopped.status == "interrupted", stopped
        owed = site.deliveries()
        assert owed["sent"] == len(received), owed
        assert owed["sent"] + owed["pending"] == len(users), owed

        # the next run delivers the rest
        rx.delay = 0
        done = site.cli("sync", key)
        assert "succeeded" in done.stdout, done.stdout

    assert traits_of(rx, key) == dict.fromkeys(users, True)
    assert_each_change_sent_once(rx, key)
    runs = json.loads(site.cli("history", "--json").stdout)
    assert [(r["kind"], r["status"]) for r in runs] == [
        ("incremental", "succeeded"),
        ("initial", "interrupted"),
    ]
    assert site.deliveries() == Counter({"sent": len(users)})


def test_sigterm_with_calls_hanging_exits_at_the_grace_and_closes_its_run(
    make_site: SiteFactory, sqlite_url: str
) -> None:
    """The calls in flight cannot finish (Tray hangs, each call retries past the grace): serve
    still exits 0 at the grace, and what it leaves behind is a stopped run, not a running one."""
    users = [f"user-{i:04d}" for i in range(50)]
    key = "hanging_tray"
    hanging = Receiver(secret=TEST_SECRET, fail_ratio=1.0, fault_modes=["slow"], slow_seconds=30)
    with hanging as rx:
        site = make_site(
            sqlite_url,
            users,
            workflow_urls=[rx.url("w1")],
            # every call times out after 1 s and is retried up to 10 times: ~10 s per call
            tray={"max_concurrency": 4, "timeout_seconds": 1, "max_attempts": 10},
            extra=GRACE,
        )
        assert site.create("Hanging Tray", SQL, "1h") == key
        serve = site.serve()
        wait_until(lambda: len(rx.requests()) >= 4, "calls in flight", 30, serve)
        signalled = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(timeout=GRACE_SECONDS + 20)
        took = time.monotonic() - signalled
        assert code == 0, _tail(serve)
        assert took < GRACE_SECONDS + 1, f"exit took {took:.1f}s, grace is {GRACE_SECONDS}s"
        left_behind = [(run.kind, run.status) for run in site.runs(key)]
        assert site.deliveries() == Counter({"pending": len(users)})  # all still owed

        # nothing lost: the next run sends it all
        rx.clear_faults()
        site.cli("sync", key)
    assert traits_of(rx, key) == dict.fromkeys(users, True)
    assert_each_change_sent_once(rx, key)

    # the stopped serve recorded its run as stopped (not left for the next run to clean up)
    assert left_behind == [("initial", "interrupted")], (
        f"after SIGTERM and exit 0 the history shows {left_behind}\n{_tail(serve)}"
    )


def test_owed_deliveries_are_retried_in_the_background(
    make_site: SiteFactory, sqlite_url: str, receiver: Receiver
) -> None:
    """A URL down at run time gets what it is owed from serve, long before the next run."""
    rx = receiver
    key = "retried_later"
    users = ["u1", "u2", "u3", "u4", "u5"]
    site = make_site(sqlite_url, users, workflow_urls=[rx.url("w1")], tray={"max_attempts": 20})
    assert site.create("Retried Later", SQL, "1h") == key
    rx.set_status("w1", 503)
    with site.serve() as serve:
        wait_until(
            lambda: [r.status for r in site.runs(key)] == ["failed"],
            "the run to fail against a down URL",
            20,
            serve,
        )
        assert site.deliveries() == Counter({"pending": len(users)})
        rx.set_status("w1", None)
        wait_until(
            lambda: traits_of(rx, key) == dict.fromkeys(users, True),
            "the background retry",
            30,
            serve,
        )
        assert len(site.runs(key)) == 1, "sent by a new run, not by the background retry"
        wait_until(
            lambda: site.deliveries() == Counter({"sent": len(users)}), "sent recorded", 5, serve
        )
        assert serve.stop() == 0, _tail(serve)
    assert_each_change_sent_once(rx, key)


# -- 3. catch-up after downtime --------------------------------------------------------------


def test_missed_slots_run_once_on_start(make_site: SiteFactory, sqlite_url: str) -> None:
    key = "catch_up"
    with Receiver(secret=TEST_SECRET) as rx:
        site = make_site(sqlite_url, ["u1", "u2", "u3"], workflow_urls=[rx.url("w1")])
        assert site.create("Catch Up", SQL, "3s") == key
        with site.serve() as first:
            wait_until(
                lambda: any(r.status == "succeeded" for r in site.runs(key)),
                "the first run",
                20,
                first,
            )
            assert first.stop() == 0, _tail(first)
        stopped = time.monotonic()
        before = len(site.runs(key))
        assert not site.running(key)

        time.sleep(max(0.0, stopped + 7 - time.monotonic()))  # down for two missed slots

        with site.serve() as second:
            led = wait_until(
                lambda: LEADING in second.read_stderr() and time.monotonic(),
                "the second serve to lead",
                20,
                second,
            )
            ran = wait_until(
                lambda: len(site.runs(key)) > before and time.monotonic(),
                "the catch-up run",
                10,
                second,
                poll=0.02,
            )
            # right away, not at the end of an interval
            assert ran - led < 2.0, f"the catch-up run came {ran - led:.1f}s after start"
            # once, not once per missed slot (the next regular slot is 3 s after it)
            holds_for(lambda: len(site.runs(key)) == before + 1, "exactly one catch-up run", 1.5)
            caught_up = site.runs(key)[-1]
            assert caught_up.kind == "incremental"
            # and the schedule goes on from there
            wait_until(lambda: len(site.runs(key)) >= before + 2, "the next slot", 8, second)
            assert second.stop() == 0, _tail(second)
    assert not site.running(key)


# -- 4. two processes on PostgreSQL ----------------------------------------------------------


def _role(process: CliProcess) -> str | None:
    log = process.read_stderr()
    if LEADING in log:
        return "leading"
    if STANDING_BY in log:
        return "standing by"
    return None


@pytest.mark.postgres
def test_two_serves_one_leader_and_takeover_after_kill_9(
    make_site: SiteFactory, pg_url: str, receiver: Receiver
) -> None:
    rx = receiver
    key = "two_serves"
    users = ["u1", "u2", "u3", "u4", "u5"]
    site = make_site(pg_url, users, workflow_urls=[rx.url("w1")])
    assert site.create("Two Serves", SQL, "2s") == key

    one, two = site.serve(), site.serve()
    wait_until(lambda: _role(one) and _role(two), "both to pick a role", 30, one, two)
    roles = {_role(one), _role(two)}
    assert roles == {"leading", "standing by"}, f"{_tail(one)}\n---\n{_tail(two)}"
    leader, standby = (one, two) if _role(one) == "leading" else (two, one)

    wait_until(
        lambda: traits_of(rx, key) == dict.fromkeys(users, True), "the initial sync", 20, leader
    )
    site.set_users(["u2", "u3", "u4", "u5", "u9"])
    expected = dict.fromkeys(["u2", "u3", "u4", "u5", "u9"], True) | {"u1": False}
    wait_until(lambda: traits_of(rx, key) == expected, "the source change", 10, leader)
    # a few more runs go by; still each change sent once, and only one process schedules
    runs_now = len(site.runs(key))
    wait_until(lambda: len(site.runs(key)) >= runs_now + 2, "two more runs", 10, leader)
    assert_each_change_sent_once(rx, key)
    assert LEADING not in standby.read_stderr()
    pids = {run.pid for run in site.runs(key)}
    assert pids == {leader.pid}, f"runs made by {pids}, leader is {leader.pid}"

    leader.send_signal(signal.SIGKILL)
    assert leader.wait(timeout=10) == -signal.SIGKILL
    killed = time.monotonic()
    wait_until(lambda: LEADING in standby.read_stderr(), "the standby to take over", 30, standby)
    took = time.monotonic() - killed
    assert took <= 30, f"takeover took {took:.1f}s"

    site.set_users(["u2", "u3", "u4", "u5", "u9", "u10"])
    wait_until(
        lambda: traits_of(rx, key).get("u10") is True,
        "a change made after the kill",
        30,
        standby,
    )
    assert standby.stop() == 0, _tail(standby)
    assert traits_of(rx, key) == expected | {"u10": True}
    assert not site.running(), site.runs()
    assert "Traceback" not in standby.read_stderr()


# -- 5. a manual sync meets a scheduled run --------------------------------------------------


def test_manual_sync_during_a_scheduled_run_is_refused_or_waits(
    make_site: SiteFactory, sqlite_url: str
) -> None:
    users = [f"user-{i:04d}" for i in range(400)]
    key = "long_run"
    with SlowReceiver(secret=TEST_SECRET, delay=0.05) as rx:
        site = make_site(
            sqlite_url, users, workflow_urls=[rx.url("w1")], tray={"max_concurrency": 2}
        )
        assert site.create("Long Run", SQL, "1h") == key
        with site.serve() as serve:
            # 400 calls, 2 at a time, 50 ms each: about 10 s
            wait_until(
                lambda: site.running(key) and len(rx.accepted()) >= 10,
                "the scheduled run to be delivering",
                30,
                serve,
            )
            refused = site.cli("sync", key, check=1)
            lines = refused.stderr.splitlines()
            assert len(lines) == 1, refused.stderr
            assert "being synced" in lines[0] and key in lines[0], lines[0]
            assert site.running(key), "the scheduled run ended before the refusal: test too fast"
            assert len(site.runs(key)) == 1, "the refused sync recorded a run"

            waited = site.cli("sync", key, "--wait")
            assert "succeeded" in waited.stdout, waited.stdout
            scheduled, manual = site.runs(key)
            assert (scheduled.kind, scheduled.status) == ("initial", "succeeded")
            assert (manual.kind, manual.status) == ("incremental", "succeeded")
            assert manual.started_at >= scheduled.finished_at
            assert serve.stop() == 0, _tail(serve)

    assert traits_of(rx, key) == dict.fromkeys(users, True)
    assert_each_change_sent_once(rx, key)


# -- 6. JSON logs ----------------------------------------------------------------------------


def test_json_log_format(make_site: SiteFactory, sqlite_url: str, receiver: Receiver) -> None:
    key = "json_logs"
    users = ["u1", "u2", "u3"]
    site = make_site(sqlite_url, users, workflow_urls=[receiver.url("w1")])
    assert site.create("JSON Logs", SQL, "1h") == key

    def run_logged(process: CliProcess) -> bool:
        return f'"audience_key": "{key}"' in process.read_stderr()

    with site.serve("--log-format", "json") as serve:
        wait_until(lambda: run_logged(serve), "the run's log line", 20, serve)
        assert serve.stop() == 0, _tail(serve)

    entries = []
    for line in serve.read_stderr().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line on stderr: {line!r}")
        assert isinstance(entry, dict), line
        assert {"level", "message"} <= set(entry), line
        entries.append(entry)
    [run] = [e for e in entries if "audience_key" in e]
    assert {name: run[name] for name in RUN_LOG_FIELDS} == {
        "audience_key": key,
        "kind": "initial",
        "status": "succeeded",
        "members": 3,
        "added": 3,
        "removed": 0,
        "sent": 3,
        "failed": 0,
    }
    assert any(LEADING in e["message"] for e in entries)


# -- 7. bad input ----------------------------------------------------------------------------


def _assert_one_line_usage_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    shown = f"exit {result.returncode}\n--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    assert result.returncode == 2, shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1, shown
    assert lines[0].startswith("syncer: error:"), shown
    for word in words:
        assert word in lines[0], shown


def test_serve_refuses_bad_input(make_site: SiteFactory, tmp_path: Path) -> None:
    no_urls = make_site(f"sqlite:///{tmp_path / 'no-urls.db'}", ["u1"])
    _assert_one_line_usage_error(no_urls.cli("serve", check=False), "workflow_urls")

    no_schema = make_site(
        f"sqlite:///{tmp_path / 'no-schema.db'}",
        ["u1"],
        upgrade=False,
        workflow_urls=["http://127.0.0.1:9/never-called"],
    )
    _assert_one_line_usage_error(no_schema.cli("serve", check=False), "db upgrade")


# -- the removal guard and alerts under serve -----------------------------------------------------


def test_serve_holds_a_broken_source_alerts_once_and_unholds_when_it_recovers(
    make_site: SiteFactory, sqlite_url: str, receiver: Receiver
) -> None:
    """On schedule, every 2 s: a source returning nobody is held run after run (each recorded),
    nothing is sent, one alert is posted (not one per run: repeat_after), and the audience
    goes on by itself once the source is back."""
    rx = receiver
    users = [f"u{i:03d}" for i in range(150)]
    with Receiver() as hook:
        site = make_site(
            sqlite_url,
            users,
            workflow_urls=[rx.url("w1")],
            extra=f'[alerts]\nwebhook_urls = ["{hook.url("hook/t0ken")}"]\n',
        )
        site.create(NAME_A, SQL, "2s")
        with site.serve() as serve:
            wait_until(lambda: len(traits_of(rx, KEY_A)) == 150, "the initial sync", 20, serve)
            sent = len(rx.accepted("w1"))
            site.set_users([])
            wait_until(
                lambda: len([r for r in site.runs(KEY_A) if r.status == "held"]) >= 3,
                "three held runs",
                30,
                serve,
            )
            assert len(rx.accepted("w1")) == sent
            held_alerts = [r.json for r in hook.requests() if r.json["event"] == "run_held"]
            assert len(held_alerts) == 1 and held_alerts[0]["audience_key"] == KEY_A

            site.set_users(users[:140])  # back, with ten real exits
            wait_until(
                lambda: traits_of(rx, KEY_A).get("u145") is False, "the exits sent", 20, serve
            )
            assert site.runs(KEY_A)[-1].status in ("succeeded", "running")
            wait_until(
                lambda: any(r.json["event"] == "resolved" for r in hook.requests()),
                "the resolved alert",
                20,
                serve,
            )
        assert "t0ken" not in serve.read_stdout() + serve.read_stderr()
