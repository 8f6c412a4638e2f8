"""Closed-loop HTTP load on loopback: ``concurrency`` threads, each with one keep-alive
``http.client`` connection, POST as fast as answers come back for a fixed time.

The client shares the 2 CPUs with the server it loads, for the floor and the service alike.
"""

from __future__ import annotations

import http.client
import itertools
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench.servers import LOOPBACK, Server, cpu_seconds
from bench.stats import summary
from bench.workloads import BodyTemplate

# hookInstances never repeat within a run: each call's cards are new rows for the store.
_INDEXES = itertools.count(10**9)
_INDEX_LOCK = threading.Lock()


@dataclass
class LoadResult:
    """One target, workload and concurrency: all its rounds' requests over their measured time."""

    target: str
    workload: str
    concurrency: int
    requests: int = 0
    errors: int = 0  # non-200 answers and failed connections
    seconds: float = 0.0
    # User + system CPU of the server's processes over the measured requests (not the warm-up);
    # None once a round could not read it (a worker gunicorn replaced, say).
    server_cpu_seconds: float | None = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def calls_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms_per_call(self) -> float | None:
        if self.server_cpu_seconds is None or not self.requests:
            return None
        return self.server_cpu_seconds * 1000 / self.requests

    def add_round(
        self, latencies_ms: list[float], errors: int, seconds: float, cpu: float | None
    ) -> None:
        self.requests += len(latencies_ms)
        self.errors += errors
        self.seconds += seconds
        self.latencies_ms.extend(latencies_ms)
        if self.server_cpu_seconds is not None:
            self.server_cpu_seconds = None if cpu is None else self.server_cpu_seconds + cpu

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "workload": self.workload,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": self.seconds,
            "calls_per_s": self.calls_per_s,
            "server_cpu_ms_per_call": self.cpu_ms_per_call,
            "latency_ms": summary(self.latencies_ms),
        }


def _connect(port: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=60)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _client(
    port: int, path: str, template: BodyTemplate, deadline: float, out: list[tuple[float, int]]
) -> None:
    conn = _connect(port)
    headers = {"Content-Type": "application/json"}
    try:
        while time.monotonic() < deadline:
            with _INDEX_LOCK:
                index = next(_INDEXES)
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
            out.append(((time.perf_counter() - started) * 1000, status))
    finally:
        conn.close()


def _phase(
    port: int, path: str, template: BodyTemplate, concurrency: int, seconds: float
) -> tuple[list[tuple[float, int]], float]:
    outs: list[list[tuple[float, int]]] = [[] for _ in range(concurrency)]
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=_client, args=(port, path, template, deadline, out)) for out in outs
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [call for out in outs for call in out], time.perf_counter() - started


def run_round(
    result: LoadResult,
    server: Server,
    path: str,
    template: BodyTemplate,
    seconds: float,
    warmup_seconds: float,
) -> None:
    """Warm up on new connections (not counted), then measure ``seconds`` of load and the CPU
    the server's processes used meanwhile; add both to ``result``."""
    _phase(server.port, path, template, result.concurrency, warmup_seconds)
    pids = server.pids()
    before = cpu_seconds(pids)
    calls, elapsed = _phase(server.port, path, template, result.concurrency, seconds)
    after = cpu_seconds(pids)
    # The CPU figure counts only if the same processes served the whole round.
    same = server.pids() == pids
    cpu = after - before if same and before is not None and after is not None else None
    errors = sum(1 for _, status in calls if status != 200)
    result.add_round([ms for ms, _ in calls], errors, elapsed, cpu)
