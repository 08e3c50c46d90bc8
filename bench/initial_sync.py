"""Initial sync end to end: ``python -m syncer sync`` in a subprocess, for real.

The warehouse is a separate SQLite file (``members(user_id)``, ``size`` ids); the state database
is SQLite or PostgreSQL; the one workflow URL is the loopback receiver. Set-up
(``db upgrade``, ``audience create``) runs before the clock starts. Measured: the wall time of
``syncer sync`` (process start to exit), its peak RSS and CPU time; from ``sync_runs``, how long
evaluate + stage + diff + commit took (``started_at`` → ``committed_at``) and delivery
(``committed_at`` → ``finished_at``), hence calls per second. The receiver must have got
exactly ``size`` calls.

For sizes under 1M the table also shows a **projection** to 1M (evaluate + commit scaled
linearly, delivery at the measured rate, plus start-up): a projection, not a measurement.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import make_url

from bench import data
from bench.databases import Databases
from bench.processes import ReceiverProcess, run_checked, syncer_project
from syncer import db
from syncer.models import SyncRun

AUDIENCE_NAME = "Bench Initial"
AUDIENCE_KEY = "bench_initial"
ONE_MILLION = 1_000_000


@dataclass(frozen=True, kw_only=True)
class Result:
    kind: str
    size: int
    wall_seconds: float
    commit_seconds: float  # evaluate + stage + diff + commit, from sync_runs
    delivery_seconds: float
    startup_seconds: float  # wall time outside the run itself (imports, settings, leases)
    sent: int
    peak_rss_mb: float
    cpu_seconds: float

    @property
    def calls_per_second(self) -> float:
        return self.sent / self.delivery_seconds if self.delivery_seconds else 0.0

    @property
    def projected_1m_seconds(self) -> float:
        scale = ONE_MILLION / self.size
        return (
            self.startup_seconds
            + self.commit_seconds * scale
            + ONE_MILLION / max(self.calls_per_second, 1e-9)
        )

    def as_json(self) -> dict[str, object]:
        return {
            "state": self.kind,
            "size": self.size,
            "wall_seconds": round(self.wall_seconds, 2),
            "evaluate_commit_seconds": round(self.commit_seconds, 2),
            "delivery_seconds": round(self.delivery_seconds, 2),
            "startup_seconds": round(self.startup_seconds, 2),
            "sent": self.sent,
            "calls_per_second": round(self.calls_per_second, 1),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "cpu_seconds": round(self.cpu_seconds, 1),
            "projected_1m_seconds": (
                None if self.size >= ONE_MILLION else round(self.projected_1m_seconds, 1)
            ),
        }


def measure(
    dbs: Databases, kinds: list[str], *, size: int, say: Callable[[str], None] = print
) -> list[Result]:
    warehouse = dbs.workdir / "initial_warehouse.db"
    data.fill_sqlite_source(str(warehouse), size, ("members",))
    results = []
    with ReceiverProcess(dbs.workdir) as receiver:
        for kind in kinds:
            results.append(_one(dbs, kind, size, warehouse, receiver, say))
    warehouse.unlink(missing_ok=True)
    return results


def _one(
    dbs: Databases,
    kind: str,
    size: int,
    warehouse: Path,
    receiver: ReceiverProcess,
    say: Callable[[str], None],
) -> Result:
    state = dbs.make(kind, f"initial_{kind[:2]}")
    project = syncer_project(
        dbs.workdir / f"initial-{kind}",
        state.url,
        warehouse,
        receiver.url("initial-" + kind),
        AUDIENCE_NAME,
    )
    before = receiver.requests()
    say(f"    initial {kind:10} {size:>10,}: running syncer sync …")
    finished = run_checked([*project.cli, "sync", AUDIENCE_KEY, "--json"], cwd=project.folder)
    arrived = receiver.requests() - before
    (run,) = json.loads(finished.stdout)
    if run["status"] != "succeeded" or run["sent"] != size or arrived != size:
        raise AssertionError(f"initial sync incomplete: {run}, receiver got {arrived}")
    engine = db.open_state(make_url(state.url))
    try:
        with engine.connect() as conn:
            started, committed, ended = conn.execute(
                select(SyncRun.started_at, SyncRun.committed_at, SyncRun.finished_at).where(
                    SyncRun.id == run["run_id"]
                )
            ).one()
    finally:
        engine.dispose()
    assert started and committed and ended, "the run has no commit or finish time"
    result = Result(
        kind=kind,
        size=size,
        wall_seconds=finished.seconds,
        commit_seconds=(committed - started).total_seconds(),
        delivery_seconds=(ended - committed).total_seconds(),
        startup_seconds=finished.seconds - (ended - started).total_seconds(),
        sent=int(run["sent"]),
        peak_rss_mb=finished.peak_rss_mb,
        cpu_seconds=finished.cpu_seconds,
    )
    say(
        f"    initial {kind:10} {size:>10,}: {result.wall_seconds:.1f}s wall, "
        f"{result.calls_per_second:.0f} calls/s, peak RSS {result.peak_rss_mb:.0f} MB"
    )
    dbs.drop(state)
    return result
