"""Warm and cold caches: what a call costs when it finds its code and data in the CPU's caches,
and when something else has been through them since its last call.

Over HTTP the service and the floor never run two calls back to back on a warm CPU: between
them the kernel's network stack, the load generator and the other worker run on the same two
cores. This diagnostic calls both apps directly through WSGI (no HTTP, no test client) in one
process, once back to back ("warm") and once with ``SWEEP_MIB`` of memory written between two
calls ("cold", the sweep itself not counted), alternating targets and modes in rounds as the
HTTP part does. It shows how much of the gap to the floor over HTTP comes from the larger
amount of code and data a call of the service touches, rather than from any one stage.
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask

from bench.stats import percentile
from bench.workloads import BodyTemplate, Workload

# Larger than a core's L1 and L2 caches together and than the TLBs' reach, and about half of
# the L3 a core of this VM shares: what a few milliseconds of other processes leave behind.
SWEEP_MIB = 16
# One byte per 64-byte cache line is enough to evict the line.
_CACHE_LINE = 64
MODES = ("warm", "cold")
# A target's first calls in each round and mode are not counted: each mode starts in its own state.
_SETTLE = 5


@dataclass
class ColdResult:
    target: str
    mode: str  # "warm" | "cold"
    cpu_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return percentile(self.cpu_ms, 50)  # NaN without calls

    @property
    def mean_ms(self) -> float:
        """Includes the calls the garbage collector ran in, which the median leaves out."""
        return statistics.fmean(self.cpu_ms) if self.cpu_ms else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "mode": self.mode,
            "calls": len(self.cpu_ms),
            "cpu_median_ms": self.median_ms,
            "cpu_mean_ms": self.mean_ms,
            "statuses": dict(self.statuses),
        }


class CacheSweep:
    """Writes one byte in every cache line of a buffer: evicts what the last call left."""

    def __init__(self, mib: int = SWEEP_MIB) -> None:
        self._buffer = bytearray(mib * 1024 * 1024)
        self._zeros = bytes(len(range(0, len(self._buffer), _CACHE_LINE)))

    def __call__(self) -> None:
        self._buffer[::_CACHE_LINE] = self._zeros


def _environ(path: str, body: bytes) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8080",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def wsgi_call(app: Flask, path: str, body: bytes) -> tuple[int, float, bytes]:
    """One POST through the app's WSGI interface, as gunicorn makes it: (status, CPU ms of
    the call, the answer's body)."""
    status: list[str] = []
    chunks: list[bytes] = []

    def start_response(line: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], object]:
        status.append(line)
        return chunks.append  # the legacy write() callable of PEP 3333

    environ = _environ(path, body)  # the server's work, not the app's
    started = time.thread_time()
    answer = app(environ, start_response)
    try:
        chunks.extend(answer)
    finally:
        close: Callable[[], None] | None = getattr(answer, "close", None)
        if close is not None:
            close()  # Flask's teardown and the request log's after-response work
    cpu_ms = (time.thread_time() - started) * 1000
    return int(status[0].split(" ", 1)[0]), cpu_ms, b"".join(chunks)


def run(
    targets: dict[str, Flask],
    workload: Workload,
    calls_per_round: int,
    rounds: int,
    sweep: Callable[[], None] | None = None,
) -> list[ColdResult]:
    """Each target warm and cold, ``rounds`` times ``calls_per_round`` calls, alternating.

    Every call has a new hookInstance, as in the other parts.
    """
    sweep = sweep or CacheSweep()
    template = BodyTemplate(workload.request)
    path = f"/cds-services/{workload.service_id}"
    results = {(t, m): ColdResult(t, m) for t in targets for m in MODES}
    index = 0
    for round_number in range(rounds):
        order = [(t, m) for m in MODES for t in targets]
        if round_number % 2:
            order.reverse()  # a drift within the run favours neither
        for target, mode in order:
            app, result = targets[target], results[(target, mode)]
            for call in range(_SETTLE + calls_per_round):
                index += 1
                body = template.render(index)
                if mode == "cold":
                    sweep()
                status, cpu_ms, _ = wsgi_call(app, path, body)
                if call < _SETTLE:
                    continue
                result.statuses[status] = result.statuses.get(status, 0) + 1
                result.cpu_ms.append(cpu_ms)
    return list(results.values())


def _statuses(*results: ColdResult) -> str:
    counts: dict[int, int] = {}
    for result in results:
        for status, count in result.statuses.items():
            counts[status] = counts.get(status, 0) + count
    return ", ".join(f"{status}×{count}" for status, count in sorted(counts.items()))


def table(results: list[ColdResult], floor: str, ours: str) -> str:
    by_key = {(r.target, r.mode): r for r in results}
    lines = [
        "| target | calls per mode | CPU ms/call warm | cold | cold − warm | mean warm | mean cold "
        "| statuses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target in dict.fromkeys(r.target for r in results):
        warm, cold = by_key[(target, "warm")], by_key[(target, "cold")]
        lines.append(
            f"| {target} | {len(warm.cpu_ms)} | {warm.median_ms:.3f} | {cold.median_ms:.3f} "
            f"| {cold.median_ms - warm.median_ms:+.3f} | {warm.mean_ms:.3f} | {cold.mean_ms:.3f} "
            f"| {_statuses(warm, cold)} |"
        )
    gap = {
        mode: by_key[(ours, mode)].median_ms - by_key[(floor, mode)].median_ms for mode in MODES
    }
    lines.append(
        f"\n{ours} − {floor}: {gap['warm']:.3f} ms warm, {gap['cold']:.3f} ms cold "
        f"(medians; {SWEEP_MIB} MiB written between two cold calls, not counted)"
    )
    return "\n".join(lines)
