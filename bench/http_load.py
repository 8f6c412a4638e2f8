"""Closed-loop HTTP load generator, run in its own process.

``concurrency`` threads, each with one keep-alive ``http.client`` connection, POST as fast as
answers come back, until ``max_requests`` or ``max_seconds`` is reached (whichever first).
Loopback only. A separate process keeps the client's GIL away from the benchmark driver; on
a 2-core machine it still shares the CPUs with the server, for the floor and ours alike.
"""

from __future__ import annotations

import http.client
import itertools
import multiprocessing
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.procfs import cpu_seconds
from bench.stats import summary
from bench.workloads import BodyTemplate

LOOPBACK = "127.0.0.1"


@dataclass
class LoadResult:
    target: str
    workload: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latency_ms: dict[str, float] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    # Every request's latency (ms), for combining rounds; not written to the JSON report.
    latencies: list[float] = field(default_factory=list, repr=False)
    # CPU the server's processes used while the requests were measured (user + system).
    server_cpu_seconds: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def server_cpu_ms_per_call(self) -> float | None:
        if self.server_cpu_seconds is None or not self.requests:
            return None
        return self.server_cpu_seconds * 1000 / self.requests

    @classmethod
    def combined(cls, rounds: list[LoadResult]) -> LoadResult:
        """Several rounds of one target, workload and concurrency as one measurement: all
        their requests over all their measured time, percentiles over every latency."""
        first = rounds[0]
        latencies = [value for r in rounds for value in r.latencies]
        statuses: dict[int, int] = {}
        for r in rounds:
            for status, count in r.statuses.items():
                statuses[status] = statuses.get(status, 0) + count
        cpu = [r.server_cpu_seconds for r in rounds]
        return cls(
            first.target,
            first.workload,
            first.concurrency,
            sum(r.requests for r in rounds),
            sum(r.errors for r in rounds),
            sum(r.seconds for r in rounds),
            summary(latencies),
            statuses,
            latencies,
            None if None in cpu else sum(c for c in cpu if c is not None),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            name: value for name, value in asdict(self).items() if name != "latencies"
        } | {"rps": self.rps, "server_cpu_ms_per_call": self.server_cpu_ms_per_call}


class _Shared:
    def __init__(self, max_requests: int, deadline: float, offset: int) -> None:
        self.lock = threading.Lock()
        self.counter = itertools.count(offset)
        self.limit = offset + max_requests
        self.deadline = deadline

    def next_index(self) -> int | None:
        with self.lock:
            index = next(self.counter)
        if index >= self.limit or time.monotonic() >= self.deadline:
            return None
        return index


def _connect(port: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=60)
    conn.connect()
    # One send per request, but keep small writes from waiting for delayed ACKs anyway.
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _client(
    port: int,
    path: str,
    template: BodyTemplate,
    shared: _Shared,
    latencies: list[float],
    statuses: dict[int, int],
) -> None:
    conn = _connect(port)
    headers = {"Content-Type": "application/json", "Connection": "keep-alive"}
    try:
        while (index := shared.next_index()) is not None:
            body = template.render(index)
            started = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                status = response.status
                if response.will_close:
                    conn.close()
                    conn = _connect(port)
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = _connect(port)
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        conn.close()


def _phase(
    port: int,
    path: str,
    template: BodyTemplate,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    offset: int,
) -> tuple[list[float], dict[int, int], float]:
    shared = _Shared(max_requests, time.monotonic() + max_seconds, offset)
    per_thread: list[tuple[list[float], dict[int, int]]] = [([], {}) for _ in range(concurrency)]
    threads = [
        threading.Thread(target=_client, args=(port, path, template, shared, *per_thread[i]))
        for i in range(concurrency)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies = [value for values, _ in per_thread for value in values]
    statuses: dict[int, int] = {}
    for _, counts in per_thread:
        for status, count in counts.items():
            statuses[status] = statuses.get(status, 0) + count
    return latencies, statuses, elapsed


def generate_load(
    target: str,
    workload: str,
    port: int,
    path: str,
    template: BodyTemplate,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    warmup_seconds: float,
    offset: int,
    server_pids: Sequence[int] = (),
) -> LoadResult:
    """Warm up (discarded), then measure. Runs inside the load-generator process.

    ``server_pids``: the server's processes, whose CPU over the measured phase (not the
    warm-up) the result reports; read here, where the phase starts and ends.
    """
    if warmup_seconds > 0:
        _phase(port, path, template, concurrency, 10**9, warmup_seconds, offset + 10**8)
    cpu_before = cpu_seconds(server_pids) if server_pids else None
    latencies, statuses, elapsed = _phase(
        port, path, template, concurrency, max_requests, max_seconds, offset
    )
    cpu_after = cpu_seconds(server_pids) if server_pids else None
    server_cpu = (
        cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    )
    errors = sum(count for status, count in statuses.items() if status != 200)
    return LoadResult(
        target,
        workload,
        concurrency,
        len(latencies),
        errors,
        elapsed,
        summary(latencies),
        statuses,
        latencies,
        server_cpu,
    )


class LoadGenerator:
    """One long-lived load-generator process (started once, reused for every run)."""

    def __init__(self) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")
        )
        self._runs = 0

    def run(self, **kwargs: Any) -> LoadResult:
        # Each run gets its own range of hookInstances: no call repeats an earlier one.
        self._runs += 1
        result: LoadResult = self._pool.submit(
            generate_load, offset=self._runs * 10**9, **kwargs
        ).result()
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
