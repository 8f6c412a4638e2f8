"""Servers the benchmark starts (``cds-service serve`` and the floor under gunicorn, fixture FHIR
servers), the CPU they use (from ``/proc``, Linux), and the HTTP clients that load them.

Everything binds to 127.0.0.1. A server is stopped by its own pid (gunicorn's master stops its
workers on SIGTERM); nothing is killed by name.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from bench.workloads import SERVICE_ID, BodyTemplate, Workload, bundle
from cds_service.fixture_server import create_fixture_app, serve_in_background
from cds_service.settings import Settings

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
PATH = f"/cds-services/{SERVICE_ID}"
# hookInstances never repeat within a run: each call's cards are new rows for the store.
_INDEXES = itertools.count(10**9)


def _stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (which may hold spaces or ")"); None when
    the process is gone. Index = proc(5)'s field number - 3: ppid 1, utime 11, stime 12."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pids: Sequence[int]) -> float | None:
    """User + system CPU these processes have used so far; None if any cannot be read."""
    stats = [_stat(pid) for pid in pids]
    if any(s is None for s in stats):
        return None
    return sum(int(s[11]) + int(s[12]) for s in stats if s) / os.sysconf("SC_CLK_TCK")


def thread_cpu_ms(pids: Sequence[int]) -> float:
    """CPU of every live thread of these processes, in ms to the nanosecond (``schedstat``;
    ``stat`` counts 10 ms ticks, too coarse for a first call)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
    return total / 1e6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextmanager
def fixture_servers(
    workloads: Sequence[Workload], workdir: Path, delays: Sequence[int]
) -> Iterator[dict[int, str]]:
    """Fixture FHIR servers over the workloads' patients, one per delay, in threads of this
    process; yields ``{delay_ms: base_url}``."""
    patients = workdir / "patients"
    patients.mkdir(parents=True, exist_ok=True)
    for workload in workloads:
        content = json.dumps(bundle("collection", workload.patient))
        (patients / f"{workload.name}.json").write_text(content, encoding="utf-8")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    with ExitStack() as stack:
        apps = {
            d: create_fixture_app(Settings(fixture_server_delay_ms=d), patients) for d in delays
        }
        yield {d: stack.enter_context(serve_in_background(app)) for d, app in apps.items()}


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    def pids(self) -> list[int]:
        """The process started and every process under it (gunicorn's master and workers)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            stat = _stat(int(entry.name)) if entry.name.isdigit() else None
            if stat is not None:
                children.setdefault(int(stat[1]), []).append(int(entry.name))
        found = [self.process.pid]
        for pid in found:  # grows as it goes: breadth first
            found.extend(children.get(pid, []))
        return found


@contextmanager
def started_server(
    name: str, workdir: Path, code: Path = ROOT, workers: int | None = None
) -> Iterator[Server]:
    """``cds-service serve`` (the floor app if ``name`` is "floor") as in production, but auth
    off (a JWT's cost is not what is compared) and its own SQLite file; ``code``: the checkout
    whose ``cds_service`` it imports (first on PYTHONPATH). Yields once /healthz answers and
    every worker has booted."""
    port, workers = free_port(), workers or Settings().workers
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    env.update(
        CDS_HOST=LOOPBACK,
        CDS_PORT=str(port),
        CDS_WORKERS=str(workers),
        CDS_AUTH="off",
        CDS_DATABASE_URL=f"sqlite:///{workdir / f'{name}.sqlite3'}",
        PYTHONPATH=os.pathsep.join(filter(None, (str(code), env.get("PYTHONPATH")))),
    )
    script = Path(sys.executable).with_name("cds-service")
    serve = [str(script)] if script.exists() else [sys.executable, "-m", "cds_service.cli"]
    command = [sys.executable, "-m", "bench.floor_app"] if name == "floor" else [*serve, "serve"]
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log, cwd=ROOT)
    server = Server(name, port, process)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace").splitlines()[-30:]
                raise RuntimeError(f"{name} did not start:\n" + "\n".join(tail))
            with (
                suppress(OSError),
                urllib.request.urlopen(f"http://{LOOPBACK}:{port}/healthz", timeout=2) as answer,
            ):
                if answer.status == 200 and len(server.pids()) > workers:
                    break
            time.sleep(0.1)
        yield server
    finally:
        # Its workers, with their start times: one that outlives the master is killed only if
        # it is the same process (pids are reused).
        workers_left = [(pid, _stat(pid)) for pid in server.pids()[1:]]
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        for pid, stat in workers_left:
            now = _stat(pid)
            if stat and now and now[19] == stat[19]:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _connect(port: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=60)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _post(conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request("POST", PATH, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status


@dataclass
class LoadResult:
    """One server, workload and concurrency: all its rounds' calls over their measured time."""

    server: str
    workload: str
    concurrency: int
    calls: int = 0
    errors: int = 0  # non-200 answers and failed connections
    seconds: float = 0.0
    # User + system CPU of the server's processes over the measured calls; None once a round
    # could not read it (a worker gunicorn replaced, say).
    cpu_seconds: float | None = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_call(self) -> float | None:
        cpu, calls = self.cpu_seconds, self.calls
        return None if cpu is None or not calls else cpu * 1000 / calls


def _load(
    port: int, template: BodyTemplate, concurrency: int, seconds: float
) -> list[tuple[float, int]]:
    """Closed loop: ``concurrency`` threads, one keep-alive connection each, POST as fast as
    answers come back; (ms, status) per call. The client shares the CPUs with the server."""
    calls: list[tuple[float, int]] = []
    deadline = time.monotonic() + seconds

    def client() -> None:
        conn = _connect(port)
        while time.monotonic() < deadline:
            body = template.render(next(_INDEXES))
            started = time.perf_counter()
            try:
                status = _post(conn, body)
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = _connect(port)
            calls.append(((time.perf_counter() - started) * 1000, status))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return calls


def run_round(
    result: LoadResult, server: Server, template: BodyTemplate, warmup: float, seconds: float
) -> None:
    """Warm up on new connections (not counted), then add ``seconds`` of load and the CPU the
    server's processes used meanwhile to ``result``; the CPU counts only if the same processes
    served the whole round."""
    _load(server.port, template, result.concurrency, warmup)
    pids = server.pids()
    before, started = cpu_seconds(pids), time.perf_counter()
    calls = _load(server.port, template, result.concurrency, seconds)
    result.seconds += time.perf_counter() - started
    after = cpu_seconds(pids)
    result.calls += len(calls)
    result.errors += sum(1 for _, status in calls if status != 200)
    result.latencies_ms.extend(ms for ms, _ in calls)
    if result.cpu_seconds is not None and before is not None and after is not None:
        result.cpu_seconds += after - before
    if before is None or after is None or server.pids() != pids:
        result.cpu_seconds = None


def first_calls(
    workload: Workload, workdir: Path, start: int, later_calls: int
) -> tuple[list[float], list[float], set[int]]:
    """``cds-service serve`` started anew with one worker (every call reaches the same fresh
    process), ``1 + later_calls`` hook calls over one keep-alive connection opened beforehand:
    the worker's CPU (every thread) and the wall clock per call, and the statuses."""
    template = BodyTemplate(workload.request)
    cpu, wall, statuses = [], [], set()
    with started_server(f"fresh-{workload.name}-{start}", workdir, workers=1) as server:
        worker, conn = server.pids()[1:], _connect(server.port)
        for index in range(1 + later_calls):
            body = template.render(start * 10**6 + index)
            cpu_before, started = thread_cpu_ms(worker), time.perf_counter()
            statuses.add(_post(conn, body))
            wall.append((time.perf_counter() - started) * 1000)
            cpu.append(thread_cpu_ms(worker) - cpu_before)
        conn.close()
    return cpu, wall, statuses
