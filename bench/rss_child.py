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
from dataclasses import dataclass
from typing import Any


def _peak_mb() -> float:
    """``VmHWM`` of this process (``ru_maxrss`` would include the parent's peak: see
    bench/processes.py)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class _Committed:
    """A run's steps 2-4 done in this process, and what the rest of it needs."""

    state: Any
    settings: Any
    view: Any
    targets: Any
    run_id: int
    staged: Any
    changes: Any
    commit_seconds: float
    after_imports: float


def _evaluate_and_commit(settings_path: str, key: str) -> _Committed:
    """Syncer's steps 2-4 (evaluate, stage, diff, commit) for one audience; syncer imported
    here, so that the peak after its imports can be told apart."""
    from syncer import audiences, db, sync
    from syncer.delivery import register_destinations
    from syncer.settings import load_settings

    after_imports = _peak_mb()
    settings = load_settings(settings_path)
    state = db.open_state(settings.database.url)
    view = audiences.get(state, key)
    targets = register_destinations(state, settings.tray.workflow_urls)
    run_id, _kind = sync.start_run(state, view.id)
    started = time.perf_counter()
    staged, changes = sync.evaluate_and_commit(state, settings, view, run_id, targets)
    return _Committed(
        state=state,
        settings=settings,
        view=view,
        targets=targets,
        run_id=run_id,
        staged=staged,
        changes=changes,
        commit_seconds=time.perf_counter() - started,
        after_imports=after_imports,
    )


def commit_only(settings_path: str, key: str) -> dict[str, object]:
    """Run in the measured process: syncer's steps 2-4 (evaluate, stage, diff, commit)."""
    from syncer import sync
    from syncer.models import RUN_SUCCEEDED

    run = _evaluate_and_commit(settings_path, key)
    sync.finish_run(run.state, run.run_id, RUN_SUCCEEDED)
    run.state.dispose()
    return {
        "run_id": run.run_id,
        "members": run.staged.members,
        "added": run.changes.added,
        "removed": run.changes.removed,
        "evaluate_commit_seconds": round(run.commit_seconds, 2),
        "peak_rss_mb_after_imports": round(run.after_imports, 1),
        "peak_rss_mb_at_end": round(_peak_mb(), 1),
    }


def child(settings_path: str, key: str, deliver_seconds: float) -> dict[str, object]:
    """Run in the measured process: syncer's steps 2-5 for one audience, then report."""
    from syncer import sync
    from syncer.delivery import Audience, deliver_audience
    from syncer.models import RUN_INTERRUPTED

    run = _evaluate_and_commit(settings_path, key)
    after_commit = _peak_mb()
    stop = threading.Event()
    timer = threading.Timer(deliver_seconds, stop.set)
    timer.start()
    started = time.perf_counter()
    totals = asyncio.run(
        deliver_audience(
            run.state,
            Audience(id=run.view.id, key=run.view.key),
            run.targets,
            run.settings.tray,
            stop=stop,
        )
    )
    delivery_seconds = time.perf_counter() - started
    timer.cancel()
    sync.finish_run(run.state, run.run_id, RUN_INTERRUPTED)
    run.state.dispose()
    return {
        "members": run.staged.members,
        "added": run.changes.added,
        "evaluate_commit_seconds": round(run.commit_seconds, 2),
        "delivery_seconds": round(delivery_seconds, 2),
        "sent": totals.sent,
        "peak_rss_mb_after_imports": round(run.after_imports, 1),
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
