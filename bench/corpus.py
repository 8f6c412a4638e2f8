"""The real-world corpus, timed: every hook call of ``fixtures/corpus/`` (built from Synthea
patients, see docs/corpus.md), read by the corpus's own ``corpus_requests`` and posted once
each, in process, to its service."""

from __future__ import annotations

import runpy
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from flask import Flask

from bench.stats import summary

ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = ROOT / "fixtures" / "corpus"


@dataclass
class CorpusResult:
    calls: int
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)  # calls answered 5xx

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "statuses": dict(sorted(self.statuses.items())),
            "total_ms": sum(self.latencies_ms),
            "latency_ms": summary(self.latencies_ms),
            "server_errors": self.server_errors,
        }


def corpus_calls(directory: Path = CORPUS_DIR) -> list[Any]:
    """The corpus's calls (``CorpusCall``: ``service_id``, ``request``, ``name``), as
    ``scripts/build_corpus.py``, which owns the format, reads them; none without the corpus."""
    if not directory.is_dir():
        return []
    builder = runpy.run_path(str(ROOT / "scripts" / "build_corpus.py"), run_name="build_corpus")
    calls: list[Any] = builder["corpus_requests"](directory)
    return calls


def run(app: Flask, calls: list[Any]) -> CorpusResult:
    """POST each call once to its service; encoding the body is the client's work, untimed."""
    client = app.test_client()
    result = CorpusResult(len(calls))
    for call in calls:
        body = orjson.dumps(call.request)
        started = time.perf_counter()
        response = client.post(
            f"/cds-services/{call.service_id}", data=body, content_type="application/json"
        )
        result.latencies_ms.append((time.perf_counter() - started) * 1000)
        result.statuses[response.status_code] += 1
        if response.status_code >= 500:
            result.server_errors.append(call.name)
    return result
