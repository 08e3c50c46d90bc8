"""``kill -9`` of ``syncer sync`` at random moments of a large run, again and again.

tests/e2e/test_crash.py kills once at chosen points; here the moments are drawn at random
(seeded) between 0.2 s and the time a full run takes on this machine (measured first), so they
land anywhere: during start-up, the query, the commit, delivery or the finish. Each round adds
as many users again, so every run has a large change set of its own to commit and send besides
what the killed one left owed. Rounds go on until five of them were killed (a round that
finished before its moment is not a kill); then one ``syncer sync`` runs to completion. Then:

- zero lost changes: every user's trait is true at the receiver;
- no run is left 'running' in history;
- duplicates are the calls in flight (or answered but not yet recorded) at each kill: the
  messages a kill's round got accepted that a later round sent again number at most
  3 x max_concurrency (the bound docs/delivery.md gives), and a repeat is always the same
  message (same messageId).
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from tests.e2e.conftest import Project
from tests.helpers import TEST_SECRET, start_cli
from tests.receiver import ReceiverProcess

SEED = 20261122
USERS_PER_ROUND = 2000
KILLS = 5
MAX_ROUNDS = 9
CONCURRENCY = 16
MAX_DUPLICATES_PER_KILL = 3 * CONCURRENCY  # docs/delivery.md: "at most about three rounds"
NAME, KEY = "Kill Points", "kill_points"
CALIBRATION_NAME, CALIBRATION_KEY = "Kill Points Calibration", "kill_points_calibration"
SQL = "SELECT user_id FROM users"
SETTLE_SECONDS = 0.3  # calls already on the wire at the kill reach the receiver meanwhile


def user_ids(count: int) -> list[str]:
    return [f"user-{i:05d}" for i in range(count)]


@dataclass(frozen=True, kw_only=True)
class Round:
    number: int
    delay: float
    killed: bool
    exit_code: int
    first_record: int  # index into the receiver's records where this round's calls begin
    end_record: int


def _message_ids(records: list[dict[str, Any]], path: str) -> list[str]:
    return [
        r["body"]["messageId"]
        for r in records
        if r["path"] == path and r["status"] == 200 and isinstance(r["body"], dict)
    ]


def test_kill_9_at_random_moments_loses_nothing(
    tmp_path: Path, sqlite_url: str, project_factory: Callable[..., Project]
) -> None:
    rng = random.Random(SEED)
    state = create_engine(sqlite_url)
    try:
        with ReceiverProcess(tmp_path / "received.jsonl", secret=TEST_SECRET) as rx:
            p = project_factory(
                sqlite_url,
                user_ids(USERS_PER_ROUND),
                workflow_urls=[rx.url("w1")],
                shared_secret=TEST_SECRET,
                tray={"max_concurrency": CONCURRENCY},
            )
            calibration = p.write_settings(
                "calibration.toml",
                workflow_urls=[rx.url("calibration")],
                shared_secret=TEST_SECRET,
                tray={"max_concurrency": CONCURRENCY},
            )
            p.cli("db", "upgrade")
            p.cli_many(
                ("audience", "create", NAME, "--sql", SQL),
                ("audience", "create", CALIBRATION_NAME, "--sql", SQL),
            )

            # a full run of the same size, start-up included: the range of kill moments
            started = time.monotonic()
            p.cli("sync", CALIBRATION_KEY, settings=calibration)
            full_run = time.monotonic() - started
            assert len(rx.records("calibration")) == USERS_PER_ROUND

            rounds: list[Round] = []
            members = USERS_PER_ROUND
            for number in range(1, MAX_ROUNDS + 1):
                if sum(r.killed for r in rounds) == KILLS:
                    break
                if number > 1:
                    members += USERS_PER_ROUND  # a change set of its own for this run
                    p.set_users(user_ids(members))
                delay = rng.uniform(0.2, full_run)
                first_record = len(rx.records())
                with start_cli("sync", KEY, settings=p.settings, env=p.env) as syncer:
                    try:
                        code = syncer.wait(timeout=delay)
                    except subprocess.TimeoutExpired:
                        syncer.send_signal(signal.SIGKILL)
                        code = syncer.wait(timeout=10)
                    if code != -signal.SIGKILL:
                        assert code == 0, syncer.read_stdout() + syncer.read_stderr()
                time.sleep(SETTLE_SECONDS)
                rounds.append(
                    Round(
                        number=number,
                        delay=delay,
                        killed=code == -signal.SIGKILL,
                        exit_code=code,
                        first_record=first_record,
                        end_record=len(rx.records()),
                    )
                )

            final_start = len(rx.records())
            final = p.cli("sync", KEY)
            records = rx.records()
        with state.connect() as conn:
            runs = conn.execute(
                text(
                    "SELECT r.id, r.status FROM sync_runs r JOIN audiences a "
                    "ON a.id = r.audience_id WHERE a.key = :key ORDER BY r.id"
                ),
                {"key": KEY},
            ).all()
    finally:
        state.dispose()

    report = [
        f"full run {full_run:.2f}s; round {r.number}: "
        + (f"killed after {r.delay:.2f}s" if r.killed else f"finished within {r.delay:.2f}s")
        + f", {r.end_record - r.first_record} calls"
        for r in rounds
    ]
    print("\n" + "\n".join(report))
    assert sum(r.killed for r in rounds) == KILLS, report
    assert final.returncode == 0 and "succeeded" in final.stdout, final.stdout

    # every call signed and accepted; zero lost changes
    mine = [r for r in records if r["path"] == "/w1"]
    assert all(r["status"] == 200 and r["signature_ok"] is True for r in mine)
    truth = set(user_ids(members))
    told: dict[str, set[object]] = {}
    for record in mine:
        body = record["body"]
        assert body["type"] == "identify" and body["traits"] == {KEY: True}, body
        told.setdefault(body["userId"], set()).add(body["messageId"])
    assert set(told) == truth, f"{len(truth - set(told))} users never told"
    # one change per user: every repeat is the same message, so Tray can dedupe it
    assert all(len(ids) == 1 for ids in told.values()), [u for u, i in told.items() if len(i) > 1]

    # no run left 'running'; the killed ones are closed as interrupted
    assert runs and all(run.status != "running" for run in runs), runs
    assert runs[-1].status == "succeeded"

    # duplicates per kill: what its round got accepted and a later round sent again
    later_counts = Counter(_message_ids(records[final_start:], "/w1"))
    repeated: dict[int, int] = {}
    for r in reversed(rounds):
        within = Counter(_message_ids(records[r.first_record : r.end_record], "/w1"))
        assert max(within.values(), default=1) == 1, f"round {r.number} sent a message twice"
        repeated[r.number] = sum(1 for m in within if later_counts[m])
        later_counts.update(within)
    print("sent again after each round:", dict(sorted(repeated.items())))
    for r in rounds:
        if not r.killed:
            assert repeated[r.number] == 0, f"round {r.number} finished, yet some were sent again"
    too_many = {n: k for n, k in repeated.items() if k > MAX_DUPLICATES_PER_KILL}
    assert not too_many, (
        f"messages sent again after a kill, by round: {too_many} "
        f"(bound {MAX_DUPLICATES_PER_KILL} = 3 x max_concurrency)\n" + "\n".join(report)
    )
    total = Counter(_message_ids(records, "/w1"))
    assert sum(n - 1 for n in total.values()) == sum(repeated.values())
