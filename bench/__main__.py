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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
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
IN_PROCESS_CALLS = {"typical": 3000, "large": 150, "no-prefetch-0ms": 400, "no-prefetch-50ms": 150}
CPU_RATIO_LIMIT = 3.0  # the service's server CPU per call, times the floor's, same body
TAIL_RATIO_LIMIT = 3.0  # p99 over median, in process
ROUND_TRIPS = (0.5, 1.5)  # latency added by a missing prefetch, in server round trips
FIRST_CALL_LIMIT_MS = 20.0  # a fresh worker's first call over the median of later calls


@dataclass(frozen=True)
class Plan:
    """How much to measure. HTTP: the servers alternate in ``rounds`` per level (the order
    reversed every other round), so a slow stretch of the machine hits them alike."""

    scale: int  # in process: IN_PROCESS_CALLS // scale calls (at least 3) after 1/20 as many
    fresh_starts: int  # fresh `serve` starts per workload, each 1 + later_calls calls
    later_calls: int
    levels: dict[str, tuple[int, ...]]  # HTTP concurrency levels per workload
    rounds: int
    round_seconds: tuple[float, float]  # per server and round: warm-up, then measured
    corpus_calls: int | None  # None: every call


FULL = Plan(1, 3, 30, {"typical": (1, 4, 16), "large": (1,)}, 4, (0.5, 2.0), None)
QUICK = Plan(100, 1, 5, {"typical": (1, 4), "large": (1,)}, 2, (0.2, 0.5), 30)


# ------------------------------------------------------------------------ figures and targets


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank (q in 0..100): always a value that was measured."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1] if ordered else math.nan


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"n": len(values), **{f"p{q}": percentile(values, q) for q in (50, 95, 99, 100)}}


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def table(headers: str, rows: Sequence[str]) -> str:
    """Markdown from "a|b|c" lines, columns padded for the terminal."""
    cells = [line.split("|") for line in (headers, *rows)]
    widths = [max(len(c) for c in column) for column in zip(*cells, strict=True)]
    cells.insert(1, ["-" * w for w in widths])
    return "\n".join(
        "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in cells
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
    measured = (
        f"{len(latencies_ms)} calls: {_counts(statuses)}; {fmt(sum(latencies_ms) / 1000)} s in "
        f"all, median {fmt(percentile(latencies_ms, 50))} ms"
    )
    return Target(name, goal, measured, max(statuses) < 500)


# ------------------------------------------------------------------------ in process


def make_app(workdir: Path, name: str, *, process_wide: bool = True) -> Flask:
    """The service as production builds it, auth off, SQLite in ``workdir``. ``process_wide``
    (off inside a test session): also the GC settings of ``serve``, and its logs, formatted
    and written as in production, sent to /dev/null."""
    url = f"sqlite:///{workdir / f'{name}.sqlite3'}"  # allowlist *: the bench's fixture servers
    settings = Settings(auth="off", database_url=url, fhir_server_allowlist="*")
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
    wall, cpu = list[float](), list[float]()
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


def cpu_target(workload: str, results: list[LoadResult]) -> Target:
    """Judged at the level where the service's CPU per call is furthest above the floor's."""
    cpu = {(r.concurrency, r.server): r.cpu_ms_per_call for r in results if r.workload == workload}
    pairs = [(cpu[level, "ours"], cpu[level, "floor"]) for level, name in cpu if name == "ours"]
    if not pairs or any(ours is None or not floor for ours, floor in pairs):
        return cpu_per_call(workload, None, None)
    return cpu_per_call(workload, *max(pairs, key=lambda p: (p[0] or 0) / (p[1] or 1)))


@dataclass
class Run:
    """One benchmark run: each part prints its tables, adds its targets to ``found`` and
    returns its figures for the JSON report."""

    plan: Plan
    workdir: Path
    workloads: dict[str, Workload] = field(default_factory=all_workloads)
    found: list[Target] = field(default_factory=list)

    def inprocess(self) -> dict[str, Any]:
        print("\n## In process (Flask test client)\n", flush=True)
        app, rows = make_app(self.workdir, "inprocess"), []
        figures: dict[str, dict[str, Any]] = {}
        fetched = [w for w in self.workloads.values() if w.fhir_server_delay_ms is not None]
        delays = [w.fhir_server_delay_ms or 0 for w in fetched]
        with servers.fixture_servers(fetched, self.workdir, delays) as urls:
            for name, calls in IN_PROCESS_CALLS.items():
                iterations = max(3, calls // self.plan.scale)
                workload, warmup = self.workloads[name], max(1, iterations // 20)
                _progress(f"{name}: {iterations} calls")
                delay = workload.fhir_server_delay_ms
                template = BodyTemplate(workload.request, None if delay is None else urls[delay])
                indexes = range(len(figures) * 10**7, len(figures) * 10**7 + warmup + iterations)
                bodies = [(SERVICE_ID, template.render(i)) for i in indexes]
                post_each(app, bodies[:warmup])
                wall, cpu, statuses, cards = post_each(app, bodies[warmup:])
                figures[name] = {"body_bytes": template.size, "latency_ms": summary(wall)}
                figures[name] |= {"thread_cpu_ms": summary(cpu), "rule_ids": cards}
                figures[name] |= {"statuses": dict(statuses)}
                rows.append(
                    f"{name}|{template.size / 1024:,.0f}|{len(wall)}|"
                    + "|".join(fmt(percentile(wall, q)) for q in (50, 95, 99, 100))
                    + f"|{fmt(percentile(cpu, 50))} / {fmt(percentile(cpu, 99))}|"
                    + f"{_counts(statuses)}|{', '.join(sorted(set(cards))) or '(no card)'}"
                )
                if name in ("typical", "large"):
                    self.found.append(tail(name, cpu, wall))
        headers = "workload|body KiB|n|median ms|p95 ms|p99 ms|max ms|thread CPU median / p99 ms"
        print(table(f"{headers}|statuses|cards", rows), flush=True)
        fast, slow = (figures[f"no-prefetch-{d}ms"]["latency_ms"]["p50"] for d in (0, 50))
        self.found.append(missing_prefetch(len(NO_PREFETCH_MISSING), 50, slow - fast))
        return figures

    def corpus(self) -> dict[str, Any]:
        """Every hook call of fixtures/corpus (Synthea patients, docs/corpus.md), read by the
        corpus's own ``corpus_requests`` (scripts/build_corpus.py owns the format)."""
        print("\n## Real-world corpus (fixtures/corpus), in process\n", flush=True)
        calls: list[Any] = []
        if CORPUS_DIR.is_dir():
            builder = runpy.run_path(str(servers.ROOT / "scripts" / "build_corpus.py"))
            calls = builder["corpus_requests"](CORPUS_DIR)[: self.plan.corpus_calls]
        _progress(f"corpus: {len(calls)} calls")
        bodies = [(call.service_id, orjson.dumps(call.request)) for call in calls]
        wall, _, statuses, _ = post_each(make_app(self.workdir, "corpus"), bodies)
        self.found.append(corpus(statuses, wall))
        print(self.found[-1].measured)
        figures = {"calls": len(calls), "statuses": dict(statuses), "total_ms": sum(wall)}
        return figures | {"latency_ms": summary(wall)}

    def first_calls(self) -> list[dict[str, Any]]:
        print("\n## First call of a fresh worker (`cds-service serve`, 1 worker, over HTTP)\n")
        rows, figures = [], []
        for name in ("typical", "suggestion"):
            cpu, wall = [], []
            for start in range(1, self.plan.fresh_starts + 1):
                _progress(f"fresh worker: {name}, start {start}")
                calls = servers.first_calls(
                    self.workloads[name], self.workdir, start, self.plan.later_calls
                )
                cpu.append(calls[0])
                wall.append(calls[1])
                figures.append({"workload": name, "cpu_ms": calls[0], "wall_ms": calls[1]})
                rows.append(
                    f"{name}|{start}|{fmt(cpu[-1][0])}|{fmt(wall[-1][0])}|"
                    f"{fmt(percentile(cpu[-1][1:], 50))}|{fmt(percentile(wall[-1][1:], 50))}|"
                    + ", ".join(map(str, sorted(calls[2])))
                )
            self.found.append(first_call(name, cpu, wall))
        headers = "workload|start|first CPU ms|first ms|later CPU median ms|later median ms"
        print(table(f"{headers}|statuses", rows), flush=True)
        return figures

    def http(self, baseline: Path | None = None) -> list[dict[str, Any]]:
        """``serve`` and the floor (and ``baseline``'s ``serve``, typical only) in alternating
        rounds; the CPU target takes the level where ours is furthest above the floor."""
        print("\n## Over HTTP: `cds-service serve` against the floor (same gunicorn setup)\n")
        results: list[LoadResult] = []
        with contextlib.ExitStack() as stack:
            start = partial(servers.started_server, workdir=self.workdir)
            started = [stack.enter_context(start("ours")), stack.enter_context(start("floor"))]
            if baseline is not None:
                started.append(stack.enter_context(start("baseline", code=baseline)))
            for name, levels in self.plan.levels.items():
                template = BodyTemplate(self.workloads[name].request)
                here = [s for s in started if name == "typical" or s.name != "baseline"]
                for concurrency in levels:
                    runs = {s.name: LoadResult(s.name, name, concurrency) for s in here}
                    for number in range(self.plan.rounds):
                        for server in here if number % 2 == 0 else here[::-1]:
                            _progress(f"{server.name} {name} c={concurrency} round {number + 1}")
                            run = runs[server.name]
                            servers.run_round(run, server, template, *self.plan.round_seconds)
                    results.extend(runs.values())
                self.found.append(cpu_target(name, results))
        rows, figures = [], []
        by_server = {(r.workload, r.concurrency, r.server): r for r in results}
        for r in results:
            ours = by_server[r.workload, r.concurrency, "ours"]
            share = f"{fmt(ours.calls_per_s / r.calls_per_s * 100, 0)} %" if r.calls_per_s else "–"
            latency = summary(r.latencies_ms)
            rows.append(
                f"{r.workload}|{r.concurrency}|{r.server}|{fmt(r.calls_per_s, 0)}|{share}|"
                f"{fmt(latency['p50'])}|{fmt(latency['p99'])}|{fmt(r.cpu_ms_per_call)}|{r.errors}"
            )
            figures.append({**asdict(r), "latencies_ms": "omitted", "latency_ms": latency})
            figures[-1] |= {"calls_per_s": r.calls_per_s, "cpu_ms_per_call": r.cpu_ms_per_call}
        headers = "workload|concurrency|server|calls/s|ours as % of it|median ms|p99 ms"
        print(table(f"{headers}|server CPU ms/call|non-200", rows), flush=True)
        return figures


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


def _counts(statuses: Counter[int]) -> str:
    return ", ".join(f"{status}×{n}" for status, n in sorted(statuses.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few iterations: a smoke run")
    parser.add_argument("--only", choices=("inprocess", "servers"), help="one half of the run")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--baseline", type=Path, help="another checkout: its serve joins typical")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"machine": machine(), "plan": "quick" if args.quick else "full"}
    print("## Machine\n\n" + table("|", [f"{k}|{v}" for k, v in report["machine"].items()]))
    with tempfile.TemporaryDirectory(prefix="cds-bench-") as tmp:
        run = Run(QUICK if args.quick else FULL, Path(tmp))
        try:
            if args.only in (None, "inprocess"):
                report |= {"inprocess": run.inprocess(), "corpus": run.corpus()}
            if args.only in (None, "servers"):
                report |= {"first_call": run.first_calls(), "http": run.http(args.baseline)}
        finally:
            # Queued cards written before their database's directory goes, even after a failure.
            flush_writers_at_exit()
    report["machine"]["loadavg_end"] = _loadavg()
    report["targets"] = [{**asdict(t), "verdict": t.verdict} for t in run.found]
    print(f"\nload average at the end: {report['machine']['loadavg_end']}\n\n## Targets\n")
    rows = [f"{t.name}|{t.goal}|{t.measured}|{t.verdict}" for t in run.found]
    print(table("target|goal|measured|", rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
