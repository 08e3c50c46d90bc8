"""Diff path: an incremental run's evaluate + stage + diff + commit against bare SQL.

For each state database (SQLite, PostgreSQL), source placement (``same``: the audience table
lives in the state database, syncer's ``INSERT … SELECT`` path; ``other``: a separate
database of the same kind, syncer's streamed path; ``duckdb``: a DuckDB file, the streamed path
from DuckDB's cursor) and size:

- the state holds a committed previous snapshot ``v1`` (written straight into ``memberships``,
  plus ``audience_destinations`` so the run queues changes, not a backfill);
- **syncer**: ``syncer.sync.evaluate_and_commit`` on ``SELECT user_id FROM members_v2``, with
  ``syncer.diff.stage`` / ``compute`` / ``commit_snapshot`` timed on the way; afterwards the
  run is undone (outside the clock) so every repetition starts from the same state;
- **baseline**: the bare SQL on the same database: a staging table, the fastest load (SQLite
  ``INSERT … SELECT`` or ``executemany`` into a ``WITHOUT ROWID`` table; PostgreSQL
  ``INSERT … SELECT`` or ``COPY`` into a table without index, then the key; from a separate
  source, its driver's ``fetchmany``: sqlite3, a psycopg server-side cursor, or the DuckDB
  file opened read-only), the two
  anti-joins (``LEFT JOIN … IS NULL``) into a changes table, against
  ``bench_prev(user_id PRIMARY KEY)`` holding ``v1``;
- **baseline_m**: the bare SQL against syncer's ``memberships`` (the audience's current rows),
  the differences in the form syncer uses on that database (``SYNCER_FORM``): what is left
  between it and syncer is syncer's code, not its table layout;
- **baseline_x**: the baseline with the two differences written as ``EXCEPT … ORDER BY`` (what
  syncer runs on SQLite, where it is a merge): the floor for the same set work.

All run ``reps`` times, interleaved (the order alternates), and the best of each is compared.
The ``duckdb`` placement runs syncer and the baseline only (baseline_m and baseline_x differ from
the baseline in the diff statements alone, which ``other`` already measures on the same state),
plus one more syncer run in a child process (``bench.rss_child --commit-only``) for its peak RSS.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import psycopg
from sqlalchemy import Engine, insert, text, update
from sqlalchemy.engine import make_url

from bench import data
from bench.databases import Database, Databases, checkpoint
from bench.processes import run_checked
from bench.timing import Samples, profile_to, statement_log, stopwatch
from syncer import audiences, db, diff, sync
from syncer.delivery import Target, register_destinations
from syncer.models import RUN_SUCCEEDED, AudienceDestination, SyncRun
from syncer.settings import Settings, parse_settings

logger = logging.getLogger(__name__)

AUDIENCE_NAME = "Bench Diff"
AUDIENCE_SQL = "SELECT user_id FROM members_v2"
UNUSED_URL = "http://127.0.0.1:9/bench-diff"  # never called: the diff path does not deliver
STREAM_BATCH = 10_000
PLACEMENTS = ("same", "other", "duckdb")
SYNCER_FORM = {"sqlite": "except", "postgresql": "anti-join"}  # how syncer.diff.compute diffs


@dataclass(frozen=True, kw_only=True)
class Setup:
    """One state database with a committed ``v1`` snapshot, seen through one settings per
    placement: the audience's source is the state database itself (``same``), a separate one
    of the same kind (``other``) or a DuckDB file (``duckdb``); each holds ``members_v2``."""

    kind: str
    size: int
    state: Database
    source: Database | None  # the separate source database (placement "other")
    duckdb_path: Path | None  # the DuckDB file (placement "duckdb")
    settings: dict[str, Settings]  # by placement
    settings_files: dict[str, Path]  # by placement, for child processes
    engine: Engine
    audience: audiences.AudienceView
    targets: list[Target]


def prepare(dbs: Databases, kind: str, size: int, placements: Sequence[str] = PLACEMENTS) -> Setup:
    tag = f"diff_{kind[:2]}_{size}"
    state = dbs.make(kind, f"{tag}_state")
    source = dbs.make(kind, f"{tag}_source") if "other" in placements else None
    duckdb_path = dbs.workdir / f"{tag}_source.duckdb" if "duckdb" in placements else None
    db.upgrade(make_url(state.url))
    for database in filter(None, (state, source)):
        _fill_source(database, size, tables=("members_v2",))
    if duckdb_path is not None:
        duckdb_path.unlink(missing_ok=True)
        data.fill_duckdb_source(str(duckdb_path), size, ("members_v2",))
    sources = {"same": state.as_own_source("members_v2")}
    if source is not None:
        sources["other"] = {"url": source.url}
    if duckdb_path is not None:
        sources["duckdb"] = {"url": f"duckdb:///{duckdb_path}"}
    settings: dict[str, Settings] = {}
    settings_files: dict[str, Path] = {}
    for placement, source_settings in sources.items():
        raw: dict[str, dict[str, Any]] = {
            "database": {"url": state.url},
            "sources": {"default": source_settings},
            "tray": {"workflow_urls": [UNUSED_URL]},
        }
        settings[placement] = parse_settings(raw, base_dir=dbs.workdir)
        settings_files[placement] = dbs.workdir / f"{tag}_{placement}.toml"
        settings_files[placement].write_text(_toml(raw))
    engine = db.open_state(settings["same"].database.url)
    view = audiences.create(engine, settings["same"], name=AUDIENCE_NAME, sql=AUDIENCE_SQL)
    targets = register_destinations(engine, settings["same"].tray.workflow_urls)
    # The previous run, made by syncer's own start_run / finish_run; its snapshot written
    # straight into memberships (a real initial run would also queue a backfill).
    run_id, _kind = sync.start_run(engine, view.id)
    _fill_previous_snapshot(state, view.id, run_id, size)
    with db.write_transaction(engine) as conn:
        conn.execute(
            update(SyncRun)
            .where(SyncRun.id == run_id)
            .values(
                members=size, added=size, removed=0, skipped_ids=0, committed_at=datetime.now(UTC)
            )
        )
        for target in targets:
            conn.execute(
                insert(AudienceDestination).values(
                    audience_id=view.id, destination_id=target.id, since_run_id=run_id
                )
            )
    sync.finish_run(engine, run_id, RUN_SUCCEEDED)
    _analyze(state)
    return Setup(
        kind=kind,
        size=size,
        state=state,
        source=source,
        duckdb_path=duckdb_path,
        settings=settings,
        settings_files=settings_files,
        engine=engine,
        audience=view,
        targets=targets,
    )


def _toml(settings: dict[str, dict[str, Any]]) -> str:
    """Settings as a settings.toml (strings, lists of strings and one level of sub-tables;
    JSON's string escapes are TOML's)."""
    lines = []
    for section, values in settings.items():
        tables = {k: v for k, v in values.items() if isinstance(v, dict)}
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items() if k not in tables]
        for name, table in tables.items():
            lines.append(f"[{section}.{name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _fill_source(source: Database, size: int, *, tables: tuple[str, ...]) -> None:
    if source.kind == "sqlite":
        data.fill_sqlite_source(source.target, size, tables)
    else:
        data.fill_pg_source(source.target, size, tables)


def _fill_previous_snapshot(state: Database, audience_id: int, run_id: int, size: int) -> None:
    """``v1`` as syncer's committed snapshot (``memberships``) and as the baseline's
    ``bench_prev(user_id PRIMARY KEY)``."""
    if state.kind == "sqlite":
        conn = state.connect_sqlite()
        try:
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO memberships (audience_id, user_id, entered_run_id) VALUES (?, ?, ?)",
                ((audience_id, u, run_id) for u in data.v1_ids(size)),
            )
            conn.execute("CREATE TABLE bench_prev (user_id TEXT PRIMARY KEY) WITHOUT ROWID")
            conn.executemany(
                "INSERT INTO bench_prev (user_id) VALUES (?)", ((u,) for u in data.v1_ids(size))
            )
            conn.execute("COMMIT")
        finally:
            conn.close()
        return
    with state.connect_pg() as pg, pg.cursor() as cur:
        with cur.copy("COPY memberships (audience_id, user_id, entered_run_id) FROM STDIN") as cp:
            prefix = f"{audience_id}\t"
            suffix = f"\t{run_id}"
            for rows in data.chunks(data.v1_ids(size), data.COPY_CHUNK):
                cp.write(data.copy_text([prefix + u + suffix for u in rows]))
        cur.execute("CREATE TABLE bench_prev (user_id TEXT NOT NULL)")
        with cur.copy("COPY bench_prev (user_id) FROM STDIN") as cp:
            for rows in data.chunks(data.v1_ids(size), data.COPY_CHUNK):
                cp.write(data.copy_text(rows))
        cur.execute("ALTER TABLE bench_prev ADD PRIMARY KEY (user_id)")


def _analyze(state: Database) -> None:
    """PostgreSQL: what autovacuum and the checkpointer would have done by the next scheduled
    run, hours later: statistics, and every change written out (without the ``CHECKPOINT``, the
    first measurement shared the disk with the writing out of the whole setup, gigabytes at
    10M). SQLite: nothing (syncer never runs ANALYZE there, so neither does the benchmark)."""
    if state.kind == "postgresql":
        with state.connect_pg(autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        checkpoint()


# --- syncer ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _timed_steps(parts: dict[str, float]) -> Iterator[None]:
    """Time ``diff.stage`` / ``compute`` / ``commit_snapshot`` as ``sync.evaluate_and_commit``
    calls them (it reaches them through the ``diff`` module)."""
    originals = {name: getattr(diff, name) for name in ("stage", "compute", "commit_snapshot")}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with stopwatch() as elapsed:
                result = fn(*args, **kwargs)
            parts[name] = parts.get(name, 0.0) + elapsed()
            return result

        return wrapper

    for name, fn in originals.items():
        setattr(diff, name, timed(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(diff, name, fn)


def run_syncer(
    setup: Setup,
    placement: str,
    *,
    profile: Path | None = None,
    statements: Path | None = None,
) -> tuple[float, dict[str, float]]:
    """One incremental run's steps 2-4, timed; then undone. ``profile`` / ``statements``:
    write a cProfile report / the SQL statements' timings of the run there."""
    run_id, kind = sync.start_run(setup.engine, setup.audience.id)
    assert kind == "incremental", kind
    parts: dict[str, float] = {}
    result: list[tuple[diff.Staged, diff.Diff]] = []

    def work() -> None:
        result.append(
            sync.evaluate_and_commit(
                setup.engine, setup.settings[placement], setup.audience, run_id, setup.targets
            )
        )

    with (
        _timed_steps(parts),
        statement_log(statements) if statements else contextlib.nullcontext(),
        stopwatch() as elapsed,
    ):
        if profile is None:
            work()
        else:
            profile_to(profile, work)
    seconds = elapsed()
    staged, changes = result[0]
    joined, left = data.churn(setup.size)
    expected = setup.size - left + joined
    if (changes.added, changes.removed, staged.members) != (joined, left, expected):
        raise AssertionError(f"syncer diff wrong: {staged} {changes}, expected +{joined} -{left}")
    parts["other"] = seconds - sum(parts.values())
    sync.finish_run(setup.engine, run_id, RUN_SUCCEEDED)
    _undo_run(setup, run_id)
    return seconds, parts


def run_syncer_child(setup: Setup, placement: str) -> float:
    """One more incremental run, in a child process that imports only syncer
    (``python -m bench.rss_child --commit-only``): its peak RSS in MB (``VmHWM``, read by the
    child and polled by the parent; the larger). Then undone, as ``run_syncer``'s are."""
    finished = run_checked(
        [
            "-m",
            "bench.rss_child",
            "--commit-only",
            str(setup.settings_files[placement]),
            setup.audience.key,
            "0",
        ],
        cwd=setup.settings_files[placement].parent,
    )
    report = json.loads(finished.stdout)
    joined, left = data.churn(setup.size)
    expected = (setup.size - left + joined, joined, left)
    if (report["members"], report["added"], report["removed"]) != expected:
        raise AssertionError(f"syncer child diff wrong: {report}, expected {expected}")
    _undo_run(setup, int(report["run_id"]))
    return max(finished.peak_rss_mb, float(report["peak_rss_mb_at_end"]))


def _undo_run(setup: Setup, run_id: int) -> None:
    with db.write_transaction(setup.engine) as conn:
        params = {"run": run_id}
        conn.execute(text("DELETE FROM deliveries WHERE run_id = :run"), params)
        conn.execute(text("DELETE FROM memberships WHERE entered_run_id = :run"), params)
        conn.execute(
            text("UPDATE memberships SET exited_run_id = NULL WHERE exited_run_id = :run"), params
        )
        conn.execute(text("DELETE FROM sync_runs WHERE id = :run"), params)
    if setup.state.kind == "postgresql":
        _analyze(setup.state)  # the next run starts as the first did
    else:
        with setup.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


# --- baseline -------------------------------------------------------------------------------


def run_baseline(
    setup: Setup, placement: str, against: str = "prev", form: str = "anti-join"
) -> tuple[float, dict[str, float]]:
    """The bare SQL. ``against="prev"``: the previous snapshot as ``bench_prev(user_id PRIMARY
    KEY)``, the ideal layout; ``"memberships"``: syncer's own ``memberships`` (current rows of
    the audience), to separate the cost of syncer's code from the cost of its table layout.
    ``form``: the two differences as anti-joins (``LEFT JOIN … IS NULL``) or as ``EXCEPT``
    ordered by id (SQLite merges those, see ``syncer.diff.compute``)."""
    diff = _diff_statements(setup, against, form)
    if setup.kind == "sqlite":
        seconds, parts, counts = _baseline_sqlite(setup, placement, diff)
    else:
        seconds, parts, counts = _baseline_pg(setup, placement, diff)
    joined, left = data.churn(setup.size)
    if counts != (joined, left):
        raise AssertionError(f"baseline diff wrong: {counts}, expected +{joined} -{left}")
    return seconds, parts


def _diff_statements(setup: Setup, against: str, form: str) -> tuple[str, ...]:
    true, false, changes = (
        ("1", "0", "entered INTEGER NOT NULL) WITHOUT ROWID")
        if setup.kind == "sqlite"
        else ("true", "false", "entered BOOLEAN NOT NULL)")
    )
    if against == "prev":
        previous, current = "bench_prev p", ""
    else:
        previous = "memberships p"
        current = f"p.audience_id = {setup.audience.id} AND p.exited_run_id IS NULL"
    create = f"CREATE TEMP TABLE b_changes (user_id TEXT PRIMARY KEY, {changes}"
    if form == "except":
        where = f" WHERE {current}" if current else ""
        previous_ids = f"SELECT p.user_id FROM {previous}{where}"
        return (
            create,
            f"INSERT INTO b_changes SELECT user_id, {true} FROM "
            f"(SELECT user_id FROM b_staged EXCEPT {previous_ids} ORDER BY 1) x",
            f"INSERT INTO b_changes SELECT user_id, {false} FROM "
            f"({previous_ids} EXCEPT SELECT user_id FROM b_staged ORDER BY 1) x",
        )
    on_current = f" AND {current}" if current else ""
    and_current = f"{current} AND " if current else ""
    return (
        create,
        f"INSERT INTO b_changes SELECT s.user_id, {true} FROM b_staged s "
        f"LEFT JOIN {previous} ON p.user_id = s.user_id{on_current} WHERE p.user_id IS NULL",
        f"INSERT INTO b_changes SELECT p.user_id, {false} FROM {previous} "
        f"LEFT JOIN b_staged s ON s.user_id = p.user_id WHERE {and_current}s.user_id IS NULL",
    )


COUNT_CHANGES = "SELECT entered, count(*) FROM b_changes GROUP BY entered"


def _counts(rows: list[tuple[Any, ...]]) -> tuple[int, int]:
    found = {bool(entered): int(n) for entered, n in rows}
    return found.get(True, 0), found.get(False, 0)


@contextlib.contextmanager
def _source_batches(setup: Setup, placement: str) -> Iterator[Iterator[list[Any]]]:
    """The ids of a separate source, ``STREAM_BATCH`` rows at a time from its driver's
    ``fetchmany``, as a hand-written script reads them: a read-only sqlite3 connection, a
    psycopg server-side cursor, or the DuckDB file opened read-only."""
    query = "SELECT user_id FROM members_v2"
    if placement == "duckdb":
        assert setup.duckdb_path is not None
        with contextlib.closing(duckdb.connect(str(setup.duckdb_path), read_only=True)) as duck:
            cursor = duck.execute(query)
            yield iter(lambda: cursor.fetchmany(STREAM_BATCH), [])
        return
    assert setup.source is not None
    if setup.kind == "sqlite":
        uri = f"file:{setup.source.target}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as lite:
            rows = lite.execute(query)
            yield iter(lambda: rows.fetchmany(STREAM_BATCH), [])
        return
    with psycopg.connect(setup.source.target) as pg, pg.cursor(name="ids") as reader:
        reader.itersize = STREAM_BATCH
        reader.execute(query)
        yield iter(lambda: reader.fetchmany(STREAM_BATCH), [])


def _baseline_sqlite(
    setup: Setup, placement: str, diff: tuple[str, ...]
) -> tuple[float, dict[str, float], tuple[int, int]]:
    conn = setup.state.connect_sqlite()
    try:
        with stopwatch() as elapsed:
            conn.execute("BEGIN")
            conn.execute("CREATE TEMP TABLE b_staged (user_id TEXT PRIMARY KEY) WITHOUT ROWID")
            if placement == "same":
                conn.execute("INSERT OR IGNORE INTO b_staged SELECT user_id FROM members_v2")
            else:
                with _source_batches(setup, placement) as batches:
                    for rows in batches:
                        conn.executemany("INSERT OR IGNORE INTO b_staged VALUES (?)", rows)
            conn.execute("COMMIT")
            loaded = elapsed()
            conn.execute("BEGIN")
            for statement in diff:
                conn.execute(statement)
            conn.execute("COMMIT")
            counts = _counts(conn.execute(COUNT_CHANGES).fetchall())
        seconds = elapsed()
    finally:
        conn.close()
    return seconds, {"load": loaded, "diff": seconds - loaded}, counts


def _baseline_pg(
    setup: Setup, placement: str, diff: tuple[str, ...]
) -> tuple[float, dict[str, float], tuple[int, int]]:
    with setup.state.connect_pg() as conn, conn.cursor() as cur:
        with stopwatch() as elapsed:
            cur.execute("CREATE TEMP TABLE b_staged (user_id TEXT NOT NULL)")
            if placement == "same":
                cur.execute("INSERT INTO b_staged SELECT user_id FROM members_v2")
            else:
                with (
                    _source_batches(setup, placement) as batches,
                    cur.copy("COPY b_staged (user_id) FROM STDIN") as copy,
                ):
                    for rows in batches:
                        copy.write(data.copy_text([str(r[0]) for r in rows]))
            cur.execute("ALTER TABLE b_staged ADD PRIMARY KEY (user_id)")
            cur.execute("ANALYZE b_staged")
            conn.commit()
            loaded = elapsed()
            for statement in diff:
                cur.execute(statement)
            conn.commit()
            counts = _counts(cur.execute(COUNT_CHANGES).fetchall())
        seconds = elapsed()
    return seconds, {"load": loaded, "diff": seconds - loaded}, counts


# --- the comparison -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Result:
    kind: str
    placement: str
    size: int
    syncer: Samples
    baseline: Samples  # bare SQL against bench_prev (the ideal layout)
    # bare SQL in syncer's form against syncer's memberships; None for the duckdb placement
    baseline_memberships: Samples | None
    # bare SQL against bench_prev, the differences as ordered EXCEPT; None for duckdb
    baseline_except: Samples | None
    syncer_peak_rss_mb: float | None = None  # one more syncer run in a child (duckdb only)

    @property
    def ratio(self) -> float:
        return self.syncer.best / self.baseline.best

    @property
    def ratio_memberships(self) -> float | None:
        if self.baseline_memberships is None:
            return None
        return self.syncer.best / self.baseline_memberships.best

    @property
    def ratio_except(self) -> float | None:
        if self.baseline_except is None:
            return None
        return self.syncer.best / self.baseline_except.best

    def as_json(self) -> dict[str, object]:
        found: dict[str, object] = {
            "state": self.kind,
            "source": self.placement,
            "size": self.size,
            "syncer": self.syncer.as_json(),
            "baseline": self.baseline.as_json(),
            "ratio_best": round(self.ratio, 3),
            "ratio_median": round(self.syncer.median / self.baseline.median, 3),
            "syncer_seconds_per_million": round(self.syncer.best / self.size * 1e6, 3),
            "baseline_seconds_per_million": round(self.baseline.best / self.size * 1e6, 3),
        }
        if self.baseline_memberships is not None and self.ratio_memberships is not None:
            found["baseline_against_memberships"] = self.baseline_memberships.as_json()
            found["ratio_against_memberships_best"] = round(self.ratio_memberships, 3)
        if self.baseline_except is not None and self.ratio_except is not None:
            found["baseline_except"] = self.baseline_except.as_json()
            found["ratio_against_except_best"] = round(self.ratio_except, 3)
        if self.syncer_peak_rss_mb is not None:
            found["syncer_peak_rss_mb"] = round(self.syncer_peak_rss_mb, 1)
        return found


def measure(
    dbs: Databases,
    kind: str,
    size: int,
    *,
    reps: int,
    placements: Sequence[str] = PLACEMENTS,
    profile_dir: Path | None = None,
    say: Callable[[str], None] = print,
) -> list[Result]:
    """The placements on one prepared state database; syncer and baseline interleaved."""
    setup = prepare(dbs, kind, size, placements)
    results = []
    try:
        for placement in placements:
            runs: dict[str, Callable[[], tuple[float, dict[str, float]]]] = {
                "syncer": functools.partial(run_syncer, setup, placement),
                "baseline": functools.partial(run_baseline, setup, placement),
            }
            if placement != "duckdb":
                runs["baseline_m"] = functools.partial(
                    run_baseline, setup, placement, "memberships", SYNCER_FORM[kind]
                )
                runs["baseline_x"] = functools.partial(
                    run_baseline, setup, placement, form="except"
                )
            samples = {name: Samples() for name in runs}
            for rep in range(reps):
                order = list(runs)
                if rep % 2:
                    order.reverse()
                for name in order:
                    seconds, parts = runs[name]()
                    samples[name].seconds.append(seconds)
                    samples[name].parts.append(parts)
                    say(
                        f"    diff {kind:10} source={placement:6} {size:>10,} rep {rep + 1} "
                        f"{name:10} {seconds:7.3f}s"
                    )
            peak = None
            if placement == "duckdb":
                peak = run_syncer_child(setup, placement)
                say(
                    f"    diff {kind:10} source={placement:6} {size:>10,} syncer in a child: "
                    f"peak RSS {peak:.1f} MB"
                )
            if profile_dir is not None:
                name = f"diff-{kind}-{placement}-{size}"
                run_syncer(setup, placement, statements=profile_dir / f"{name}-sql.txt")
                run_syncer(setup, placement, profile=profile_dir / f"{name}-cprofile.txt")
            results.append(
                Result(
                    kind=kind,
                    placement=placement,
                    size=size,
                    syncer=samples["syncer"],
                    baseline=samples["baseline"],
                    baseline_memberships=samples.get("baseline_m"),
                    baseline_except=samples.get("baseline_x"),
                    syncer_peak_rss_mb=peak,
                )
            )
    finally:
        setup.engine.dispose()
        dbs.drop(setup.state)
        if setup.source is not None:
            dbs.drop(setup.source)
        if setup.duckdb_path is not None:
            setup.duckdb_path.unlink(missing_ok=True)
    return results
