"""Helper processes of a delivery pass (``python -m syncer.workers``, started by syncer only).

With ``[tray] delivery_processes = N`` the process that holds an audience's lease starts N-1
helpers for each delivery pass. Every process claims pages of the owed rows for itself
(``delivery_pages``, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, see ``delivery._claim_page``) and
sends them with its share of ``max_concurrency``, so no row is sent by two processes, and
together they use more than the one core a Python process can.

A helper given a pass lives no longer than that pass and its parent: the kernel kills it when
the parent dies (``PR_SET_PDEATHSIG`` on Linux), so a ``kill -9`` of syncer leaves no helper
sending behind the next lease holder's back; and it starts no new call once its stdin closes
(the parent's shutdown). It reports progress and its totals as JSON lines on stdout.

A helper's start-up is mostly importing its libraries (about a second of CPU). A process that
delivers again and again (``syncer serve``) keeps helpers warm: once a pass with helpers ends,
as many new ones are started, load their libraries and wait, idle, for the next pass's plan
(``keep_warm``). A waiting helper has no plan and claims nothing; it ends when its stdin
closes, and with its parent.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from sqlalchemy.engine import URL

from syncer import logs, loops

if TYPE_CHECKING:
    from syncer.delivery import DeliveryTotals, PassPlan

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
STOP_POLL_SECONDS = 0.1


# Helpers started ahead, waiting for a plan, with the database driver each has loaded.
_warm: list[tuple[str, subprocess.Popen[bytes]]] = []
_warm_lock = threading.Lock()
_keeping_warm = False


def _spawn(driver: str) -> subprocess.Popen[bytes]:
    """A helper for a state database of ``driver`` (``postgresql+psycopg``: no secret in it)."""
    return subprocess.Popen(
        # -P: not the cwd first on the path: the parent's syncer (_env), always
        [sys.executable, "-P", "-m", "syncer.workers", str(os.getpid()), driver],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_env(),
    )


def keep_warm(on: bool = True) -> None:
    """From now on (``on``), replace the helpers of each pass with warm ones for the next;
    with ``on`` False, end the warm helpers there are."""
    global _keeping_warm
    with _warm_lock:
        _keeping_warm = on
        idle = [] if on else [process for _driver, process in _warm]
        if not on:
            _warm.clear()
    _end(idle)


def replenish(driver: str, count: int) -> None:
    """Have ``count`` warm helpers for ``driver`` waiting, when keeping helpers warm."""
    with _warm_lock:
        if not _keeping_warm:
            return
        _warm[:] = [(d, p) for d, p in _warm if d == driver and p.poll() is None]
        while len(_warm) < count:
            _warm.append((driver, _spawn(driver)))


def waiting() -> list[int]:
    """The pids of the warm helpers waiting for a plan."""
    with _warm_lock:
        return [process.pid for _driver, process in _warm if process.poll() is None]


def _take(driver: str) -> subprocess.Popen[bytes]:
    """A warm helper for ``driver`` if one is waiting, else a new one."""
    with _warm_lock:
        while _warm:
            loaded, process = _warm.pop(0)
            if loaded == driver and process.poll() is None:
                return process
            _end([process])
    return _spawn(driver)


def _end(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """End helpers that wait for a plan: they hold nothing, so a kill is safe."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    for process in processes:
        process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


atexit.register(keep_warm, False)


class Helpers:
    """The helper processes of one pass, started (or taken warm) on entry, killed on an
    error."""

    def __init__(
        self,
        url: URL,
        plans: Sequence[PassPlan],
        *,
        report: Callable[[int], Callable[[int, DeliveryTotals], None]],
        stop: threading.Event | None,
    ) -> None:
        self._url = url
        self._plans = plans
        self._report = report
        self._stop = stop
        self._processes: list[subprocess.Popen[bytes]] = []
        self._readers: list[asyncio.Task[DeliveryTotals]] = []
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Helpers:
        url = self._url.render_as_string(hide_password=False)
        try:
            for n, plan in enumerate(self._plans, start=1):
                message = pickle.dumps((url, plan, logs.configured))
                process = _take(self._url.drivername)
                self._processes.append(process)
                try:
                    _hand(process, message)
                except OSError:  # a warm helper that died while it waited: start a new one
                    process = self._processes[-1] = _spawn(self._url.drivername)
                    _hand(process, message)
                self._readers.append(asyncio.create_task(self._read(n, process)))
        except BaseException:
            await self._kill()
            raise
        if self._stop is not None and self._processes:
            self._watcher = asyncio.create_task(self._watch(self._stop))
        return self

    async def _watch(self, stop: threading.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(STOP_POLL_SECONDS)
        for process in self._processes:
            if process.stdin is not None:
                process.stdin.close()

    async def _read(self, n: int, process: subprocess.Popen[bytes]) -> DeliveryTotals:
        from syncer.delivery import DeliveryTotals

        update = self._report(n)
        # What the helper has recorded so far; its last line is its final totals.
        recorded = DeliveryTotals()
        assert process.stdout is not None
        lines = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(lines), process.stdout
        )
        try:
            async for line in lines:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    message = json.loads(line)
                    recorded = DeliveryTotals(
                        sent=int(message["sent"]), failed=int(message["failed"])
                    )
                    if "done" in message:
                        update(int(message["done"]), recorded)
        finally:
            transport.close()
        code = await asyncio.to_thread(process.wait)
        if code != 0:
            # What it claimed and did not record stays owed: the pass's pages are dropped at
            # its end, and the next pass sends it. What it recorded is counted.
            logger.warning("delivery helper process %d ended with exit code %d", n, code)
        return recorded

    async def results(self) -> list[DeliveryTotals]:
        """Every helper's totals, once all have finished."""
        return list(await asyncio.gather(*self._readers))

    async def _kill(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        for process in self._processes:
            await asyncio.to_thread(process.wait)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if exc is not None:
            await self._kill()
        for process in self._processes:
            if process.stdin is not None:
                process.stdin.close()
        for reader in self._readers:
            if exc is not None:
                reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        for process in self._processes:
            if process.stdout is not None:
                process.stdout.close()  # already closed unless its reader never started
        if exc is None and not (self._stop is not None and self._stop.is_set()):
            replenish(self._url.drivername, len(self._processes))


def _hand(process: subprocess.Popen[bytes], message: bytes) -> None:
    """Give a helper its pass (the pickled plan: a few hundred bytes, the pipe takes it whole)."""
    assert process.stdin is not None
    process.stdin.write(message)
    process.stdin.flush()


def _env() -> dict[str, str] | None:
    """The helper's environment: this one, and when this process imported syncer from the
    current folder (``-P`` keeps the helper from looking there), that folder on PYTHONPATH."""
    root = Path(__file__).resolve().parent.parent
    if root != Path.cwd().resolve():
        return None  # installed: the helper finds the same syncer the same way
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), path) if p)}


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to kill this process when its parent dies (Linux only)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def main() -> None:
    if len(sys.argv) != 3 or not sys.argv[1].isdigit():
        print("syncer.workers is started by syncer itself, not by hand", file=sys.stderr)
        sys.exit(2)
    _die_with_parent(int(sys.argv[1]))
    # The pass's libraries and database driver, loaded before its plan arrives: a warm helper
    # has them ready.
    from sqlalchemy import make_url

    from syncer import db, delivery  # noqa: F401

    with contextlib.suppress(Exception):  # a driver that fails to load fails with the plan
        make_url(f"{sys.argv[2]}://").get_dialect().import_dbapi()
    try:
        url, plan, log_config = pickle.load(sys.stdin.buffer)
    except EOFError:
        return  # the parent had no pass for this helper before it ended or let it go
    if log_config is not None:
        logs.configure(*log_config)
    stop = threading.Event()

    def watch_stdin() -> None:
        # EOF: the parent is shutting down (or gone): start no new call.
        while os.read(0, 4096):  # unbuffered: no lock held at interpreter exit
            pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    try:
        totals = loops.run(_run(url, plan, stop))
    except Exception as exc:
        # One line for the operator; the parent logs the exit code, the next pass resends.
        print(f"syncer delivery helper: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"sent": totals.sent, "failed": totals.failed}), flush=True)
    # Done: its calls are answered and recorded, its connections closed. No interpreter
    # teardown (a tenth of a second or more) between the parent and the end of its pass.
    logging.shutdown()
    os._exit(0)


async def _run(url: str, plan: PassPlan, stop: threading.Event) -> DeliveryTotals:
    from sqlalchemy import make_url

    from syncer import db
    from syncer.delivery import new_claimer, run_pass

    def progress(done: int, recorded: DeliveryTotals) -> None:
        line = {"done": done, "sent": recorded.sent, "failed": recorded.failed}
        print(json.dumps(line), flush=True)

    plan = dataclasses.replace(plan, claimer=new_claimer())  # named after this process
    engine = db.open_state(make_url(url))
    try:
        return await run_pass(engine, plan, progress=progress, stop=stop)
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
