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
    workload: str
    first_ms: float
    later_ms: tuple[float, ...]
    statuses: tuple[int, ...]  # of every call, the first included

    @property
    def later_median_ms(self) -> float:
        return percentile(self.later_ms, 50)

    def to_json(self) -> dict[str, object]:
        return {
            "workload": self.workload,
            "first_ms": self.first_ms,
            "later_median_ms": self.later_median_ms,
            "later_calls": len(self.later_ms),
            "statuses": sorted(set(self.statuses)),
        }


def measure(workload: Workload, workdir: Path, later_calls: int) -> FirstCall:
    start = next(_STARTS)  # each start its own database and hookInstances
    name = f"fresh-{workload.name}-{start}"
    port = servers.free_port()
    env = servers.server_env(workdir, name, port, workers=1)
    template = BodyTemplate(workload.request)
    path = f"/cds-services/{workload.service_id}"
    times: list[float] = []
    statuses: list[int] = []
    command = servers.service_command(port)
    with servers.started_server(name, command, env, port, workdir):
        conn = http.client.HTTPConnection(servers.LOOPBACK, port, timeout=60)
        conn.connect()
        try:
            for index in range(1 + later_calls):
                body = template.render(start * 10**6 + index)
                started = time.perf_counter()
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                times.append((time.perf_counter() - started) * 1000)
                statuses.append(response.status)
        finally:
            conn.close()
    return FirstCall(workload.name, times[0], tuple(times[1:]), tuple(statuses))
