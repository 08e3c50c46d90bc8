"""Child processes: the measured ones (the same ``syncer`` and ``bench`` code as the parent,
timed by wall clock, with their peak RSS) and the loopback receiver.

Peak RSS is the kernel's ``VmHWM`` of the child (``/proc/PID/status``), polled while it runs.
Not ``ru_maxrss`` from ``wait4``/``getrusage``: on Linux a child's ``ru_maxrss`` starts from
its parent's high-water mark (``exec`` keeps the larger of the old and new memory's peaks), so
every child of this ~100 MB benchmark would report at least ~100 MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


def package_root(module: ModuleType) -> str:
    """The folder a package was imported from."""
    assert module.__file__ is not None
    return str(Path(module.__file__).resolve().parent.parent)


def child_env() -> dict[str, str]:
    """Environment for children: import ``syncer`` and ``bench`` from where this process did."""
    import bench
    import syncer

    roots = list(dict.fromkeys([package_root(syncer), package_root(bench)]))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*roots, *filter(None, [env.get("PYTHONPATH")])])
    return env


POLL_SECONDS = 0.05


def peak_rss_mb(pid: int | str = "self") -> float:
    """``VmHWM``: the peak resident set of a process's current memory image, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class _PeakWatcher(threading.Thread):
    """Polls a child's VmHWM until it exits; keeps the last (largest) value."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, peak_rss_mb(self.pid))
            except (OSError, ValueError):
                return
            self.done.wait(POLL_SECONDS)


@dataclass(frozen=True, kw_only=True)
class Finished:
    returncode: int
    seconds: float
    peak_rss_mb: float  # VmHWM of this child, polled
    cpu_seconds: float  # user + system
    stdout: str
    stderr: str


def run_measured(args: list[str], *, cwd: Path) -> Finished:
    """Run ``python ARGS`` to completion; its wall time, peak RSS and CPU time."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # communicate() would reap the child and lose its rusage: read the pipes in threads.
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(
            target=lambda: out.append(process.stdout.read() if process.stdout else "")
        ),
        threading.Thread(
            target=lambda: err.append(process.stderr.read() if process.stderr else "")
        ),
    ]
    watcher = _PeakWatcher(process.pid)
    for thread in (*readers, watcher):
        thread.start()
    _pid, status, usage = os.wait4(process.pid, 0)
    watcher.done.set()
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join()
    return Finished(
        returncode=process.returncode,
        seconds=seconds,
        peak_rss_mb=watcher.peak,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        stdout="".join(out),
        stderr="".join(err),
    )


def run_checked(args: list[str], *, cwd: Path) -> Finished:
    finished = run_measured(args, cwd=cwd)
    if finished.returncode != 0:
        raise RuntimeError(
            f"python {' '.join(args)} exited {finished.returncode}:\n"
            f"{finished.stdout[-2000:]}\n{finished.stderr[-2000:]}"
        )
    return finished


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class ReceiverProcess:
    """``python -m bench.receiver`` in its own process."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.process: subprocess.Popen[str] | None = None
        self.base = ""

    def __enter__(self) -> ReceiverProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.receiver", "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=self.workdir,
            env=child_env(),
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.process.kill()
            raise RuntimeError(f"bench receiver did not start: {line!r}")
        self.base = line.removeprefix("listening on ")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def url(self, path: str) -> str:
        return f"{self.base}/{path}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def requests(self) -> int:
        with urllib.request.urlopen(f"{self.base}/stats", timeout=10) as response:
            return int(json.load(response)["requests"])

    def cpu(self) -> float:
        return cpu_seconds(self.pid)


@dataclass(frozen=True, kw_only=True)
class SyncerProject:
    """A folder with settings.toml, an upgraded state database and one audience."""

    state_url: str
    folder: Path
    settings: Path

    @property
    def cli(self) -> list[str]:
        """``python`` arguments that run the ``syncer`` command on these settings."""
        return ["-m", "syncer", "--settings", str(self.settings)]


def syncer_project(
    folder: Path, state_url: str, warehouse: Path, workflow_url: str, audience_name: str
) -> SyncerProject:
    """Settings (state, a SQLite warehouse as the default source, one workflow URL), then
    ``db upgrade`` and ``audience create`` over ``SELECT user_id FROM members``: untimed."""
    folder.mkdir(exist_ok=True)
    settings = folder / "settings.toml"
    settings.write_text(
        f'[database]\nurl = "{state_url}"\n\n'
        f'[sources.default]\nurl = "sqlite:///{warehouse}"\n\n'
        f'[tray]\nworkflow_urls = ["{workflow_url}"]\n'
    )
    project = SyncerProject(state_url=state_url, folder=folder, settings=settings)
    run_checked([*project.cli, "db", "upgrade"], cwd=folder)
    run_checked(
        [*project.cli, "audience", "create", audience_name, "--sql", "SELECT user_id FROM members"],
        cwd=folder,
    )
    return project
