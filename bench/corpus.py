"""The real-world corpus, timed: every hook request under ``fixtures/corpus/`` (one JSON request
per file, any depth: hook requests derived from Synthea patients), posted once each in process
to the service its ``hook`` names."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from flask import Flask

from bench.stats import summary
from cds_service.protocol.services import SERVICES

CORPUS_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "corpus"
SERVICE_BY_HOOK = {service.hook: service.id for service in SERVICES}


@dataclass
class CorpusResult:
    files: int  # request files found
    posted: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not a hook request of a known hook
    server_errors: list[str] = field(default_factory=list)  # files answered 5xx

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "posted": self.posted,
            "statuses": dict(sorted(self.statuses.items())),
            "total_ms": sum(self.latencies_ms),
            "latency_ms": summary(self.latencies_ms),
            "skipped": self.skipped,
            "server_errors": self.server_errors,
        }


def request_files(directory: Path = CORPUS_DIR) -> list[Path]:
    return sorted(directory.rglob("*.json")) if directory.is_dir() else []


def run(app: Flask, files: list[Path], root: Path = CORPUS_DIR) -> CorpusResult:
    """POST each file's bytes as they are (not re-encoded) to its hook's service."""
    client = app.test_client()
    result = CorpusResult(len(files))
    for path in files:
        body = path.read_bytes()
        try:
            hook = orjson.loads(body).get("hook")
        except (orjson.JSONDecodeError, AttributeError):
            hook = None
        service_id = SERVICE_BY_HOOK.get(hook) if isinstance(hook, str) else None
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        if service_id is None:
            result.skipped.append(name)
            continue
        started = time.perf_counter()
        response = client.post(
            f"/cds-services/{service_id}", data=body, content_type="application/json"
        )
        result.latencies_ms.append((time.perf_counter() - started) * 1000)
        result.posted += 1
        result.statuses[response.status_code] += 1
        if response.status_code >= 500:
            result.server_errors.append(name)
    return result
