"""``python -m bench``: the whole benchmark, one command; ``--quick`` for a smoke run.

Prints Markdown tables (machine, knowledge, in-process latency and stages, no-prefetch round
trips, HTTP throughput against the floor, worker memory, targets). Asserts nothing about time:
figures depend on the machine and on what else runs on it, which the header records.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import cold, inprocess, servers
from bench.http_load import LoadGenerator, LoadResult
from bench.stats import fmt, percentile, summary, table
from bench.workloads import BodyTemplate, Workload, all_workloads
from cds_service.context.model import Coding
from cds_service.knowledge import default_knowledge, load_knowledge
from cds_service.settings import Settings
from cds_service.store.writer import flush_writers_at_exit


@dataclass(frozen=True)
class Plan:
    """How much to measure. Iterations are per workload, after a discarded warm-up."""

    iterations: dict[str, tuple[int, int]]  # workload -> (iterations, warm-up)
    jwt_iterations: tuple[int, int]
    levels: dict[str, tuple[int, ...]]  # HTTP concurrency levels per workload
    http_seconds: float  # per target and level, over all rounds
    http_max_requests: int  # per target and level, over all rounds
    http_warmup_seconds: float  # before each round (each opens new connections)
    # Floor and ours alternate this many times per level: the VM's speed changes within
    # seconds, and short alternating rounds let a slow stretch hit both alike.
    http_rounds: int
    profile_iterations: int
    # --diagnose, in process: calls per target, mode and round of the warm/cold comparison.
    cold_calls: int = 250
    cold_rounds: int = 4


FULL = Plan(
    iterations={
        "typical": (3000, 200),
        "large": (150, 5),
        "no-prefetch-0ms": (400, 20),
        "no-prefetch-50ms": (150, 5),
    },
    jwt_iterations=(1500, 100),
    levels={"typical": (1, 4, 16), "large": (1, 4)},
    http_seconds=8.0,
    http_max_requests=50_000,
    http_warmup_seconds=0.5,
    http_rounds=4,
    profile_iterations=30,
)
QUICK = Plan(
    iterations={
        "typical": (30, 3),
        "large": (3, 1),
        "no-prefetch-0ms": (5, 1),
        "no-prefetch-50ms": (3, 1),
    },
    jwt_iterations=(10, 2),
    levels={"typical": (1, 4), "large": (1,)},
    http_seconds=1.0,
    http_max_requests=300,
    http_warmup_seconds=0.2,
    http_rounds=2,
    profile_iterations=3,
    cold_calls=5,
    cold_rounds=2,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few iterations: a smoke run")
    parser.add_argument(
        "--only",
        choices=("inprocess", "http"),
        help="run one part only (default: knowledge, in-process and HTTP)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the large workload in process (cProfile, top functions)",
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="also serve typical with the feedback store in memory, and without the request "
        "log line and card recording (neither is a production setting): what SQLite's commits, "
        "and what those two, cost over HTTP; and time typical and the floor in process with "
        "warm and with cold CPU caches",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL

    report: dict[str, Any] = {"machine": machine(), "plan": "quick" if args.quick else "full"}
    print(_machine_table(report["machine"]), flush=True)
    workloads = {w.name: w for w in all_workloads()}
    with tempfile.TemporaryDirectory(prefix="cds-bench-") as tmp:
        workdir = Path(tmp)
        try:
            if args.only in (None, "inprocess"):
                report["knowledge"] = knowledge_figures()
                print("\n## Knowledge (per process)\n\n" + _knowledge_table(report["knowledge"]))
                report["inprocess"] = run_inprocess(plan, workloads, workdir)
            if args.diagnose:
                report["cold_caches"] = run_cold(plan, workloads["typical"], workdir)
            if args.only in (None, "http"):
                report["http"] = run_http(plan, workloads, workdir, args.diagnose)
            if args.profile:
                print("\n## Profile: large workload, in process\n")
                print(profile_large(plan, workloads["large"], workdir))
        finally:
            # Every in-process app's queued cards written before their database's directory
            # goes, even when a part failed: a card writer still writing would recreate files
            # in it while it is being removed.
            flush_writers_at_exit()
    report["machine"]["loadavg_end"] = _loadavg()
    print(f"\nload average at the end: {report['machine']['loadavg_end']}")
    if "inprocess" in report or "http" in report:
        print("\n## Targets\n\n" + _targets_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        print(f"\nfigures written to {args.json}")
    return 0


# ------------------------------------------------------------------------ machine


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "?"


def _git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return f"{rev}{' + uncommitted changes' if dirty else ''}" if rev else "?"
    except OSError:
        return "?"


def machine() -> dict[str, Any]:
    settings = Settings()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory": _memory_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "revision": _git_revision(),
        "gunicorn": f"{settings.workers} workers x {settings.threads} threads (gthread)",
        "loadavg_start": _loadavg(),
    }


def _machine_table(info: dict[str, Any]) -> str:
    rows = [
        ["date", info["date"]],
        ["CPUs (nproc)", str(info["cpus"])],
        ["CPU model", info["cpu_model"]],
        ["RAM", info["memory"]],
        ["Python", info["python"]],
        ["platform", info["platform"]],
        ["revision", info["revision"]],
        ["gunicorn", info["gunicorn"]],
        ["load average at start (1/5/15 min)", info["loadavg_start"]],
    ]
    return "## Machine\n\n" + table(["", ""], rows)


# ------------------------------------------------------------------------ knowledge


def knowledge_figures() -> dict[str, float]:
    started = time.perf_counter()
    load_knowledge(None)  # read, schema-validate, cross-check and index every file
    load_ms = (time.perf_counter() - started) * 1000
    default_knowledge()  # the process-wide copy (cached after the first call)
    started = time.perf_counter()
    for _ in range(1000):
        knowledge = default_knowledge()
    cached_us = (time.perf_counter() - started) * 1000
    icd = [Coding("http://hl7.org/fhir/sid/icd-10-cm", "G70.00")]
    rx = [Coding("http://www.nlm.nih.gov/research/umls/rxnorm", "198741")]
    loinc = [Coding("http://loinc.org", "19123-9")]
    rounds = 20_000
    figures = {"load_ms": load_ms, "cached_us": cached_us}
    for name, call in (
        ("condition_groups_us", lambda: knowledge.condition_groups(icd)),
        ("match_magnesium_us", lambda: knowledge.match_magnesium(rx, "")),
        ("lab_kind_us", lambda: knowledge.lab_kind(loinc)),
    ):
        started = time.perf_counter()
        for _ in range(rounds):
            call()
        figures[name] = (time.perf_counter() - started) * 1e6 / rounds
    return figures


def _knowledge_table(k: dict[str, float]) -> str:
    rows = [
        ["load + validate + index (once per process)", f"{fmt(k['load_ms'], 1)} ms"],
        ["default_knowledge() again (cached)", f"{fmt(k['cached_us'], 2)} µs"],
        ["condition_groups(1 ICD-10-CM coding)", f"{fmt(k['condition_groups_us'], 2)} µs"],
        ["match_magnesium(1 RxNorm coding)", f"{fmt(k['match_magnesium_us'], 2)} µs"],
        ["lab_kind(1 LOINC coding)", f"{fmt(k['lab_kind_us'], 2)} µs"],
    ]
    return table(["knowledge", "time"], rows)


# ------------------------------------------------------------------------ in process


def run_inprocess(plan: Plan, workloads: dict[str, Workload], workdir: Path) -> dict[str, Any]:
    print("\n## In process (Flask test client)\n", flush=True)
    app = inprocess.make_app(workdir, "inprocess")
    results: list[inprocess.InProcessResult] = []
    for name in ("typical", "large"):
        iterations, warmup = plan.iterations[name]
        _progress(f"{name}: {iterations} iterations")
        results.append(inprocess.run(app, workloads[name], iterations, warmup))

    fetched = [w for w in workloads.values() if w.fhir_server_delay_ms is not None]
    delays = sorted({w.fhir_server_delay_ms or 0 for w in fetched})
    with servers.fixture_servers(fetched, workdir, delays) as urls:
        for workload in fetched:
            iterations, warmup = plan.iterations[workload.name]
            _progress(f"{workload.name}: {iterations} iterations")
            results.append(
                inprocess.run(
                    app,
                    workload,
                    iterations,
                    warmup,
                    fhir_server=urls[workload.fhir_server_delay_ms or 0],
                )
            )

    # Authentication's cost: the typical call with a real ES256 JWT to verify.
    issuer = inprocess.JwtIssuer.create(workdir)
    jwt_app = inprocess.make_app(
        workdir,
        "inprocess-jwt",
        auth="on",
        trusted_issuers_file=str(issuer.issuers_file),
        # What Flask's test client calls; aud is never taken from the Host header.
        external_base_url="http://localhost",
    )
    iterations, warmup = plan.jwt_iterations
    typical = workloads["typical"]
    audience = f"http://localhost/cds-services/{typical.service_id}"
    _progress(f"typical + JWT: {iterations} iterations")
    results.append(
        inprocess.run(
            jwt_app,
            typical,
            iterations,
            warmup,
            variant="JWT ES256",
            headers=issuer.headers(audience, iterations + warmup),
        )
    )

    print(_latency_table(results) + "\n\n" + _stage_table(results), flush=True)
    by_name = {(r.workload, r.variant): r for r in results}
    added = _round_trips(by_name, workloads)
    print("\n" + _round_trip_table(added), flush=True)
    return {
        "results": [
            {
                "workload": r.workload,
                "variant": r.variant,
                "body_bytes": r.body_bytes,
                "latency_ms": summary(r.latencies_ms),
                "cpu_ms": summary(r.cpu_ms),
                "stages_median_ms": {k: percentile(v, 50) for k, v in r.stages_ms.items()},
                "stages_p95_ms": {k: percentile(v, 95) for k, v in r.stages_ms.items()},
                "statuses": dict(r.statuses),
                "rule_ids": list(r.rule_ids),
                "data_issues": r.data_issues,
            }
            for r in results
        ],
        "round_trips": added,
    }


def run_cold(plan: Plan, workload: Workload, workdir: Path) -> dict[str, Any]:
    """--diagnose: typical and the floor through WSGI, with warm and with cold caches."""
    from bench.floor_app import app as floor_app

    print("\n## In process: warm and cold CPU caches (WSGI, typical)\n", flush=True)
    targets = {"floor": floor_app, "ours": inprocess.make_app(workdir, "cold-caches")}
    _progress(
        f"warm/cold: {plan.cold_rounds} rounds of {plan.cold_calls} calls per target and mode"
    )
    results = cold.run(targets, workload, plan.cold_calls, plan.cold_rounds)
    print(cold.table(results, floor="floor", ours="ours"), flush=True)
    return {"sweep_mib": cold.SWEEP_MIB, "results": [r.to_json() for r in results]}


def _progress(message: str) -> None:
    print(f"  … {message}", file=sys.stderr, flush=True)


def _label(r: inprocess.InProcessResult) -> str:
    return f"{r.workload} + {r.variant}" if r.variant else r.workload


def _latency_table(results: list[inprocess.InProcessResult]) -> str:
    rows = []
    for r in results:
        s = summary(r.latencies_ms)
        cpu = summary(r.cpu_ms)
        statuses = ", ".join(f"{code}×{n}" for code, n in sorted(r.statuses.items()))
        rows.append(
            [
                _label(r),
                f"{r.body_bytes / 1024:,.0f}",
                str(len(r.latencies_ms)),
                fmt(s["median"]),
                fmt(s["p95"]),
                fmt(s["p99"]),
                fmt(s["max"]),
                fmt(cpu["median"]),
                fmt(cpu["p99"]),
                statuses,
                _cards(r.rule_ids),
            ]
        )
    headers = ["workload", "body KiB", "n", "median ms", "p95 ms", "p99 ms", "max ms"]
    cpu_headers = ["CPU median ms", "CPU p99 ms"]
    return table([*headers, *cpu_headers, "statuses", "cards (rule ids)"], rows)


def _cards(rule_ids: tuple[str, ...]) -> str:
    if not rule_ids:
        return "(no card)"
    counts: dict[str, int] = {}
    for rule_id in rule_ids:
        counts[rule_id] = counts.get(rule_id, 0) + 1
    return ", ".join(f"{r} ×{n}" if n > 1 else r for r, n in counts.items())


def _stage_table(results: list[inprocess.InProcessResult]) -> str:
    stages = (*inprocess.STAGES, "other")
    rows = [
        [_label(r), *(fmt(percentile(r.stages_ms.get(s, []), 50)) for s in stages)] for r in results
    ]
    return "Median time per stage (ms):\n\n" + table(["workload", *stages], rows)


def _round_trips(
    by_name: dict[tuple[str, str], inprocess.InProcessResult], workloads: dict[str, Workload]
) -> dict[str, float]:
    base = by_name.get(("no-prefetch-0ms", ""))
    slow = by_name.get(("no-prefetch-50ms", ""))
    if base is None or slow is None:
        return {}
    delay = float(workloads["no-prefetch-50ms"].fhir_server_delay_ms or 0)
    added = percentile(slow.latencies_ms, 50) - percentile(base.latencies_ms, 50)
    context_added = percentile(slow.stages_ms.get("context", []), 50) - percentile(
        base.stages_ms.get("context", []), 50
    )
    return {
        "keys_fetched": float(len(workloads["no-prefetch-50ms"].missing_keys)),
        "delay_ms": delay,
        "added_median_ms": added,
        "round_trips": added / delay if delay else 0.0,
        "context_added_ms": context_added,
    }


def _round_trip_table(added: dict[str, float]) -> str:
    if not added:
        return ""
    rows = [
        [
            str(int(added["keys_fetched"])),
            fmt(added["delay_ms"], 0),
            fmt(added["added_median_ms"]),
            fmt(added["round_trips"]),
            fmt(added["context_added_ms"]),
        ]
    ]
    return "No-prefetch: latency the server delay adds (median, 50 ms vs 0 ms):\n\n" + table(
        ["keys fetched", "delay/request ms", "added ms", "= round trips", "context added ms"],
        rows,
    )


# ------------------------------------------------------------------------ over HTTP


def run_http(
    plan: Plan, workloads: dict[str, Workload], workdir: Path, diagnose: bool = False
) -> dict[str, Any]:
    print("\n## Over HTTP (gunicorn, production configuration)\n", flush=True)
    settings = Settings()
    ours_port, floor_port = servers.free_port(), servers.free_port()
    ours_env = servers.production_env(workdir, "http-ours", ours_port, settings)
    floor_env = servers.production_env(workdir, "http-floor", floor_port, settings)
    results: list[LoadResult] = []
    round_ratios: list[dict[str, Any]] = []  # ours/floor in each round, per level
    memory: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(
            servers.gunicorn_server(
                "ours", servers.service_command(ours_port), ours_env, ours_port, workdir
            )
        )
        floor = stack.enter_context(
            servers.gunicorn_server(
                "floor", servers.floor_command(), floor_env, floor_port, workdir
            )
        )
        extra: list[servers.Server] = []
        if diagnose:
            # Not production configurations, typical only: what part of the gap to the floor
            # the file store's commits and locks are, and what the request log line and card
            # recording are, each alone and together.
            memstore_port = servers.free_port()
            variants: tuple[tuple[str, str, list[str], int, dict[str, str]], ...] = (
                # Each worker its own in-memory SQLite: no file commits, no shared write lock.
                (
                    MEMSTORE,
                    "http-memstore",
                    servers.service_command(memstore_port),
                    memstore_port,
                    {"CDS_DATABASE_URL": "sqlite:///:memory:"},
                ),
                # The service without its request line, its card recording, or both.
                *(
                    (target, files, servers.unrecorded_command(*skip), port, {})
                    for target, files, skip, port in (
                        (NO_LOG, "http-no-log", ("log",), servers.free_port()),
                        (NO_RECORDING, "http-no-recording", ("cards",), servers.free_port()),
                        (UNRECORDED, "http-unrecorded", (), servers.free_port()),
                    )
                ),
            )
            for target, files, command, port, overrides in variants:
                env = servers.production_env(workdir, files, port, settings)
                extra.append(
                    stack.enter_context(
                        servers.gunicorn_server(
                            target, command, {**env, **overrides}, port, workdir
                        )
                    )
                )
        load = stack.enter_context(LoadGenerator())
        memory["workers_after_start"] = _worker_memory(ours)
        for name, levels in plan.levels.items():
            workload = workloads[name]
            template = BodyTemplate(workload.request)
            for concurrency in levels:
                targets = (floor, ours, *(extra if name == "typical" else ()))
                rounds: dict[str, list[LoadResult]] = {target.name: [] for target in targets}
                for round_number in range(1, plan.http_rounds + 1):
                    # Floor first in odd rounds, last in even ones: a steady drift within the
                    # level then favours neither.
                    order = targets if round_number % 2 else tuple(reversed(targets))
                    for target in order:
                        _progress(
                            f"{target.name} {name} c={concurrency} "
                            f"(round {round_number}/{plan.http_rounds})"
                        )
                        rounds[target.name].append(
                            run_round(
                                load,
                                target,
                                workload=name,
                                path=f"/cds-services/{workload.service_id}",
                                template=template,
                                concurrency=concurrency,
                                max_requests=plan.http_max_requests // plan.http_rounds,
                                max_seconds=plan.http_seconds / plan.http_rounds,
                                warmup_seconds=plan.http_warmup_seconds,
                            )
                        )
                results.extend(LoadResult.combined(runs) for runs in rounds.values())
                round_ratios.append(
                    {
                        "workload": name,
                        "concurrency": concurrency,
                        # None where the floor answered nothing in a round (JSON has no NaN).
                        "ratios": [
                            ours_round.rps / floor_round.rps if floor_round.rps else None
                            for ours_round, floor_round in zip(
                                rounds[ours.name], rounds[floor.name], strict=True
                            )
                        ],
                        "rounds": {
                            target: [run.to_json() for run in runs]
                            for target, runs in rounds.items()
                        },
                    }
                )
            memory[f"workers_after_{name}"] = _worker_memory(ours)
        memory["floor_workers_at_end"] = _worker_memory(floor)
        memory["master"] = servers.memory_kib(ours.process.pid)
    print(_http_table(results, round_ratios) + "\n\n" + _memory_table(memory), flush=True)
    if diagnose:
        print("\n" + _diagnostic_table(results), flush=True)
    return {
        "results": [r.to_json() for r in results],
        "round_ratios": round_ratios,
        "memory": memory,
    }


def run_round(load: LoadGenerator, target: servers.Server, **plan: Any) -> LoadResult:
    """One round of load on one server, with the CPU its processes used over it.

    The CPU figure counts only if the same processes served the whole round: a worker that
    gunicorn replaced meanwhile (after a crash or a timeout) would be missing from it.
    """
    processes = [target.process.pid, *target.worker_pids()]
    result = load.run(target=target.name, port=target.port, server_pids=processes, **plan)
    if [target.process.pid, *target.worker_pids()] != processes:
        result = replace(result, server_cpu_seconds=None)
    return result


MEMSTORE = "ours, store in memory"
NO_LOG = "ours, no request log"
NO_RECORDING = "ours, no card recording"
UNRECORDED = "ours, no request log or card recording"
DIAGNOSTIC_TARGETS = (MEMSTORE, NO_LOG, NO_RECORDING, UNRECORDED)


def _diagnostic_table(results: list[LoadResult]) -> str:
    by_key = {(r.target, r.workload, r.concurrency): r for r in results}
    rows = []
    for (target, workload, concurrency), r in by_key.items():
        if target not in DIAGNOSTIC_TARGETS:
            continue
        ours, floor = (
            by_key[("ours", workload, concurrency)],
            by_key[("floor", workload, concurrency)],
        )
        rows.append(
            [
                target,
                workload,
                str(concurrency),
                fmt(ours.rps, 0),
                fmt(r.rps, 0),
                f"{fmt(r.rps / floor.rps * 100 if floor.rps else float('nan'), 0)} %",
                fmt(r.latency_ms["median"]),
                fmt(r.latency_ms["p99"]),
                f"{fmt(r.server_cpu_ms_per_call)} / {fmt(ours.server_cpu_ms_per_call)}",
            ]
        )
    headers = ["variant", "workload", "concurrency", "ours req/s", "variant req/s", "of floor"]
    return "Diagnostic variants (not production settings), in the same rounds:\n\n" + table(
        [*headers, "median ms", "p99 ms", "server CPU ms/call variant / ours"], rows
    )


def _worker_memory(server: servers.Server) -> list[dict[str, int]]:
    return [{"pid": pid, **servers.memory_kib(pid)} for pid in server.worker_pids()]


def ratio_range(ratios: list[float | None]) -> str:
    """The lowest and highest ours/floor of the rounds at one level, in per cent."""
    measured = [ratio for ratio in ratios if ratio is not None]
    if not measured:
        return "–"
    low, high = min(measured) * 100, max(measured) * 100
    return f"{fmt(low, 0)}–{fmt(high, 0)} %"


def _round_ratios_by_level(round_ratios: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
    return {(r["workload"], r["concurrency"]): ratio_range(r["ratios"]) for r in round_ratios}


def _http_table(results: list[LoadResult], round_ratios: list[dict[str, Any]]) -> str:
    paired: dict[tuple[str, int], dict[str, LoadResult]] = {}
    for r in results:
        paired.setdefault((r.workload, r.concurrency), {})[r.target] = r
    by_level = _round_ratios_by_level(round_ratios)
    rows = []
    for (workload, concurrency), pair in paired.items():
        ours, floor = pair.get("ours"), pair.get("floor")
        if ours is None or floor is None:
            continue
        ratio = ours.rps / floor.rps * 100 if floor.rps else float("nan")
        rows.append(
            [
                workload,
                str(concurrency),
                fmt(floor.rps, 0),
                fmt(ours.rps, 0),
                f"{fmt(ratio, 0)} %",
                by_level.get((workload, concurrency), "–"),
                fmt(ours.latency_ms["median"]),
                fmt(ours.latency_ms["p95"]),
                fmt(ours.latency_ms["p99"]),
                fmt(floor.latency_ms["median"]),
                fmt(floor.latency_ms["p99"]),
                f"{fmt(ours.server_cpu_ms_per_call)} / {fmt(floor.server_cpu_ms_per_call)}",
                f"{ours.requests}/{floor.requests}",
                f"{ours.errors}/{floor.errors}",
            ]
        )
    headers = [
        "workload",
        "concurrency",
        "floor req/s",
        "ours req/s",
        "ours/floor",
        "ours/floor by round",
        "ours median ms",
        "ours p95 ms",
        "ours p99 ms",
        "floor median ms",
        "floor p99 ms",
        "server CPU ms/call ours / floor",
        "requests ours/floor",
        "non-200 ours/floor",
    ]
    return table(headers, rows)


def _memory_table(memory: dict[str, Any]) -> str:
    rows = []
    for key, label in (
        ("workers_after_start", "our workers, after start"),
        ("workers_after_typical", "our workers, after typical"),
        ("workers_after_large", "our workers, after large"),
        ("floor_workers_at_end", "floor workers, at the end"),
    ):
        workers = memory.get(key) or []
        if not workers:
            continue
        peak = max(w.get("VmHWM", 0) for w in workers)
        rss = max(w.get("VmRSS", 0) for w in workers)
        rows.append([label, str(len(workers)), f"{peak / 1024:,.1f}", f"{rss / 1024:,.1f}"])
    master = memory.get("master") or {}
    if master:
        rows.append(
            [
                "our master (preloaded app)",
                "1",
                f"{master.get('VmHWM', 0) / 1024:,.1f}",
                f"{master.get('VmRSS', 0) / 1024:,.1f}",
            ]
        )
    return "Memory (largest worker):\n\n" + table(
        ["process", "count", "peak RSS (VmHWM) MiB", "RSS now MiB"], rows
    )


# ------------------------------------------------------------------------ profile


def profile_large(plan: Plan, workload: Workload, workdir: Path, top: int = 25) -> str:
    """cProfile of the large workload in process, sorted by own time (the hot spots)."""
    app = inprocess.make_app(workdir, "profile")
    template = BodyTemplate(workload.request)  # the client's work: outside the profile
    inprocess.run(app, workload, 1, 1, template=template)  # warm caches outside the profile
    profiler = cProfile.Profile()
    profiler.enable()
    inprocess.run(app, workload, plan.profile_iterations, 0, template=template)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# ------------------------------------------------------------------------ targets


def _targets_table(report: dict[str, Any]) -> str:
    rows: list[list[str]] = []
    inproc = {
        (r["workload"], r["variant"]): r for r in report.get("inprocess", {}).get("results", [])
    }

    def check(label: str, value: float | None, limit: float, unit: str = "ms") -> None:
        if value is None:
            return
        met = "met" if value <= limit else "**missed**"
        rows.append([label, f"≤ {fmt(limit, 0)} {unit}", f"{fmt(value)} {unit}", met])

    typical = inproc.get(("typical", ""))
    large = inproc.get(("large", ""))
    if typical:
        check("typical median, in process", typical["latency_ms"]["median"], 3)
        check("typical p99, in process", typical["latency_ms"]["p99"], 10)
    if large:
        check("large median, in process", large["latency_ms"]["median"], 40)
    trips = report.get("inprocess", {}).get("round_trips") or {}
    if trips:
        value = trips["round_trips"]
        met = "met" if value < 1.5 else "**missed**"
        rows.append(
            [
                f"no-prefetch, {int(trips['keys_fetched'])} keys, 50 ms delay: added latency",
                "≈ 1 round trip",
                f"{fmt(trips['added_median_ms'])} ms = {fmt(value)} round trips",
                met,
            ]
        )
    http = report.get("http", {}).get("results", [])
    pairs: dict[int, dict[str, float]] = {}
    for r in http:
        if r["workload"] == "typical":
            pairs.setdefault(r["concurrency"], {})[r["target"]] = r["rps"]
    by_level = _round_ratios_by_level(report.get("http", {}).get("round_ratios", []))
    for concurrency, pair in sorted(pairs.items()):
        if pair.get("floor") and "ours" in pair:
            ratio = pair["ours"] / pair["floor"] * 100
            rounds = by_level.get(("typical", concurrency))
            rows.append(
                [
                    f"typical throughput vs floor, concurrency {concurrency}",
                    "≥ 60 %",
                    f"{fmt(ratio, 0)} %" + (f" (rounds {rounds})" if rounds else ""),
                    "met" if ratio >= 60 else "**missed**",
                ]
            )
    return table(["target", "goal", "measured", ""], rows)


if __name__ == "__main__":
    sys.exit(main())
