"""Real processes for tests: `cds-service` commands on free loopback ports, stopped afterwards.

Output goes to a log file, never a pipe: a pipe nobody reads fills up and blocks the server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

CDS = str(Path(sys.executable).parent / "cds-service")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_pids(master_pid: int) -> set[int]:
    """gunicorn's workers: the children of its master process."""
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    return {int(pid) for pid in children}


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()

    def workers(self) -> set[int]:
        return worker_pids(self.process.pid)


def wait_until_up(
    url: str, process: subprocess.Popen[bytes], log_path: Path | None = None, seconds: float = 60
) -> None:
    """Until ``url`` answers 200 (the process must not exit meanwhile)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise AssertionError(f"process exited with {process.returncode}: {output}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not come up in {seconds} s")


@contextmanager
def run_cds(
    command: list[str],
    env: Mapping[str, str],
    log_path: Path,
    *,
    port: int,
    probe: str = "/healthz",
    workers: int | None = None,
    seconds: float = 60,
) -> Iterator[Served]:
    """Run ``cds-service <command>`` with ``env`` added, until ``probe`` answers (and, for a
    gunicorn server, until ``workers`` workers are up); stop it afterwards."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [CDS, *command], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
        served = Served(f"http://127.0.0.1:{port}", process, log_path)
        try:
            wait_until_up(served.url + probe, process, log_path, seconds)
            if workers is not None:
                deadline = time.monotonic() + seconds
                while len(served.workers()) < workers:
                    assert time.monotonic() < deadline, f"{workers} workers did not come up"
                    time.sleep(0.2)
                # A worker that was just forked may not be in accept() yet.
                time.sleep(0.3)
            yield served
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def demo_env(directory: Path, port: int, fhir_port: int) -> dict[str, str]:
    """The environment of a `cds-service demo` on free ports, its database in ``directory``."""
    return {
        "CDS_PORT": str(port),
        "CDS_FIXTURE_SERVER_PORT": str(fhir_port),
        "CDS_DATABASE_URL": f"sqlite:///{directory / 'demo.sqlite3'}",
        "CDS_WORKERS": "1",
    }
