"""The first call of a freshly started worker: ``cds-service serve`` started anew with one
worker (so every call reaches the same fresh process), its first hook call timed against the
calls that follow, over one keep-alive connection opened beforehand."""

from __future__ import annotations

import http.client
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

from bench import servers
from bench.stats import percentile
from bench.workloads import BodyTemplate, Workload

_STARTS = itertools.count(1)


@dataclass(frozen=True)
class FirstCall:
    """Every call's wall-clock time and the worker's CPU time over it, the first call first."""

    workload: str
    wall_ms: tuple[float, ...]
    cpu_ms: tuple[float, ...]
    statuses: tuple[int, ...]

    def first_and_later_median(self, values: tuple[float, ...]) -> tuple[float, float]:
        return values[0], percentile(values[1:], 50)

    def to_json(self) -> dict[str, object]:
        (first_wall, later_wall), (first_cpu, later_cpu) = (
            self.first_and_later_median(self.wall_ms),
            self.first_and_later_median(self.cpu_ms),
        )
        return {
            "workload": self.workload,
            "first_ms": first_wall,
            "later_median_ms": later_wall,
            "first_cpu_ms": first_cpu,
            "later_cpu_median_ms": later_cpu,
            "later_calls": len(self.wall_ms) - 1,
            "statuses": sorted(set(self.statuses)),
        }


def measure(workload: Workload, workdir: Path, later_calls: int) -> FirstCall:
    start = next(_STARTS)  # each start its own database and hookInstances
    name = f"fresh-{workload.name}-{start}"
    port = servers.free_port()
    env = servers.server_env(workdir, name, port, workers=1)
    template = BodyTemplate(workload.request)
    path = f"/cds-services/{workload.service_id}"
    wall: list[float] = []
    cpu: list[float] = []
    statuses: list[int] = []
    command = servers.service_command(port)
    with servers.started_server(name, command, env, port, workdir) as server:
        worker = server.descendants()
        conn = http.client.HTTPConnection(servers.LOOPBACK, port, timeout=60)
        conn.connect()
        try:
            for index in range(1 + later_calls):
                body = template.render(start * 10**6 + index)
                cpu_before = servers.thread_cpu_ms(worker)
                started = time.perf_counter()
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                wall.append((time.perf_counter() - started) * 1000)
                cpu.append(servers.thread_cpu_ms(worker) - cpu_before)
                statuses.append(response.status)
        finally:
            conn.close()
    return FirstCall(workload.name, tuple(wall), tuple(cpu), tuple(statuses))
