"""The measured child of the peak-RSS benchmark (``bench/peak_rss.py``).

    python -m bench.rss_child [--commit-only] SETTINGS AUDIENCE_KEY DELIVER_SECONDS

Imports only syncer and the standard library, so its RSS is syncer's. Prints one JSON object.
``--commit-only`` (the diff path's child, ``bench/diff_path.py``): the run's steps 2-4 and no
delivery; the run is finished as succeeded and its id reported, for the caller to undo.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time


def _peak_mb() -> float:
    """``VmHWM`` of this process (``ru_maxrss`` would include the parent's peak: see
    bench/processes.py)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def commit_only(settings_path: str, key: str) -> dict[str, object]:
    """Run in the measured process: syncer's steps 2-4 (evaluate, stage, diff, commit)."""
    from syncer import audiences, db, sync
    from syncer.delivery import register_destinations
    from syncer.models import RUN_SUCCEEDED
    from syncer.settings import load_settings

    after_imports = _peak_mb()
    settings = load_settings(settings_path)
    state = db.open_state(settings.database.url)
    view = audiences.get(state, key)
    targets = register_destinations(state, settings.tray.workflow_urls)
    run_id, _kind = sync.start_run(state, view.id)
    started = time.perf_counter()
    staged, changes = sync.evaluate_and_commit(state, settings, view, run_id, targets)
    commit_seconds = time.perf_counter() - started
    sync.finish_run(state, run_id, RUN_SUCCEEDED)
    state.dispose()
    return {
        "run_id": run_id,
        "members": staged.members,
        "added": changes.added,
        "removed": changes.removed,
        "evaluate_commit_seconds": round(commit_seconds, 2),
        "peak_rss_mb_after_imports": round(after_imports, 1),
        "peak_rss_mb_at_end": round(_peak_mb(), 1),
    }


def child(settings_path: str, key: str, deliver_seconds: float) -> dict[str, object]:
    """Run in the measured process: syncer's steps 2-5 for one audience, then report."""
    from syncer import audiences, db, sync
    from syncer.delivery import Audience, deliver_audience, register_destinations
    from syncer.models import RUN_INTERRUPTED
    from syncer.settings import load_settings

    after_imports = _peak_mb()
    settings = load_settings(settings_path)
    state = db.open_state(settings.database.url)
    view = audiences.get(state, key)
    targets = register_destinations(state, settings.tray.workflow_urls)
    run_id, _kind = sync.start_run(state, view.id)
    started = time.perf_counter()
    staged, changes = sync.evaluate_and_commit(state, settings, view, run_id, targets)
    commit_seconds = time.perf_counter() - started
    after_commit = _peak_mb()
    stop = threading.Event()
    timer = threading.Timer(deliver_seconds, stop.set)
    timer.start()
    started = time.perf_counter()
    totals = asyncio.run(
        deliver_audience(
            state, Audience(id=view.id, key=view.key), targets, settings.tray, stop=stop
        )
    )
    delivery_seconds = time.perf_counter() - started
    timer.cancel()
    sync.finish_run(state, run_id, RUN_INTERRUPTED)
    state.dispose()
    return {
        "members": staged.members,
        "added": changes.added,
        "evaluate_commit_seconds": round(commit_seconds, 2),
        "delivery_seconds": round(delivery_seconds, 2),
        "sent": totals.sent,
        "peak_rss_mb_after_imports": round(after_imports, 1),
        "peak_rss_mb_after_commit": round(after_commit, 1),
        "peak_rss_mb_at_end": round(_peak_mb(), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the measured child of the peak-RSS benchmark")
    parser.add_argument("settings")
    parser.add_argument("key")
    parser.add_argument("deliver_seconds", type=float)
    parser.add_argument("--commit-only", action="store_true", help="no delivery (diff path)")
    args = parser.parse_args(argv)
    if args.commit_only:
        print(json.dumps(commit_only(args.settings, args.key)))
    else:
        print(json.dumps(child(args.settings, args.key, args.deliver_seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
