"""Peak RSS of a syncer process for a large initial snapshot.

Delivering 10M calls would take hours on this machine, so the child process
(``python -m bench.rss_child``, running syncer's own functions) does what ``syncer sync`` does for
a new audience: evaluate + stage + diff + commit the whole snapshot (and its backfill outbox),
then delivers for ``deliver_seconds`` before a shutdown stops it (what was not sent stays
owed). Reported: the child's peak RSS (``VmHWM``) after start-up (imports), after the commit,
and at the end, and how many calls it made. Nothing proportional to audience
size should live in Python, so the three should stay close whatever the size.

The warehouse is a separate SQLite file (the streamed path: ids pass through Python).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from bench import data
from bench.databases import Databases
from bench.processes import ReceiverProcess, run_checked, syncer_project

AUDIENCE_NAME = "Bench Peak Rss"
AUDIENCE_KEY = "bench_peak_rss"


@dataclass(frozen=True, kw_only=True)
class Result:
    kind: str
    size: int
    report: dict[str, object]
    wall_seconds: float
    peak_rss_mb: float  # the child's VmHWM, polled by the parent

    def as_json(self) -> dict[str, object]:
        return {
            "state": self.kind,
            "size": self.size,
            "wall_seconds": round(self.wall_seconds, 1),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            **self.report,
        }


def measure(
    dbs: Databases,
    kinds: list[str],
    *,
    size: int,
    deliver_seconds: float,
    say: Callable[[str], None] = print,
) -> list[Result]:
    warehouse = dbs.workdir / "rss_warehouse.db"
    say(f"    rss: building a warehouse of {size:,} ids …")
    data.fill_sqlite_source(str(warehouse), size, ("members",))
    results = []
    with ReceiverProcess(dbs.workdir) as receiver:
        for kind in kinds:
            state = dbs.make(kind, f"rss_{kind[:2]}")
            project = syncer_project(
                dbs.workdir / f"rss-{kind}",
                state.url,
                warehouse,
                receiver.url("rss-" + kind),
                AUDIENCE_NAME,
            )
            say(
                f"    rss {kind:10} {size:>10,}: evaluate + commit, then {deliver_seconds:.0f}s of delivery …"
            )
            finished = run_checked(
                [
                    "-m",
                    "bench.rss_child",
                    str(project.settings),
                    AUDIENCE_KEY,
                    str(deliver_seconds),
                ],
                cwd=project.folder,
            )
            report = json.loads(finished.stdout)
            if report["members"] != size:
                raise AssertionError(f"rss child staged {report['members']} of {size}")
            result = Result(
                kind=kind,
                size=size,
                report=report,
                wall_seconds=finished.seconds,
                peak_rss_mb=finished.peak_rss_mb,
            )
            say(
                f"    rss {kind:10} {size:>10,}: peak {result.peak_rss_mb:.0f} MB "
                f"(after imports {report['peak_rss_mb_after_imports']} MB, "
                f"after commit {report['peak_rss_mb_after_commit']} MB), "
                f"commit {report['evaluate_commit_seconds']}s"
            )
            results.append(result)
            dbs.drop(state)
    warehouse.unlink(missing_ok=True)
    return results
