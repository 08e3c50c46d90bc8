"""Timing helpers: repeat a measurement, keep every sample, summarise with best and median."""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Samples:
    """Seconds of repeated runs of one thing (plus, optionally, named parts of each run)."""

    seconds: list[float] = field(default_factory=list)
    parts: list[dict[str, float]] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def best_parts(self) -> dict[str, float]:
        """The parts of the fastest run."""
        if not self.parts:
            return {}
        return self.parts[self.seconds.index(self.best)]

    def as_json(self) -> dict[str, object]:
        return {
            "seconds": [round(s, 4) for s in self.seconds],
            "best": round(self.best, 4),
            "median": round(self.median, 4),
            "best_parts": {k: round(v, 4) for k, v in self.best_parts().items()},
        }


@contextlib.contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    started = time.perf_counter()
    ended: list[float] = []
    yield lambda: (ended[0] if ended else time.perf_counter()) - started
    ended.append(time.perf_counter())


def profile_to(path: Path, fn: Callable[[], object], *, top: int = 30) -> None:
    """Run ``fn`` under cProfile; write the top functions by cumulative and by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        fn()
    finally:
        profiler.disable()
    out = io.StringIO()
    for order in ("cumulative", "tottime"):
        out.write(f"=== sorted by {order} ===\n")
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(order).print_stats(top)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(out.getvalue())


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


@contextlib.contextmanager
def statement_log(path: Path, *, slowest: int = 25) -> Iterator[None]:
    """Time every SQL statement any SQLAlchemy engine runs in the block; write the slowest."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    timings: list[tuple[float, str, str]] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        conn.info.setdefault("bench_started", []).append(time.perf_counter())

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        started = conn.info["bench_started"].pop()
        one_line = " ".join(statement.split())
        timings.append((time.perf_counter() - started, conn.engine.dialect.name, one_line))

    event.listen(Engine, "before_cursor_execute", before)
    event.listen(Engine, "after_cursor_execute", after)
    try:
        yield
    finally:
        event.remove(Engine, "before_cursor_execute", before)
        event.remove(Engine, "after_cursor_execute", after)
        total = sum(t for t, _, _ in timings)
        lines = [f"{len(timings)} statements, {total:.3f}s in all; slowest first:"]
        for seconds, dialect, statement in sorted(timings, reverse=True)[:slowest]:
            lines.append(f"{seconds:8.3f}s  [{dialect}] {statement[:400]}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
