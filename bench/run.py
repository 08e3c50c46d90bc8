"""``python -m bench``: syncer against the machine's limit, side by side in one run.

Run it from the repository root. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import delivery_path, diff_path, initial_sync, peak_rss
from bench.databases import Databases
from bench.processes import package_root
from bench.timing import load_average

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = ("diff", "delivery", "initial", "rss")
KINDS = ("sqlite", "postgresql")


def parse_size(text: str) -> int:
    """``100k``, ``1m``, ``10M`` or a plain number."""
    cleaned = text.strip().lower().replace("_", "")
    factor = {"k": 1_000, "m": 1_000_000}.get(cleaned[-1:], 1)
    number = cleaned[:-1] if factor > 1 else cleaned
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 100k or 1m") from None
    if value < 1_000:
        raise argparse.ArgumentTypeError(f"{text!r}: use at least 1k ids")
    return value


def parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def parse_list(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [i for i in items if i not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark syncer's diff and delivery paths against bare SQL and raw aiohttp.",
    )
    parser.add_argument(
        "--only",
        type=parse_list(STEPS),
        default=None,
        help="steps: diff,delivery,initial,rss (default: diff,delivery,initial; --big adds rss)",
    )
    parser.add_argument(
        "--db", type=parse_list(KINDS), default=list(KINDS), help="state databases (default both)"
    )
    parser.add_argument(
        "--source",
        type=parse_list(diff_path.PLACEMENTS),
        default=list(diff_path.PLACEMENTS),
        help="diff sources: same (the state database), other (a separate database of the "
        "same kind), duckdb (a DuckDB file); default all three",
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        help="diff sizes (default 100k,1m; --big adds 10m)",
    )
    parser.add_argument(
        "--big",
        action="store_true",
        help="add 10M to the diff sizes and measure peak RSS at 10M (long: tens of minutes)",
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions per measurement (3)")
    parser.add_argument(
        "--deliveries", type=parse_size, default=20_000, help="calls per delivery measurement (20k)"
    )
    parser.add_argument(
        "--initial-size",
        "--size",
        dest="initial_size",
        type=parse_size,
        default=20_000,
        help="members of the end-to-end initial sync (default 20k; the issue's figure is 1m)",
    )
    parser.add_argument(
        "--rss-size", type=parse_size, default=None, help="peak-RSS snapshot size (1m; --big: 10m)"
    )
    parser.add_argument(
        "--rss-deliver-seconds",
        type=float,
        default=10.0,
        help="how long the peak-RSS child delivers after its commit (10)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also write cProfile and per-statement SQL timings of one syncer run per case",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    return parser


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def syncer_version() -> dict[str, Any]:
    """Which syncer was measured: its folder, and the git commit if it is a checkout."""
    import syncer

    root = package_root(syncer)
    info: dict[str, Any] = {"root": root}
    try:
        info["commit"] = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "syncer", "migrations"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        info["uncommitted_changes"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        commit_file = Path(root) / "COMMIT"
        if commit_file.exists():
            info["commit"] = commit_file.read_text().strip()
    return info


def say(line: str) -> None:
    print(line, flush=True)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _or_dash(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def diff_table(results: list[diff_path.Result]) -> str:
    rows = []
    for r in results:
        parts = r.syncer.best_parts()
        base = r.baseline.best_parts()
        memberships, except_ = r.baseline_memberships, r.baseline_except
        rows.append(
            [
                r.kind,
                r.placement,
                f"{r.size:,}",
                f"{r.syncer.best:.2f}",
                f"{r.baseline.best:.2f}",
                f"{r.ratio:.2f}x",
                f"{r.syncer.median / r.baseline.median:.2f}x",
                _or_dash(memberships.best if memberships else None, ".2f"),
                _or_dash(r.ratio_memberships, ".2f") + ("x" if memberships else ""),
                _or_dash(except_.best if except_ else None, ".2f"),
                _or_dash(r.ratio_except, ".2f") + ("x" if except_ else ""),
                f"{r.syncer.best / r.size * 1e6:.2f}",
                f"{r.baseline.best / r.size * 1e6:.2f}",
                f"{parts.get('stage', 0):.2f}/{parts.get('compute', 0):.2f}/"
                f"{parts.get('commit_snapshot', 0):.2f}",
                f"{base.get('load', 0):.2f}/{base.get('diff', 0):.2f}",
                _or_dash(r.syncer_peak_rss_mb, ".0f"),
            ]
        )
    headers = [
        "state",
        "source",
        "ids",
        "syncer s",
        "bare SQL s",
        "ratio",
        "ratio(med)",
        "bare/memb s",
        "ratio/memb",
        "bare/exc s",
        "ratio/exc",
        "syncer s/M",
        "bare s/M",
        "stage/diff/commit",
        "load/diff",
        "syncer RSS MB",
    ]
    return table(headers, rows)


def delivery_table(result: delivery_path.Result) -> str:
    aiohttp = result.baseline
    rows = []
    for kind, rate in result.syncer.items():
        rows.append(
            [
                f"syncer deliver_audience ({kind})",
                f"{rate.calls:,}",
                f"{rate.best:,.0f}",
                f"{rate.median:,.0f}",
                f"{rate.best / aiohttp:.2f}x",
                f"{max(rate.receiver_cpu):.0%}",
            ]
        )
    for name, rate in result.raw.items():
        label = {
            "aiohttp": "aiohttp.ClientSession (raw)",
            "aiohttp-uvloop": "aiohttp.ClientSession on uvloop (raw)",
            "syncer-http": "syncer TrayClient, no database",
            "httpx-aiohttp": "httpx + AiohttpTransport (raw)",
            "httpx": "httpx default transport (raw)",
        }[name]
        rows.append(
            [
                label,
                f"{rate.calls:,}",
                f"{rate.best:,.0f}",
                f"{rate.median:,.0f}",
                f"{rate.best / aiohttp:.2f}x",
                f"{max(rate.receiver_cpu):.0%}",
            ]
        )
    headers = ["client", "calls", "calls/s best", "calls/s med", "vs aiohttp", "receiver CPU"]
    return table(headers, rows)


def initial_table(results: list[initial_sync.Result]) -> str:
    rows = []
    for r in results:
        rows.append(
            [
                r.kind,
                f"{r.size:,}",
                f"{r.wall_seconds:.1f}",
                f"{r.commit_seconds:.1f}",
                f"{r.delivery_seconds:.1f}",
                f"{r.calls_per_second:,.0f}",
                f"{r.peak_rss_mb:.0f}",
                "-" if r.size >= initial_sync.ONE_MILLION else f"{r.projected_1m_seconds / 60:.1f}",
            ]
        )
    headers = [
        "state",
        "members",
        "wall s",
        "eval+commit s",
        "delivery s",
        "calls/s",
        "peak RSS MB",
        "1M projected min",
    ]
    return table(headers, rows)


def rss_table(results: list[peak_rss.Result]) -> str:
    rows = []
    for r in results:
        rep = r.report
        rows.append(
            [
                r.kind,
                f"{r.size:,}",
                f"{rep['peak_rss_mb_after_imports']}",
                f"{rep['peak_rss_mb_after_commit']}",
                f"{r.peak_rss_mb:.1f}",
                f"{rep['evaluate_commit_seconds']}",
                f"{rep['sent']:,}",
            ]
        )
    headers = [
        "state",
        "members",
        "MB after imports",
        "MB after commit",
        "peak MB (end)",
        "eval+commit s",
        "calls sent",
    ]
    return table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    steps = args.only or [s for s in STEPS if s != "rss" or args.big]
    sizes = args.sizes or ([100_000, 1_000_000] + ([10_000_000] if args.big else []))
    rss_size = args.rss_size or (10_000_000 if args.big else 1_000_000)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    out_path = RESULTS / f"{stamp}.json"
    profile_dir = RESULTS / f"{stamp}-profile" if args.profile else None
    workdir = Path(tempfile.mkdtemp(prefix="syncer-bench-", dir=args.workdir))
    dbs = Databases(workdir=workdir)
    report: dict[str, Any] = {
        "started_at": stamp,
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench", *sys.argv[1:]]),
        "machine": machine(),
        "syncer": syncer_version(),
        "load_average_before": load_average(),
        "settings": {
            "steps": steps,
            "state_databases": args.db,
            "diff_sources": args.source,
            "diff_sizes": sizes,
            "reps": args.reps,
            "deliveries": args.deliveries,
            "initial_size": args.initial_size,
            "rss_size": rss_size,
        },
    }
    tables: list[str] = []
    started = time.perf_counter()
    say(f"syncer from {report['syncer']}; load average {report['load_average_before']}")
    try:
        if "diff" in steps:
            say("== diff path (evaluate + stage + diff + commit) vs bare SQL")
            diff_results: list[diff_path.Result] = []
            for size in sizes:
                for kind in args.db:
                    diff_results += diff_path.measure(
                        dbs,
                        kind,
                        size,
                        reps=args.reps,
                        placements=args.source,
                        profile_dir=profile_dir,
                        say=say,
                    )
            report["diff"] = [r.as_json() for r in diff_results]
            tables.append(f"Diff path: best of {args.reps}, seconds\n" + diff_table(diff_results))
            say(tables[-1])
        if "delivery" in steps:
            say("== delivery path: calls per second to the loopback receiver")
            delivery = delivery_path.measure(
                dbs,
                args.db,
                calls=args.deliveries,
                reps=args.reps,
                profile_dir=profile_dir,
                say=say,
            )
            report["delivery"] = delivery.as_json()
            tables.append(
                f"Delivery path: concurrency {delivery.concurrency}, best of {args.reps}\n"
                + delivery_table(delivery)
            )
            say(tables[-1])
        if "initial" in steps:
            say("== initial sync end to end (python -m syncer sync)")
            initial = initial_sync.measure(dbs, args.db, size=args.initial_size, say=say)
            report["initial"] = [r.as_json() for r in initial]
            tables.append("Initial sync, end to end (one run each)\n" + initial_table(initial))
            say(tables[-1])
        if "rss" in steps:
            say("== peak RSS of a syncer process for a large initial snapshot")
            rss = peak_rss.measure(
                dbs, args.db, size=rss_size, deliver_seconds=args.rss_deliver_seconds, say=say
            )
            report["rss"] = [r.as_json() for r in rss]
            tables.append("Peak RSS (VmHWM of the syncer child)\n" + rss_table(rss))
            say(tables[-1])
    finally:
        dbs.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        report["load_average_after"] = load_average()
        report["total_seconds"] = round(time.perf_counter() - started, 1)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
    say("")
    say("\n\n".join(tables))
    say(
        f"\nload average before {report['load_average_before']}, "
        f"after {report['load_average_after']}; {report['total_seconds']:.0f}s in all"
    )
    say(f"JSON: {out_path}")
    return 0
