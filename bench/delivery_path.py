"""Delivery path: identify calls per second from syncer's ``deliver_audience`` against raw
Python HTTP clients, all to the same loopback receiver (``bench.receiver``, its own process).

- **syncer**: ``syncer.delivery.deliver_audience`` draining ``n`` pending deliveries from a
  state database (SQLite or PostgreSQL), with the default ``max_concurrency``. The outbox is
  made by syncer itself (an initial run's backfill); between repetitions it is set back to
  pending, outside the clock.
- **aiohttp**: one ``aiohttp.ClientSession`` (connector limit = the same concurrency) posting
  the same bodies, prebuilt, from that many workers, on asyncio's event loop and on uvloop's
  (syncer's own loop where installed): the faster of the two is the baseline, the fastest raw
  Python client here.
- **syncer-http**: ``syncer.tray.TrayClient`` (``httpx.Request`` through syncer's own aiohttp
  transport), no database: what syncer's HTTP stack costs on its own.
- **httpx-aiohttp**: ``httpx.AsyncClient(transport=httpx_aiohttp.AiohttpTransport(...))``, no
  database: the general-purpose httpx transport on aiohttp.
- **httpx**: ``httpx.AsyncClient`` on its default transport, for reference (fewer calls: it is
  slow).

The receiver's CPU use is read from /proc for each measurement: near 100 % of one core would
mean the receiver, not the client, set the pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import uvloop
from httpx_aiohttp import AiohttpTransport
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from bench import data
from bench.databases import Database, Databases
from bench.processes import ReceiverProcess, cpu_seconds
from bench.timing import Samples, profile_to, statement_log
from syncer import audiences, db, loops, sync, workers
from syncer.delivery import Audience, Target, deliver_audience, register_destinations
from syncer.models import RUN_SUCCEEDED
from syncer.settings import DEFAULT_MAX_CONCURRENCY, TraySettings, parse_settings
from syncer.tray import TrayClient, identify_body, identify_message_id

HEADERS = {"Content-Type": "application/json", "User-Agent": "syncer-bench"}
HTTPX_DEFAULT_MAX_CALLS = 1_000


@dataclass
class Rate:
    """Calls per second of repeated runs (each run sends ``calls``)."""

    calls: int
    seconds: Samples = field(default_factory=Samples)
    receiver_cpu: list[float] = field(default_factory=list)  # share of one core, per run

    @property
    def best(self) -> float:
        return self.calls / self.seconds.best

    @property
    def median(self) -> float:
        return self.calls / self.seconds.median

    def as_json(self) -> dict[str, object]:
        return {
            "calls": self.calls,
            "calls_per_second_best": round(self.best, 1),
            "calls_per_second_median": round(self.median, 1),
            "receiver_cpu_share": [round(c, 3) for c in self.receiver_cpu],
            **self.seconds.as_json(),
        }


async def _run_workers(
    concurrency: int, bodies: list[bytes], post: Callable[[bytes], Awaitable[None]]
) -> None:
    it = iter(bodies)

    async def worker() -> None:
        for body in it:
            await post(body)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def aiohttp_client(url: str, bodies: list[bytes], concurrency: int) -> None:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post(body: bytes) -> None:
            async with session.post(url, data=body, headers=HEADERS) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"receiver answered {response.status}")

        await _run_workers(concurrency, bodies, post)


async def _httpx_client(
    client: httpx.AsyncClient, url: str, bodies: list[bytes], concurrency: int
) -> None:
    async with client:

        async def post(body: bytes) -> None:
            response = await client.post(url, content=body, headers=HEADERS)
            if response.status_code != 200:
                raise RuntimeError(f"receiver answered {response.status_code}")

        await _run_workers(concurrency, bodies, post)


def _limits(concurrency: int) -> httpx.Limits:
    return httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)


async def httpx_default_client(url: str, bodies: list[bytes], concurrency: int) -> None:
    client = httpx.AsyncClient(limits=_limits(concurrency), timeout=5.0)
    await _httpx_client(client, url, bodies, concurrency)


async def httpx_aiohttp_client(url: str, bodies: list[bytes], concurrency: int) -> None:
    client = httpx.AsyncClient(transport=AiohttpTransport(limits=_limits(concurrency)), timeout=5.0)
    await _httpx_client(client, url, bodies, concurrency)


async def syncer_http_client(url: str, bodies: list[bytes], concurrency: int) -> None:
    async with TrayClient(
        timeout_seconds=5.0, max_connections=concurrency, shared_secret=None
    ) as client:

        async def post(body: bytes) -> None:
            await client.post(url, body)

        await _run_workers(concurrency, bodies, post)


def _run_client(name: str, url: str, bodies: list[bytes], concurrency: int) -> None:
    client, runner = RAW_CLIENTS[name]
    runner(client(url, bodies, concurrency))


Client = Callable[[str, list[bytes], int], Coroutine[Any, Any, None]]
Runner = Callable[[Coroutine[Any, Any, None]], None]

# name: (client, the event loop it runs on). syncer's HTTP stack runs on syncer's own loop.
RAW_CLIENTS: dict[str, tuple[Client, Runner]] = {
    "aiohttp": (aiohttp_client, asyncio.run),
    "aiohttp-uvloop": (aiohttp_client, uvloop.run),
    "syncer-http": (syncer_http_client, loops.run),
    "httpx-aiohttp": (httpx_aiohttp_client, asyncio.run),
    "httpx": (httpx_default_client, asyncio.run),
}
BASELINES = ("aiohttp", "aiohttp-uvloop")


@dataclass(frozen=True, kw_only=True)
class Outbox:
    """A state database holding ``calls`` pending deliveries to one receiver URL."""

    database: Database
    engine: Engine
    audience: Audience
    targets: list[Target]
    tray: TraySettings
    run_id: int
    calls: int


def prepare(dbs: Databases, kind: str, calls: int, url: str) -> Outbox:
    """An audience of ``calls`` members whose initial run committed (its backfill is pending)."""
    database = dbs.make(kind, f"delivery_{kind[:2]}")
    db.upgrade(make_url(database.url))
    if kind == "sqlite":
        data.fill_sqlite_source(database.target, calls, ("members_v1",))
    else:
        data.fill_pg_source(database.target, calls, ("members_v1",))
    settings = parse_settings(
        {
            "database": {"url": database.url},
            "sources": {"default": database.as_own_source("members_v1")},
            "tray": {"workflow_urls": [url]},
        },
        base_dir=dbs.workdir,
    )
    engine = db.open_state(settings.database.url)
    view = audiences.create(
        engine, settings, name="Bench Delivery", sql="SELECT user_id FROM members_v1"
    )
    targets = register_destinations(engine, settings.tray.workflow_urls)
    run_id, _kind = sync.start_run(engine, view.id)
    sync.evaluate_and_commit(engine, settings, view, run_id, targets)
    sync.finish_run(engine, run_id, RUN_SUCCEEDED)
    outbox = Outbox(
        database=database,
        engine=engine,
        audience=Audience(id=view.id, key=view.key),
        targets=targets,
        tray=settings.tray,
        run_id=run_id,
        calls=calls,
    )
    if pending(outbox) != calls:
        raise AssertionError(f"expected {calls} pending deliveries, found {pending(outbox)}")
    return outbox


def pending(outbox: Outbox) -> int:
    with outbox.engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM deliveries WHERE run_id = :r AND status = 'pending'"),
                {"r": outbox.run_id},
            ).scalar_one()
        )


def rearm(outbox: Outbox) -> None:
    """Every delivery of the run pending again, as it was before the first pass."""
    with db.write_transaction(outbox.engine) as conn:
        conn.execute(
            text(
                "UPDATE deliveries SET status = 'pending', attempts = 0, last_attempt_at = NULL, "
                "delivered_at = NULL, last_status_code = NULL, last_error = NULL, claimed_by = NULL, "
                "next_attempt_at = created_at WHERE run_id = :r"
            ),
            {"r": outbox.run_id},
        )
    if outbox.database.kind == "postgresql":
        with outbox.database.connect_pg(autocommit=True) as pg:
            pg.execute("VACUUM ANALYZE deliveries")
    else:
        with outbox.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def bodies_of(outbox: Outbox) -> list[bytes]:
    """The bodies syncer sends for this outbox, built the way it builds them."""
    with outbox.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT run_id, user_id, trait_value, created_at FROM deliveries "
                "WHERE run_id = :r ORDER BY id"
            ),
            {"r": outbox.run_id},
        ).all()
    created = datetime.now(UTC)  # the same length as the stored one; the value is moot here
    return [
        identify_body(
            user_id=user_id,
            audience_key=outbox.audience.key,
            audience_id=outbox.audience.id,
            value=bool(value),
            message_id=identify_message_id(outbox.audience.id, run_id, user_id),
            timestamp=created,
        )
        for run_id, user_id, value, _created in rows
    ]


def run_syncer(
    outbox: Outbox,
    processes: int = 1,
    *,
    profile: Path | None = None,
    statements: Path | None = None,
) -> float:
    """One ``deliver_audience`` pass over the whole outbox, timed; then the outbox is re-armed.
    ``processes``: ``[tray] delivery_processes``. ``profile``: a cProfile report (the event
    loop's thread of this process only); ``statements``: SQL timings."""
    totals: list[Any] = []
    tray = replace(outbox.tray, delivery_processes=processes)

    def work() -> None:
        totals.append(
            loops.run(deliver_audience(outbox.engine, outbox.audience, outbox.targets, tray))
        )

    started = time.perf_counter()
    try:
        with statement_log(statements) if statements else contextlib.nullcontext():
            if profile is None:
                work()
            else:
                profile_to(profile, work)
        seconds = time.perf_counter() - started
        if totals[0].sent != outbox.calls:
            raise AssertionError(f"syncer sent {totals[0].sent} of {outbox.calls}: {totals[0]}")
    finally:
        rearm(outbox)
    return seconds


def _timed(receiver: ReceiverProcess, rate: Rate, fn: Callable[[], float | None]) -> float:
    """Time ``fn``: its own clock where it returns one (syncer's pass, without the re-arming
    that follows it), else the whole call."""
    before_calls, before_cpu = receiver.requests(), receiver.cpu()
    started = time.perf_counter()
    timed = fn()
    seconds = time.perf_counter() - started if timed is None else timed
    rate.receiver_cpu.append((receiver.cpu() - before_cpu) / seconds)
    arrived = receiver.requests() - before_calls
    if arrived != rate.calls:
        raise AssertionError(f"receiver got {arrived} calls, expected {rate.calls}")
    rate.seconds.seconds.append(seconds)
    return seconds


# How syncer is measured: [tray] delivery_processes (one process, and two sharing the pass: 2
# cores here), and whether the helper starts with the pass (``syncer sync``, and the first
# pass of ``syncer serve``) or is already waiting warm (``serve``'s later passes).
PROCESSES: tuple[tuple[int, bool], ...] = ((1, False), (2, False), (2, True))
WARM_READY_SECONDS = 30.0


def variant(outbox: Outbox, processes: int, warm: bool = False) -> str:
    kind = outbox.database.kind
    if processes == 1:
        return kind
    return f"{kind}, {processes} processes" + (", warm helper" if warm else "")


@contextlib.contextmanager
def warm_helpers(outbox: Outbox, count: int) -> Iterator[None]:
    """Helpers kept warm, as ``syncer serve`` keeps them; on entry ``count`` of them are
    started and have loaded their libraries (their CPU time stopped growing)."""
    workers.keep_warm()
    try:
        workers.replenish(outbox.engine.url.drivername, count)
        deadline = time.monotonic() + WARM_READY_SECONDS
        while time.monotonic() < deadline:
            pids = workers.waiting()
            before = [cpu_seconds(pid) for pid in pids]
            time.sleep(0.3)
            if len(pids) == count and [cpu_seconds(pid) for pid in pids] == before:
                break
        else:
            raise RuntimeError(f"no warm helper ready after {WARM_READY_SECONDS:.0f} s")
        yield
    finally:
        workers.keep_warm(False)


@dataclass(frozen=True, kw_only=True)
class Result:
    concurrency: int
    syncer: dict[str, Rate]  # by state database kind
    raw: dict[str, Rate]  # by client name

    @property
    def baseline(self) -> float:
        """The fastest raw aiohttp rate, on whichever event loop it was."""
        return max(self.raw[name].best for name in BASELINES)

    def ratio(self, kind: str) -> float:
        return self.syncer[kind].best / self.baseline

    def as_json(self) -> dict[str, object]:
        return {
            "concurrency": self.concurrency,
            "syncer": {k: r.as_json() for k, r in self.syncer.items()},
            "raw": {k: r.as_json() for k, r in self.raw.items()},
            "ratio_syncer_to_aiohttp_best": {k: round(self.ratio(k), 3) for k in self.syncer},
        }


def measure(
    dbs: Databases,
    kinds: list[str],
    *,
    calls: int,
    reps: int,
    profile_dir: Path | None = None,
    say: Callable[[str], None] = print,
) -> Result:
    concurrency = DEFAULT_MAX_CONCURRENCY
    with ReceiverProcess(dbs.workdir) as receiver:
        url = receiver.url("w1")
        outboxes = [prepare(dbs, kind, calls, url) for kind in kinds]
        try:
            bodies = bodies_of(outboxes[0])
            syncer_rates = {
                variant(o, n, warm): Rate(calls=calls) for o in outboxes for n, warm in PROCESSES
            }
            raw_rates = {
                name: Rate(calls=min(calls, HTTPX_DEFAULT_MAX_CALLS) if name == "httpx" else calls)
                for name in RAW_CLIENTS
            }
            for rep in range(reps):
                for outbox in outboxes:
                    for n, warm in PROCESSES:
                        rate = syncer_rates[variant(outbox, n, warm)]
                        with warm_helpers(outbox, n - 1) if warm else contextlib.nullcontext():
                            seconds = _timed(
                                receiver, rate, functools.partial(run_syncer, outbox, n)
                            )
                        say(
                            f"    delivery rep {rep + 1} syncer/{variant(outbox, n, warm):36} "
                            f"{calls / seconds:8.0f} calls/s"
                        )
                for name in RAW_CLIENTS:
                    rate = raw_rates[name]
                    some = bodies[: rate.calls]
                    seconds = _timed(
                        receiver,
                        rate,
                        functools.partial(_run_client, name, url, some, concurrency),
                    )
                    say(f"    delivery rep {rep + 1} {name:17} {rate.calls / seconds:8.0f} calls/s")
            if profile_dir is not None:
                for outbox in outboxes:
                    name = f"delivery-{outbox.database.kind}"
                    run_syncer(outbox, statements=profile_dir / f"{name}-sql.txt")
                    run_syncer(outbox, profile=profile_dir / f"{name}-cprofile.txt")
        finally:
            for outbox in outboxes:
                outbox.engine.dispose()
                dbs.drop(outbox.database)
    return Result(concurrency=concurrency, syncer=syncer_rates, raw=raw_rates)
