"""``python -m bench``: the whole benchmark, one command; ``--quick`` for a smoke run.

Prints Markdown tables (machine, in process, the real-world corpus, a fresh worker's first
call, HTTP against the floor) and the targets, each PASS or MISS: ratios of figures measured
in the same run, since these shared machines change speed from minute to minute.
``--json FILE`` writes every figure; ``--baseline DIR`` serves another checkout's code in
the same HTTP rounds, to compare two revisions' throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import corpus, fresh, inprocess, servers, targets
from bench.http_load import LoadResult, run_round
from bench.stats import fmt, percentile, summary, table
from bench.targets import Target
from bench.workloads import BodyTemplate, Workload, all_workloads
from cds_service.settings import Settings
from cds_service.store.writer import flush_writers_at_exit


@dataclass(frozen=True)
class Plan:
    """How much to measure. In-process iterations are per workload, after a discarded warm-up."""

    iterations: dict[str, tuple[int, int]]  # workload -> (iterations, warm-up)
    fresh_starts: int  # fresh starts of `cds-service serve` per workload
    later_calls: int  # a fresh worker's calls after its first
    levels: dict[str, tuple[int, ...]]  # HTTP concurrency levels per workload
    # Floor and service alternate in this many rounds per level (floor first in odd rounds):
    # a slow stretch of the VM then hits both alike.
    http_rounds: int
    round_seconds: float  # measured, per target and round
    warmup_seconds: float  # before each round, on new connections
    corpus_calls: int | None  # None: every call


FULL = Plan(
    iterations={
        "typical": (3000, 200),
        "large": (150, 5),
        "no-prefetch-0ms": (400, 20),
        "no-prefetch-50ms": (150, 5),
    },
    fresh_starts=3,
    later_calls=30,
    levels={"typical": (1, 4, 16), "large": (1,)},
    http_rounds=4,
    round_seconds=2.0,
    warmup_seconds=0.5,
    corpus_calls=None,
)
QUICK = Plan(
    iterations={
        "typical": (30, 3),
        "large": (3, 1),
        "no-prefetch-0ms": (5, 1),
        "no-prefetch-50ms": (3, 1),
    },
    fresh_starts=1,
    later_calls=5,
    levels={"typical": (1, 4), "large": (1,)},
    http_rounds=2,
    round_seconds=0.5,
    warmup_seconds=0.2,
    corpus_calls=30,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few iterations: a smoke run")
    parser.add_argument(
        "--only",
        choices=("inprocess", "servers"),
        help="inprocess: latency, missing prefetch and the corpus in this process; servers: "
        "a fresh worker's first call and HTTP against the floor (default: both)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of another revision (git worktree add DIR REV): its `cds-service "
        "serve` joins the typical HTTP rounds, run by this environment's Python",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL

    report: dict[str, Any] = {"machine": machine(), "plan": "quick" if args.quick else "full"}
    print("## Machine\n\n" + table(["", ""], [[k, str(v)] for k, v in report["machine"].items()]))
    workloads = {w.name: w for w in all_workloads()}
    found: list[Target] = []
    with tempfile.TemporaryDirectory(prefix="cds-bench-") as tmp:
        workdir = Path(tmp)
        try:
            if args.only in (None, "inprocess"):
                report["inprocess"] = run_inprocess(plan, workloads, workdir, found)
                report["corpus"] = run_corpus(plan, workdir, found)
            if args.only in (None, "servers"):
                report["first_call"] = run_first_calls(plan, workloads, workdir, found)
                report["http"] = run_http(plan, workloads, workdir, found, args.baseline)
        finally:
            # Every in-process app's queued cards written before their database's directory
            # goes, even when a part failed.
            flush_writers_at_exit()
    report["machine"]["loadavg_end"] = _loadavg()
    report["targets"] = [t.to_json() for t in found]
    print(f"\nload average at the end: {report['machine']['loadavg_end']}")
    print("\n## Targets\n\n" + targets.targets_table(found), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        print(f"\nfigures written to {args.json}")
    return 0


def _progress(message: str) -> None:
    print(f"  … {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ machine


def _loadavg() -> str:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=servers.ROOT, capture_output=True, text=True
    ).stdout.strip()


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    settings = Settings()
    dirty = " + uncommitted changes" if _git("status", "--porcelain") else ""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{os.cpu_count()} x {models[0] if models else platform.processor()}",
        "python": platform.python_version(),
        "revision": _git("rev-parse", "--short", "HEAD") + dirty,
        "serve": f"gunicorn, {settings.workers} workers x {settings.threads} threads (gthread)",
        "loadavg_start": _loadavg(),
    }


# ------------------------------------------------------------------------ in process


def run_inprocess(
    plan: Plan, workloads: dict[str, Workload], workdir: Path, found: list[Target]
) -> dict[str, Any]:
    print("\n## In process (Flask test client)\n", flush=True)
    app = inprocess.make_app(workdir, "inprocess")
    results: list[inprocess.InProcessResult] = []
    for name in ("typical", "large"):
        iterations, warmup = plan.iterations[name]
        _progress(f"{name}: {iterations} calls")
        results.append(inprocess.run(app, workloads[name], iterations, warmup))
    fetched = [w for w in workloads.values() if w.fhir_server_delay_ms is not None]
    delays = sorted({w.fhir_server_delay_ms or 0 for w in fetched})
    with servers.fixture_servers(fetched, workdir, delays) as urls:
        for workload in fetched:
            iterations, warmup = plan.iterations[workload.name]
            _progress(f"{workload.name}: {iterations} calls")
            url = urls[workload.fhir_server_delay_ms or 0]
            results.append(inprocess.run(app, workload, iterations, warmup, fhir_server=url))
    print(_latency_table(results) + "\n\n" + _stage_table(results), flush=True)

    by_name = {r.workload: r for r in results}
    for name in ("typical", "large"):
        result = by_name[name]
        found.append(targets.tail(name, summary(result.cpu_ms), summary(result.latencies_ms)))
    slow, base = workloads["no-prefetch-50ms"], by_name["no-prefetch-0ms"]
    added_ms = percentile(by_name[slow.name].latencies_ms, 50) - percentile(base.latencies_ms, 50)
    found.append(
        targets.missing_prefetch(len(slow.missing_keys), slow.fhir_server_delay_ms or 0, added_ms)
    )
    return {
        "results": [
            {
                "workload": r.workload,
                "body_bytes": r.body_bytes,
                "latency_ms": summary(r.latencies_ms),
                "thread_cpu_ms": summary(r.cpu_ms),
                "stages_median_ms": {k: percentile(v, 50) for k, v in r.stages_ms.items()},
                "statuses": dict(r.statuses),
                "rule_ids": list(r.rule_ids),
            }
            for r in results
        ],
        "missing_prefetch_added_ms": added_ms,
    }


def _latency_table(results: list[inprocess.InProcessResult]) -> str:
    rows = []
    for r in results:
        s, cpu = summary(r.latencies_ms), summary(r.cpu_ms)
        statuses = ", ".join(f"{code}×{n}" for code, n in sorted(r.statuses.items()))
        cards = ", ".join(sorted(set(r.rule_ids))) or "(no card)"
        rows.append(
            [
                r.workload,
                f"{r.body_bytes / 1024:,.0f}",
                str(len(r.latencies_ms)),
                *(fmt(s[k]) for k in ("median", "p95", "p99", "max")),
                fmt(cpu["median"]),
                statuses,
                cards,
            ]
        )
    headers = ["workload", "body KiB", "n", "median ms", "p95 ms", "p99 ms", "max ms"]
    return table([*headers, "thread CPU median ms", "statuses", "cards (rule ids)"], rows)


def _stage_table(results: list[inprocess.InProcessResult]) -> str:
    stages = (*inprocess.STAGES, "other")
    rows = [
        [r.workload, *(fmt(percentile(r.stages_ms.get(s, []), 50)) for s in stages)]
        for r in results
    ]
    return "Median time per stage (ms; record = queuing the issued cards):\n\n" + table(
        ["workload", *stages], rows
    )


def run_corpus(plan: Plan, workdir: Path, found: list[Target]) -> dict[str, Any]:
    print("\n## Real-world corpus (fixtures/corpus), in process\n", flush=True)
    calls = corpus.corpus_calls()
    if not calls:
        print(f"no corpus: {corpus.CORPUS_DIR} holds no calls; skipped")
        found.append(targets.corpus(0, {}, 0.0, 0.0))
        return {"calls": 0}
    if plan.corpus_calls is not None and len(calls) > plan.corpus_calls:
        print(f"--quick: the first {plan.corpus_calls} of {len(calls)} calls\n")
        calls = calls[: plan.corpus_calls]
    _progress(f"corpus: {len(calls)} calls")
    result = corpus.run(inprocess.make_app(workdir, "corpus"), calls)
    figures = result.to_json()
    latency = figures["latency_ms"]
    statuses = ", ".join(f"{s}×{n}" for s, n in sorted(result.statuses.items()))
    headers = ["calls", "statuses", "total s", "median ms", "p99 ms", "max ms"]
    total_s = fmt(figures["total_ms"] / 1000)
    row = [
        str(result.calls),
        statuses,
        total_s,
        *(fmt(latency[k]) for k in ("median", "p99", "max")),
    ]
    print(table(headers, [row]))
    for name in result.server_errors[:10]:
        print(f"5xx: {name}")
    found.append(
        targets.corpus(result.calls, dict(result.statuses), figures["total_ms"], latency["median"])
    )
    return figures


# ------------------------------------------------------------------------ served


def run_first_calls(
    plan: Plan, workloads: dict[str, Workload], workdir: Path, found: list[Target]
) -> list[dict[str, Any]]:
    print("\n## First call of a fresh worker (`cds-service serve`, 1 worker, over HTTP)\n")
    rows, figures = [], []
    for name in ("typical", "suggestion"):
        cpu, wall = [], []
        for number in range(1, plan.fresh_starts + 1):
            _progress(f"fresh worker: {name}, start {number}, 1 + {plan.later_calls} calls")
            call = fresh.measure(workloads[name], workdir, plan.later_calls)
            cpu.append(call.first_and_later_median(call.cpu_ms))
            wall.append(call.first_and_later_median(call.wall_ms))
            figures.append(call.to_json())
            statuses = ", ".join(str(s) for s in sorted(set(call.statuses)))
            numbers = (*cpu[-1], *wall[-1])
            rows.append([name, str(number), *(fmt(v) for v in numbers), statuses])
        found.append(targets.first_call(name, cpu, wall))
    headers = ["workload", "start", "first CPU ms", "later CPU median ms"]
    print(table([*headers, "first ms", "later median ms", "statuses"], rows), flush=True)
    return figures


def run_http(
    plan: Plan,
    workloads: dict[str, Workload],
    workdir: Path,
    found: list[Target],
    baseline: Path | None = None,
) -> dict[str, Any]:
    print("\n## Over HTTP: `cds-service serve` against the floor (same gunicorn setup)\n")
    commands = {
        "ours": (servers.service_command, servers.ROOT),
        "floor": (lambda port: servers.floor_command(), servers.ROOT),
    }
    if baseline is not None:  # the same `serve`, another checkout's code; typical only
        commands[BASELINE] = (servers.service_command, baseline)
    results: list[LoadResult] = []
    with contextlib.ExitStack() as stack:
        started = []
        for name, (command, code) in commands.items():
            port = servers.free_port()
            env = servers.server_env(workdir, f"http-{name}", port, code=code)
            started.append(
                stack.enter_context(servers.started_server(name, command(port), env, port, workdir))
            )
        for name, levels in plan.levels.items():
            workload = workloads[name]
            template = BodyTemplate(workload.request)
            path = f"/cds-services/{workload.service_id}"
            targets_here = [s for s in started if name == "typical" or s.name != BASELINE]
            for concurrency in levels:
                runs = {s.name: LoadResult(s.name, name, concurrency) for s in targets_here}
                for number in range(1, plan.http_rounds + 1):
                    # Reversed every other round: a steady drift then favours no server.
                    order = targets_here if number % 2 else targets_here[::-1]
                    for server in order:
                        _progress(f"{server.name} {name} c={concurrency} round {number}")
                        run_round(
                            runs[server.name],
                            server,
                            path,
                            template,
                            plan.round_seconds,
                            plan.warmup_seconds,
                        )
                results.extend(runs.values())
    print(_http_table(results), flush=True)
    if baseline is not None:
        print(f"\nAgainst the baseline ({baseline}), same rounds:\n\n" + _baseline_table(results))
    for name in plan.levels:
        found.append(_cpu_target(name, results))
    return {"results": [r.to_json() for r in results]}


BASELINE = "baseline"


def _baseline_table(results: list[LoadResult]) -> str:
    """The service against the baseline checkout's, per level: calls/s and server CPU."""
    rows = []
    for (workload, concurrency), runs in _pairs(results).items():
        if BASELINE not in runs:
            continue
        ours, base = runs["ours"], runs[BASELINE]
        change = (ours.calls_per_s / base.calls_per_s - 1) * 100 if base.calls_per_s else None
        rows.append(
            [
                workload,
                str(concurrency),
                fmt(base.calls_per_s, 0),
                fmt(ours.calls_per_s, 0),
                f"{fmt(change, 1)} %",
                f"{fmt(ours.cpu_ms_per_call)} / {fmt(base.cpu_ms_per_call)}",
            ]
        )
    headers = ["workload", "concurrency", "baseline calls/s", "service calls/s", "change"]
    return table([*headers, "server CPU ms/call service / baseline"], rows)


def _pairs(results: list[LoadResult]) -> dict[tuple[str, int], dict[str, LoadResult]]:
    paired: dict[tuple[str, int], dict[str, LoadResult]] = {}
    for r in results:
        paired.setdefault((r.workload, r.concurrency), {})[r.target] = r
    return paired


def _cpu_target(workload: str, results: list[LoadResult]) -> Target:
    """The level where the service's CPU per call is furthest above the floor's."""
    worst: tuple[float, float | None, float | None] | None = None
    for (name, _), pair in _pairs(results).items():
        ours, floor = pair["ours"].cpu_ms_per_call, pair["floor"].cpu_ms_per_call
        if name != workload:
            continue
        if ours is None or not floor:
            return targets.cpu_per_call(workload, None, None)
        if worst is None or ours / floor > worst[0]:
            worst = (ours / floor, ours, floor)
    return targets.cpu_per_call(workload, *(worst[1:] if worst else (None, None)))


def _http_table(results: list[LoadResult]) -> str:
    rows = []
    for (workload, concurrency), pair in _pairs(results).items():
        ours, floor = pair["ours"], pair["floor"]
        ratio = ours.calls_per_s / floor.calls_per_s if floor.calls_per_s else float("nan")
        latency = summary(ours.latencies_ms)
        rows.append(
            [
                workload,
                str(concurrency),
                fmt(floor.calls_per_s, 0),
                fmt(ours.calls_per_s, 0),
                f"{fmt(ratio * 100, 0)} %",
                fmt(latency["median"]),
                fmt(latency["p99"]),
                f"{fmt(ours.cpu_ms_per_call)} / {fmt(floor.cpu_ms_per_call)}",
                f"{ours.errors} / {floor.errors}",
            ]
        )
    headers = ["workload", "concurrency", "floor calls/s", "ours calls/s", "ours/floor"]
    return table(
        [*headers, "ours median ms", "ours p99 ms", "server CPU ms/call ours / floor", "non-200"],
        rows,
    )


if __name__ == "__main__":
    sys.exit(main())
