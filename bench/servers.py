"""Processes the benchmark starts: the fixture FHIR server and gunicorn servers (the service's
``cds-service serve`` and the floor), and the CPU they use (from ``/proc``, Linux).

Everything binds to 127.0.0.1 only. Each process is stopped by its own pid (gunicorn's master
stops its workers on SIGTERM); nothing is killed by name.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from bench.workloads import Workload
from cds_service.settings import Settings

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
# Indices into stat_fields(): proc(5)'s field numbers minus 3 (the list starts after the
# pid and the command name).
PPID, UTIME, STIME, START_TIME = 1, 11, 12, 19


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the parenthesised command name (which may hold spaces or
    ")"), or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def cpu_seconds(pids: Sequence[int]) -> float | None:
    """User + system CPU these processes have used so far; None if any cannot be read."""
    ticks = 0
    for pid in pids:
        fields = stat_fields(pid)
        if fields is None:
            return None
        ticks += int(fields[UTIME]) + int(fields[STIME])
    return ticks / os.sysconf("SC_CLK_TCK")


def thread_cpu_ms(pids: Sequence[int]) -> float:
    """CPU time of every thread of these processes, in ms to the nanosecond
    (``/proc/<pid>/task/<tid>/schedstat``; ``stat`` counts 10 ms ticks); a thread that ended
    is no longer in it."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
    return total / 1e6


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------ fixture FHIR server


def _fixture_server_main(patients_dir: str, delays: Sequence[int], conn: Connection) -> None:
    """Child process: one fixture server per delay, until the parent says stop."""
    from cds_service.fixture_server import create_fixture_app, serve_in_background

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    with ExitStack() as stack:
        urls = {}
        for delay in delays:
            app = create_fixture_app(
                Settings(fixture_server_delay_ms=delay), fixtures_dir=Path(patients_dir)
            )
            urls[delay] = stack.enter_context(serve_in_background(app, LOOPBACK, 0))
        conn.send(urls)
        conn.recv()  # block until told to stop


@contextmanager
def fixture_servers(
    workloads: Sequence[Workload], workdir: Path, delays: Sequence[int]
) -> Iterator[dict[int, str]]:
    """Fixture servers over the workloads' patients, in their own process (not sharing the
    benchmark's GIL); yields ``{delay_ms: base_url}``."""
    patients = workdir / "patients"
    patients.mkdir(parents=True, exist_ok=True)
    for workload in workloads:
        bundle = workload.patient_bundle()
        (patients / f"{bundle['id']}.json").write_text(json.dumps(bundle), encoding="utf-8")
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(
        target=_fixture_server_main, args=(str(patients), list(delays), child), daemon=True
    )
    process.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the fixture FHIR server did not start within 60 s")
        yield parent.recv()
    finally:
        with suppress(BrokenPipeError, EOFError, OSError):
            parent.send("stop")
        process.join(10)
        if process.is_alive():
            process.terminate()
            process.join(5)


# ------------------------------------------------------------------------ gunicorn servers


def server_env(
    workdir: Path, name: str, port: int, workers: int | None = None, code: Path = ROOT
) -> dict[str, str]:
    """A server's environment: production defaults, no inherited CDS_* settings, auth off
    (a JWT's cost is not what these servers compare), its own SQLite file; ``code``: the
    checkout whose ``cds_service`` it imports (first on PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    env.update(
        {
            "CDS_HOST": LOOPBACK,
            "CDS_PORT": str(port),
            "CDS_WORKERS": str(workers or Settings().workers),
            "CDS_AUTH": "off",
            "CDS_DATABASE_URL": f"sqlite:///{workdir / f'{name}.sqlite3'}",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(code), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
    )
    return env


def service_command(port: int) -> list[str]:
    """``cds-service serve`` as installed next to this interpreter (else via ``-m``); it
    imports the ``cds_service`` its PYTHONPATH names first (``server_env``)."""
    script = Path(sys.executable).with_name("cds-service")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "cds_service.cli"]
    return [*base, "serve", "--host", LOOPBACK, "--port", str(port)]


def floor_command() -> list[str]:
    return [sys.executable, "-m", "bench.floor_app"]


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def descendants(self) -> list[int]:
        """Every process under the one started (gunicorn's workers, and whatever else
        ``serve`` may start), read from ``/proc``."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = stat_fields(int(entry.name))
                if fields is not None:
                    children.setdefault(int(fields[PPID]), []).append(int(entry.name))
        found, queue = [], [self.process.pid]
        while queue:
            kids = children.get(queue.pop(), [])
            found.extend(kids)
            queue.extend(kids)
        return sorted(found)

    def pids(self) -> list[int]:
        return [self.process.pid, *self.descendants()]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _wait_ready(server: Server, workers: int, timeout: float = 60) -> None:
    """Until /healthz answers and every worker has booted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        url = f"{server.base_url}/healthz"
        with suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200 and len(server.descendants()) >= workers:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} not ready within {timeout:.0f} s:\n{server.log_tail()}")


@contextmanager
def started_server(
    name: str, command: list[str], env: dict[str, str], port: int, workdir: Path
) -> Iterator[Server]:
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    server = Server(name, port, process, log_path)
    try:
        _wait_ready(server, int(env["CDS_WORKERS"]))
        yield server
    finally:
        _stop(server)


def _stop(server: Server) -> None:
    workers = [(pid, _start_time(pid)) for pid in server.descendants()]
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=5)
    for pid, started in workers:
        # Only a process under the one we started that outlived it (same pid, same start).
        if _start_time(pid) == started:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _start_time(pid: int) -> int | None:
    fields = stat_fields(pid)
    return None if fields is None else int(fields[START_TIME])
