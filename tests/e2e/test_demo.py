"""``syncer demo`` end to end: the whole flow in one command, rebuilt on every run."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.conftest import assert_usage_error
from tests.helpers import cli_env, run_cli

DEMO_SECONDS = 60


def _demo(directory: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncer", "demo", "--dir", str(directory)],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=DEMO_SECONDS + 30,
        check=False,
    )


def _history_rows(stdout: str) -> list[list[str]]:
    """The rows of the history table the demo prints (header and heading left out)."""
    lines = stdout.split("history (syncer history):\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert lines[0].startswith("RUN"), stdout
    return [line.split() for line in lines[1:]]


def _check_demo_output(result: subprocess.CompletedProcess[str], seconds: float) -> None:
    shown = f"exit {result.returncode}\n--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    assert result.returncode == 0, shown
    assert seconds < DEMO_SECONDS, f"demo took {seconds:.1f}s"
    assert "Traceback" not in result.stderr, shown
    rows = _history_rows(result.stdout)
    # RUN AUDIENCE KIND STATUS DATE TIME SECONDS MEMBERS ADDED REMOVED SENT FAILED
    assert len(rows) == 4, shown
    assert sorted(row[2] for row in rows) == ["incremental"] * 2 + ["initial"] * 2, shown
    assert all(row[3] == "succeeded" and row[-1] == "0" for row in rows), shown
    assert [row[2] for row in rows[:2]] == ["incremental"] * 2, "history is newest first"
    assert "signatures that did not match: 0" in result.stdout, shown
    # the receiver got exactly the changes history reports: one call per user who entered or left
    got = dict.fromkeys(["true", "false"], 0)
    for line in result.stdout.split("what the receiver got:\n", 1)[1].splitlines():
        count, _, call = line.strip().partition(" x ")
        if call:
            got[call.rsplit(" = ", 1)[1]] += int(count)
    assert got["true"] == sum(int(row[8]) for row in rows), shown
    assert got["false"] == sum(int(row[9]) for row in rows), shown


def test_demo_runs_and_reruns(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    started = time.monotonic()
    first = _demo(folder, tmp_path)
    _check_demo_output(first, time.monotonic() - started)

    stale = folder / "left-from-last-time.txt"
    stale.write_text("the demo folder is rebuilt on every run\n")
    started = time.monotonic()
    second = _demo(folder, tmp_path)
    _check_demo_output(second, time.monotonic() - started)
    assert not stale.exists(), "the demo folder was not rebuilt"

    # the demo leaves a working settings file: its history is there to inspect
    history = run_cli("history", "--json", settings=folder / "settings.toml", check=True)
    runs = json.loads(history.stdout)
    assert len(runs) == 4  # the first run's four are gone with the rebuilt folder
    assert {run["kind"] for run in runs} == {"initial", "incremental"}


def test_the_demo_receiver_answers_every_call_the_first_time(tmp_path: Path) -> None:
    """The local receiver keeps up with 64 connections opened at once: no call times out and
    is sent again (a listen backlog of 5 once made some wait seconds for their handshake)."""
    folder = tmp_path / "d"
    result = _demo(folder, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "repeated calls (same messageId, dropped): 0" in result.stdout, result.stdout
    with sqlite3.connect(folder / "state.db") as conn:
        attempts = conn.execute("SELECT attempts, COUNT(*) FROM deliveries GROUP BY 1").fetchall()
    assert [a for a, _ in attempts] == [1], attempts


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    precious = folder / "notes.txt"
    precious.write_text("not the demo's to delete\n")
    result = _demo(folder, tmp_path)
    assert_usage_error(result, str(folder))
    assert precious.read_text() == "not the demo's to delete\n"
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
