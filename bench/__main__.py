"""``python -m bench``: the benchmark, one command (``--quick``: a smoke run).

Prints Markdown tables and the targets, each PASS, MISS or skipped: ratios of figures measured
in the same run, since these shared machines change speed from minute to minute. ``--json
FILE`` writes every figure; ``--baseline DIR`` adds another checkout's ``serve`` to the typical
HTTP rounds, to compare two revisions' throughput in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import runpy
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from flask import Flask

from bench import servers
from bench.servers import LoadResult
from bench.workloads import NO_PREFETCH_MISSING, SERVICE_ID, BodyTemplate, Workload, all_workloads
from cds_service.app import create_app
from cds_service.server import tune_gc
from cds_service.settings import Settings
from cds_service.store.writer import flush_writers_at_exit

CORPUS_DIR = servers.ROOT / "fixtures" / "corpus"
CPU_RATIO_LIMIT = 3.0  # the service's server CPU per call, times the floor's, same body
TAIL_RATIO_LIMIT = 3.0  # p99 over median, in process
ROUND_TRIPS = (0.5, 1.5)  # latency added by a missing prefetch, in server round trips
FIRST_CALL_LIMIT_MS = 20.0  # a fresh worker's first call over the median of later calls


@dataclass(frozen=True)
class Plan:
    """How much to measure. HTTP: floor and service alternate in ``rounds`` per level (order
    reversed every other round), so a slow stretch of the machine hits both alike."""

    iterations: dict[str, tuple[int, int]]  # in process: workload -> (calls, warm-up calls)
    fresh_starts: int  # fresh `serve` starts per workload, each 1 + later_calls calls
    later_calls: int
    levels: dict[str, tuple[int, ...]]  # HTTP concurrency levels per workload
    rounds: int
    round_seconds: float  # measured, per server and round, after warmup_seconds
    warmup_seconds: float
    corpus_calls: int | None  # None: every call


FULL = Plan(
    {
        "typical": (3000, 200),
        "large": (150, 5),
        "no-prefetch-0ms": (400, 20),
        "no-prefetch-50ms": (150, 5),
    },
    3,
    30,
    {"typical": (1, 4, 16), "large": (1,)},
    4,
    2.0,
    0.5,
    None,
)
QUICK = Plan(
    {"typical": (30, 3), "large": (3, 1), "no-prefetch-0ms": (5, 1), "no-prefetch-50ms": (3, 1)},
    1,
    5,
    {"typical": (1, 4), "large": (1,)},
    2,
    0.5,
    0.2,
    30,
)


# ------------------------------------------------------------------------ figures and targets


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank (q in 0..100): always a value that was measured."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1] if ordered else math.nan


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"n": len(values), **{f"p{q}": percentile(values, q) for q in (50, 95, 99, 100)}}


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Markdown, columns padded for the terminal."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join(
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in lines
    )


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    measured: str
    passed: bool | None  # None: not measured in this run

    @property
    def verdict(self) -> str:
        return "skipped" if self.passed is None else "PASS" if self.passed else "MISS"


def cpu_per_call(workload: str, ours_ms: float | None, floor_ms: float | None) -> Target:
    name, goal = f"{workload}: server CPU per call, service vs floor", "≤ 3× the floor"
    if ours_ms is None or not floor_ms:
        return Target(name, goal, "not measured", None)
    ratio = ours_ms / floor_ms
    measured = f"{fmt(ratio)}× ({fmt(ours_ms)} / {fmt(floor_ms)} ms)"
    return Target(name, goal, measured, ratio <= CPU_RATIO_LIMIT)


def tail(workload: str, cpu_ms: Sequence[float], wall_ms: Sequence[float]) -> Target:
    """Judged on the calling thread's CPU time: on a shared machine the wall clock's tail is
    mostly other processes' time slices (shown beside it)."""
    (cpu_median, cpu_p99), (wall_median, wall_p99) = (
        (percentile(v, 50), percentile(v, 99)) for v in (cpu_ms, wall_ms)
    )
    return Target(
        f"{workload}: p99 in process vs median",
        "≤ 3× the median",
        f"CPU {fmt(cpu_p99 / cpu_median)}× ({fmt(cpu_p99)} / {fmt(cpu_median)} ms); wall clock "
        f"{fmt(wall_p99 / wall_median)}× ({fmt(wall_p99)} / {fmt(wall_median)} ms)",
        cpu_p99 / cpu_median <= TAIL_RATIO_LIMIT,
    )


def missing_prefetch(keys: int, delay_ms: float, added_ms: float) -> Target:
    trips, (low, high) = added_ms / delay_ms, ROUND_TRIPS
    return Target(
        f"{keys} prefetch keys missing, FHIR server {fmt(delay_ms, 0)} ms per request",
        f"about one round trip ({low}–{high})",
        f"+{fmt(added_ms)} ms = {fmt(trips)} round trips",
        low <= trips <= high,
    )


def first_call(workload: str, cpu_ms: list[list[float]], wall_ms: list[list[float]]) -> Target:
    """Per fresh start, every call (the first first). Judged on the worker's CPU (the wall
    clock, shown, also holds other processes' time): the median over the starts of the first
    call's excess over the later calls' median."""

    def excess(starts: list[list[float]]) -> tuple[float, str]:
        each = sorted(calls[0] - percentile(calls[1:], 50) for calls in starts)
        return each[(len(each) - 1) // 2], ", ".join(f"+{fmt(e)}" for e in each)

    (cpu, cpu_each), (wall, wall_each) = excess(cpu_ms), excess(wall_ms)
    return Target(
        f"{workload}: first call of a fresh worker",
        "≤ 20 ms over the later calls' median",
        f"CPU +{fmt(cpu)} ms (starts: {cpu_each}); wall clock +{fmt(wall)} ms ({wall_each})",
        cpu <= FIRST_CALL_LIMIT_MS,
    )


def corpus(statuses: Counter[int], latencies_ms: list[float]) -> Target:
    name, goal = "real-world corpus (fixtures/corpus), in process", "every call answered, no 5xx"
    if not latencies_ms:
        return Target(name, goal, "no corpus", None)
    answered = ", ".join(f"{status}×{n}" for status, n in sorted(statuses.items()))
    measured = (
        f"{len(latencies_ms)} calls: {answered}; {fmt(sum(latencies_ms) / 1000)} s in "
        f"all, median {fmt(percentile(latencies_ms, 50))} ms"
    )
    return Target(name, goal, measured, max(statuses) < 500)


# ------------------------------------------------------------------------ in process


def make_app(workdir: Path, name: str, *, process_wide: bool = True) -> Flask:
    """The service as production builds it, auth off, SQLite in ``workdir``. ``process_wide``
    (off inside a test session): also the GC settings of ``serve``, and its logs, formatted
    and written as in production, sent to /dev/null."""
    settings = Settings(
        auth="off",
        database_url=f"sqlite:///{workdir / f'{name}.sqlite3'}",
        fhir_server_allowlist="*",
    )  # the benchmark's own fixture servers
    if not process_wide:
        return create_app(settings)
    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    with contextlib.redirect_stderr(devnull):  # start-up logs (migrations, auth)
        app = create_app(settings)
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_cds_handler", False) and isinstance(handler, logging.StreamHandler):
            handler.setStream(devnull)
    tune_gc()
    return app


def rule_ids(answer: dict[str, Any]) -> list[str]:
    return [
        c.get("extension", {}).get("org.magnesium-cds", {}).get("ruleId", "?")
        for c in answer.get("cards", [])
    ]


def post_each(
    app: Flask, bodies: Sequence[tuple[str, bytes]]
) -> tuple[list[float], list[float], Counter[int], list[str]]:
    """POST each (service id, body) once: wall clock and the calling thread's CPU per call
    (the latter leaves out waiting for a CPU other processes held), the statuses, and the
    rule ids of the first answer's cards. Building a body is the client's work, untimed."""
    client, statuses, cards = app.test_client(), Counter[int](), list[str]()
    wall: list[float] = []
    cpu: list[float] = []
    for service_id, body in bodies:
        cpu_started, started = time.thread_time(), time.perf_counter()
        response = client.post(
            f"/cds-services/{service_id}", data=body, content_type="application/json"
        )
        wall.append((time.perf_counter() - started) * 1000)
        cpu.append((time.thread_time() - cpu_started) * 1000)
        statuses[response.status_code] += 1
        cards = cards or rule_ids(response.get_json(silent=True) or {})
    return wall, cpu, statuses, cards


def run_inprocess(
    plan: Plan, workloads: dict[str, Workload], workdir: Path, found: list[Target]
) -> dict[str, Any]:
    print("\n## In process (Flask test client)\n", flush=True)
    app, rows = make_app(workdir, "inprocess"), []
    figures: dict[str, dict[str, Any]] = {}
    fetched = [w for w in workloads.values() if w.fhir_server_delay_ms is not None]
    delays = [w.fhir_server_delay_ms or 0 for w in fetched]
    with servers.fixture_servers(fetched, workdir, delays) as urls:
        for name, (iterations, warmup) in plan.iterations.items():
            workload = workloads[name]
            _progress(f"{name}: {iterations} calls")
            delay = workload.fhir_server_delay_ms
            url = None if delay is None else urls[delay]
            template = BodyTemplate(workload.request, url)
            post_each(app, [(SERVICE_ID, template.render(i)) for i in range(warmup)])
            indexes = range(warmup, warmup + iterations)
            wall, cpu, statuses, cards = post_each(
                app, [(SERVICE_ID, template.render(i + 10**7 * len(figures))) for i in indexes]
            )
            figures[name] = {
                "body_bytes": template.size,
                "latency_ms": summary(wall),
                "thread_cpu_ms": summary(cpu),
                "statuses": dict(statuses),
                "rule_ids": cards,
            }
            latency = summary(wall)
            rows.append(
                [
                    name,
                    f"{template.size / 1024:,.0f}",
                    str(len(wall)),
                    *(fmt(latency[k]) for k in ("p50", "p95", "p99", "p100")),
                    f"{fmt(percentile(cpu, 50))} / {fmt(percentile(cpu, 99))}",
                    ", ".join(f"{s}×{n}" for s, n in sorted(statuses.items())),
                    ", ".join(sorted(set(cards))) or "(no card)",
                ]
            )
            if name in ("typical", "large"):
                found.append(tail(name, cpu, wall))
    print(
        table(
            [
                "workload",
                "body KiB",
                "n",
                "median ms",
                "p95 ms",
                "p99 ms",
                "max ms",
                "thread CPU median / p99 ms",
                "statuses",
                "cards",
            ],
            rows,
        ),
        flush=True,
    )
    added_ms = (
        figures["no-prefetch-50ms"]["latency_ms"]["p50"]
        - figures["no-prefetch-0ms"]["latency_ms"]["p50"]
    )
    found.append(missing_prefetch(len(NO_PREFETCH_MISSING), 50, added_ms))
    return figures


def cpu_target(workload: str, results: list[LoadResult]) -> Target:
    """Judged at the level where the service's CPU per call is furthest above the floor's."""
    cpu = {(r.concurrency, r.server): r.cpu_ms_per_call for r in results if r.workload == workload}
    pairs = [(cpu[level, "ours"], cpu[level, "floor"]) for level, name in cpu if name == "ours"]
    if not pairs or any(ours is None or not floor for ours, floor in pairs):
        return cpu_per_call(workload, None, None)
    return cpu_per_call(workload, *max(pairs, key=lambda p: (p[0] or 0) / (p[1] or 1)))


def run_corpus(plan: Plan, workdir: Path, found: list[Target]) -> dict[str, Any]:
    """Every hook call of fixtures/corpus (Synthea patients, docs/corpus.md), read by the
    corpus's own ``corpus_requests`` (scripts/build_corpus.py owns the format), posted once."""
    print("\n## Real-world corpus (fixtures/corpus), in process\n", flush=True)
    calls: list[Any] = []
    if CORPUS_DIR.is_dir():
        builder = runpy.run_path(str(servers.ROOT / "scripts" / "build_corpus.py"))
        calls = builder["corpus_requests"](CORPUS_DIR)[: plan.corpus_calls]
    _progress(f"corpus: {len(calls)} calls")
    wall, _, statuses, _ = post_each(
        make_app(workdir, "corpus"), [(c.service_id, orjson.dumps(c.request)) for c in calls]
    )
    found.append(corpus(statuses, wall))
    print(found[-1].measured)
    return {
        "calls": len(calls),
        "statuses": dict(statuses),
        "total_ms": sum(wall),
        "latency_ms": summary(wall),
    }


def run_first_calls(
    plan: Plan, workloads: dict[str, Workload], workdir: Path, found: list[Target]
) -> list[dict[str, Any]]:
    print("\n## First call of a fresh worker (`cds-service serve`, 1 worker, over HTTP)\n")
    rows, figures = [], []
    for name in ("typical", "suggestion"):
        cpu, wall = [], []
        for start in range(1, plan.fresh_starts + 1):
            _progress(f"fresh worker: {name}, start {start}, 1 + {plan.later_calls} calls")
            calls_cpu, calls_wall, statuses = servers.first_calls(
                workloads[name], workdir, start, plan.later_calls
            )
            cpu.append(calls_cpu)
            wall.append(calls_wall)
            figure = {
                "workload": name,
                "cpu_ms": calls_cpu,
                "wall_ms": calls_wall,
                "statuses": sorted(statuses),
            }
            figures.append(figure)
            rows.append(
                [
                    name,
                    str(start),
                    *(fmt(v[0]) for v in (calls_cpu, calls_wall)),
                    *(fmt(percentile(v[1:], 50)) for v in (calls_cpu, calls_wall)),
                    ", ".join(map(str, sorted(statuses))),
                ]
            )
        found.append(first_call(name, cpu, wall))
    print(
        table(
            [
                "workload",
                "start",
                "first CPU ms",
                "first ms",
                "later CPU median ms",
                "later median ms",
                "statuses",
            ],
            rows,
        ),
        flush=True,
    )
    return figures


def run_http(
    plan: Plan,
    workloads: dict[str, Workload],
    workdir: Path,
    found: list[Target],
    baseline: Path | None = None,
) -> list[dict[str, Any]]:
    """``serve`` and the floor (and ``baseline``'s ``serve``, typical only) in alternating
    rounds; the CPU target takes the level where ours is furthest above the floor."""
    print("\n## Over HTTP: `cds-service serve` against the floor (same gunicorn setup)\n")
    results: list[LoadResult] = []
    with contextlib.ExitStack() as stack:
        started = [
            stack.enter_context(servers.started_server("ours", workdir)),
            stack.enter_context(servers.started_server("floor", workdir, floor=True)),
        ]
        if baseline is not None:
            started.append(
                stack.enter_context(servers.started_server("baseline", workdir, code=baseline))
            )
        for name, levels in plan.levels.items():
            template = BodyTemplate(workloads[name].request)
            here = [s for s in started if name == "typical" or s.name != "baseline"]
            for concurrency in levels:
                runs = {s.name: LoadResult(s.name, name, concurrency) for s in here}
                for number in range(plan.rounds):
                    for server in here if number % 2 == 0 else here[::-1]:
                        _progress(f"{server.name} {name} c={concurrency} round {number + 1}")
                        servers.run_round(
                            runs[server.name],
                            server,
                            template,
                            plan.round_seconds,
                            plan.warmup_seconds,
                        )
                results.extend(runs.values())
            found.append(cpu_target(name, results))
    rows = []
    for r in results:
        ours = next(
            o
            for o in results
            if (o.workload, o.concurrency, o.server) == (r.workload, r.concurrency, "ours")
        )
        latency = summary(r.latencies_ms)
        share = f"{fmt(ours.calls_per_s / r.calls_per_s * 100, 0)} %" if r.calls_per_s else "–"
        rows.append(
            [
                r.workload,
                str(r.concurrency),
                r.server,
                fmt(r.calls_per_s, 0),
                share,
                fmt(latency["p50"]),
                fmt(latency["p99"]),
                fmt(r.cpu_ms_per_call),
                str(r.errors),
            ]
        )
    print(
        table(
            [
                "workload",
                "concurrency",
                "server",
                "calls/s",
                "ours as % of it",
                "median ms",
                "p99 ms",
                "server CPU ms/call",
                "non-200",
            ],
            rows,
        ),
        flush=True,
    )
    return [
        {
            **{k: v for k, v in asdict(r).items() if k != "latencies_ms"},
            "calls_per_s": r.calls_per_s,
            "cpu_ms_per_call": r.cpu_ms_per_call,
            "latency_ms": summary(r.latencies_ms),
        }
        for r in results
    ]


def _progress(message: str) -> None:
    print(f"  … {message}", file=sys.stderr, flush=True)


def _git(*args: str) -> str:
    run = subprocess.run(["git", *args], cwd=servers.ROOT, capture_output=True, text=True)
    return run.stdout.strip()


def _loadavg() -> str:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    settings = Settings()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{os.cpu_count()} x {models[0] if models else platform.processor()}",
        "python": platform.python_version(),
        "revision": _git("rev-parse", "--short", "HEAD")
        + (" + uncommitted changes" if _git("status", "--porcelain") else ""),
        "serve": f"gunicorn, {settings.workers} workers x {settings.threads} threads (gthread)",
        "loadavg_start": _loadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few iterations: a smoke run")
    parser.add_argument(
        "--only",
        choices=("inprocess", "servers"),
        help="inprocess: in process and the corpus; servers: a fresh worker's "
        "first call and HTTP against the floor (default: both)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of another revision (git "
        "worktree add DIR REV): its `serve` joins the typical HTTP rounds",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    report: dict[str, Any] = {"machine": machine(), "plan": "quick" if args.quick else "full"}
    print("## Machine\n\n" + table(["", ""], [list(i) for i in report["machine"].items()]))
    workloads, found = all_workloads(), list[Target]()
    with tempfile.TemporaryDirectory(prefix="cds-bench-") as tmp:
        try:
            if args.only in (None, "inprocess"):
                report["inprocess"] = run_inprocess(plan, workloads, Path(tmp), found)
                report["corpus"] = run_corpus(plan, Path(tmp), found)
            if args.only in (None, "servers"):
                report["first_call"] = run_first_calls(plan, workloads, Path(tmp), found)
                report["http"] = run_http(plan, workloads, Path(tmp), found, args.baseline)
        finally:
            # Queued cards written before their database's directory goes, even after a failure.
            flush_writers_at_exit()
    report["machine"]["loadavg_end"] = _loadavg()
    report["targets"] = [{**asdict(t), "verdict": t.verdict} for t in found]
    print(
        f"\nload average at the end: {report['machine']['loadavg_end']}\n\n## Targets\n\n"
        + table(
            ["target", "goal", "measured", ""],
            [[t.name, t.goal, t.measured, t.verdict] for t in found],
        ),
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
