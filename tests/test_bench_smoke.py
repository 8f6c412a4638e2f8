"""Smoke test of the benchmark (``python -m bench``): its workloads, its target arithmetic, its
CPU readings and a ``--quick`` in-process run. Nothing here is about time.

The workloads must be what docs/performance.md says, valid FHIR with the intended clinical
content, answered with the expected cards (so the benchmark measures real work); each target
must judge PASS and MISS where it should.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from functools import partial
from pathlib import Path

import pytest

import bench.__main__ as bench_main
from bench import servers
from bench.floor_app import app as floor_app
from bench.servers import LoadResult, cpu_seconds
from bench.workloads import NO_PREFETCH_MISSING, NOISE, SERVICE_ID, BodyTemplate, all_workloads
from cds_service.fhir_models import model_problems
from cds_service.fhir_types import Coding
from cds_service.knowledge import default_knowledge
from cds_service.protocol.feedback import STORE_EXTENSION
from cds_service.protocol.services import PREFETCH_KEYS
from cds_service.store.writer import CardWriter

WORKLOADS = all_workloads()


def test_workloads_are_deterministic_and_sized_as_documented() -> None:
    assert json.dumps(all_workloads()["large"].request) == json.dumps(WORKLOADS["large"].request)
    typical, large = WORKLOADS["typical"], WORKLOADS["large"]
    assert 40 <= len(typical.patient) <= 50
    counts = Counter(r["resourceType"] for r in large.patient)
    assert counts["Observation"] >= 600 and sum(counts.values()) >= 1500
    assert len(large.request["context"]["draftOrders"]["entry"]) == 3
    for workload in WORKLOADS.values():
        ids = [f"{r['resourceType']}/{r['id']}" for r in workload.patient]
        assert len(set(ids)) == len(ids), workload.name
        # Every resource is about the workload's patient, none about a fixture patient.
        subjects = {r["subject"]["reference"] for r in workload.patient if "subject" in r}
        assert subjects == {f"Patient/{workload.request['context']['patientId']}"}


def test_prefetch_keys_are_the_services_own() -> None:
    names = {key.name for key in PREFETCH_KEYS}
    for workload in WORKLOADS.values():
        missing = NO_PREFETCH_MISSING if workload.fhir_server_delay_ms is not None else ()
        assert set(workload.request["prefetch"]) == names - set(missing), workload.name
    assert {w.fhir_server_delay_ms for w in WORKLOADS.values()} == {None, 0, 50}


def test_the_noise_matches_nothing_in_the_knowledge_base() -> None:
    knowledge = default_knowledge()
    noise = [r for r in WORKLOADS["large"].patient if r["id"] >= "bench-large-0018"]
    assert len(noise) > 1000  # every copy after the relevant resources
    for resource in noise:
        concept = resource.get("medicationCodeableConcept") or resource["code"]
        codings = [Coding(c["system"], c["code"], c.get("display")) for c in concept["coding"]]
        if resource["resourceType"] == "Condition":
            assert not knowledge.condition_groups(codings), concept
        elif resource["resourceType"] != "Observation":
            assert knowledge.drug_groups(codings, concept.get("text"))[0] == frozenset(), concept
            assert knowledge.match_magnesium(codings, concept.get("text")) is None, concept
    assert all(isinstance(prefix, str) for prefix in NOISE)


def test_generated_resources_are_valid_fhir_r4() -> None:
    for workload in WORKLOADS.values():
        drafts = [e["resource"] for e in workload.request["context"]["draftOrders"]["entry"]]
        for resource in [*workload.patient[:60], *drafts]:
            assert model_problems(resource, "R4") == [], resource["id"]


def test_each_request_has_its_own_hook_instance() -> None:
    template = BodyTemplate(WORKLOADS["typical"].request)
    first, second = json.loads(template.render(1)), json.loads(template.render(2))
    assert first.pop("hookInstance") != second.pop("hookInstance")
    assert first == second and len(template.render(1)) == template.size


def test_the_suggestion_workload_answers_with_an_update_suggestion(tmp_path: Path) -> None:
    # The fresh-worker target needs a call that builds an update suggestion (the path that
    # loads fhir.resources models): this workload must take it.
    workload = WORKLOADS["suggestion"]
    app = bench_main.make_app(tmp_path, "suggestion", process_wide=False)
    body = BodyTemplate(workload.request).render(0)
    response = app.test_client().post(
        f"/cds-services/{SERVICE_ID}", data=body, content_type="application/json"
    )
    assert response.status_code == 200
    assert workload.expected_rule_ids <= set(bench_main.rule_ids(response.get_json()))
    cards = response.get_json()["cards"]
    actions = [a["type"] for c in cards for s in c.get("suggestions", ()) for a in s["actions"]]
    assert "update" in actions


def test_the_floor_parses_and_answers_no_cards() -> None:
    body = BodyTemplate(WORKLOADS["typical"].request).render(0)
    response = floor_app.test_client().post(
        f"/cds-services/{SERVICE_ID}", data=body, content_type="application/json"
    )
    assert response.status_code == 200 and response.get_json() == {"cards": []}


def test_the_cpu_target_takes_the_level_furthest_above_the_floor() -> None:
    assert bench_main.cpu_per_call("typical", 1.8, 0.6).passed is True  # 3.0×
    missed = bench_main.cpu_per_call("typical", 1.9, 0.6)
    assert missed.verdict == "MISS" and missed.measured == "3.17× (1.90 / 0.60 ms)"

    def result(server: str, concurrency: int, calls: int, cpu: float | None) -> LoadResult:
        return LoadResult(server, "typical", concurrency, calls, 0, 1.0, cpu)

    results = [result("floor", 1, 1000, 0.6), result("ours", 1, 500, 0.6)]  # 2×
    results += [result("floor", 4, 2000, 1.0), result("ours", 4, 1000, 1.25)]  # 2.5×
    worst = bench_main.cpu_target("typical", results)
    assert worst.passed is True and worst.measured.startswith("2.50×")
    results += [result("floor", 16, 100, 1.0), result("ours", 16, 100, None)]  # CPU unread
    assert bench_main.cpu_target("typical", results).verdict == "skipped"


def test_tail_first_call_round_trip_and_corpus_limits() -> None:
    # The tail and the first call are judged on CPU time; the wall clock's is shown.
    wall = [1.0] * 98 + [20.0] * 2
    assert bench_main.tail("typical", [1.0] * 98 + [3.0] * 2, wall).passed is True
    missed = bench_main.tail("typical", [1.0] * 98 + [3.1] * 2, wall)
    assert missed.passed is False and "wall clock 20.00×" in missed.measured
    assert bench_main.first_call("s", [[21.5, 1.5, 1.5]], [[90.0, 2.0, 2.0]]).passed is True
    assert bench_main.first_call("s", [[130.0, 1.5]], [[131.0, 2.0]]).passed is False
    # Several fresh starts: the median of what each first call took more.
    three = [[40.0, 2.0], [12.0, 2.0], [15.0, 2.0]]
    several = bench_main.first_call("typical", three, three)
    assert several.passed is True
    assert several.measured.startswith("CPU +13.00 ms (starts: +10.00, +13.00, +38.00)")
    assert bench_main.missing_prefetch(4, 50, 51.0).passed is True  # 1.02 round trips
    assert bench_main.missing_prefetch(4, 50, 200.0).passed is False  # one per key: 4
    assert bench_main.missing_prefetch(4, 50, 10.0).passed is False  # the delay not applied
    assert bench_main.corpus(Counter(), []).verdict == "skipped"
    assert bench_main.corpus(Counter({200: 2, 412: 1}), [1.0, 2.0, 3.0]).passed is True
    assert bench_main.corpus(Counter({200: 2, 500: 1}), [1.0, 2.0, 3.0]).passed is False


def test_server_cpu_readings_count_user_and_system_time_as_the_kernel_does() -> None:
    times_before, ours_before = os.times(), cpu_seconds([os.getpid()])
    threads_before = servers.thread_cpu_ms([os.getpid()])
    deadline = time.process_time() + 0.15
    while time.process_time() < deadline:  # user time
        sum(range(1000))
    with open("/dev/zero", "rb", buffering=0) as zero:  # system time: the kernel fills pages
        deadline = time.process_time() + 0.3
        while time.process_time() < deadline:
            zero.read(1 << 22)
    times_after, ours_after = os.times(), cpu_seconds([os.getpid()])
    threads_after = servers.thread_cpu_ms([os.getpid()])
    assert ours_before is not None and ours_after is not None
    system = times_after.system - times_before.system
    both = system + times_after.user - times_before.user
    assert system > 0.05  # else this test would not tell user-only from user + system
    assert abs((ours_after - ours_before) - both) < 0.03  # two readings of 10 ms ticks
    # The first-call target's reading: every thread's CPU to the nanosecond.
    assert abs((threads_after - threads_before) / 1000 - both) < 0.03
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert cpu_seconds([pid_max + 1]) is None  # no such process: unknown, not zero


def test_a_failed_run_still_writes_the_queued_cards_before_its_directory_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A part of the run that fails after calls were answered: their cards are still queued
    # (the writer waits out a long window here), and must be written before the work
    # directory is removed, not by a writer thread racing its removal.
    writers: list[CardWriter] = []

    def answer_then_fail(run: bench_main.Run) -> None:
        app = bench_main.make_app(run.workdir, "failing", process_wide=False)
        writer = app.extensions[STORE_EXTENSION].card_writer
        writer.window_s = 60.0
        writers.append(writer)
        body = BodyTemplate(WORKLOADS["typical"].request).render(0)
        _, _, statuses, _ = bench_main.post_each(app, [(SERVICE_ID, body)])
        assert statuses == {200: 1} and writer.batches_written == 0  # still queued
        raise RuntimeError("a part of the run failed")

    monkeypatch.setattr(bench_main.Run, "inprocess", answer_then_fail)
    with pytest.raises(RuntimeError, match="a part of the run failed"):
        bench_main.main(["--quick", "--only", "inprocess"])
    [writer] = writers
    assert writer.batches_written == 1 and writer.pending_cards() == 0


def test_a_quick_in_process_run_answers_every_workload_and_judges_its_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server's GC settings and silenced logs are not for a test session.
    monkeypatch.setattr(bench_main, "make_app", partial(bench_main.make_app, process_wide=False))
    output = tmp_path / "bench.json"
    assert bench_main.main(["--quick", "--only", "inprocess", "--json", str(output)]) == 0
    report = json.loads(output.read_text())
    results = report["inprocess"]
    assert list(results) == ["typical", "large", "no-prefetch-0ms", "no-prefetch-50ms"]
    for name, figures in results.items():
        assert list(figures["statuses"]) == ["200"], name
        assert WORKLOADS[name].expected_rule_ids <= set(figures["rule_ids"]), name
    # The corpus (its first 30 calls with --quick): every one answered, none with a 5xx.
    assert report["corpus"]["calls"] == 30
    assert set(report["corpus"]["statuses"]) <= {"200", "412"}
    verdicts = {t["name"]: t["verdict"] for t in report["targets"]}
    assert list(verdicts) == [
        "typical: p99 in process vs median",
        "large: p99 in process vs median",
        "4 prefetch keys missing, FHIR server 50 ms per request",
        "real-world corpus (fixtures/corpus), in process",
    ]
    assert set(verdicts.values()) <= {"PASS", "MISS"}
    assert verdicts["real-world corpus (fixtures/corpus), in process"] == "PASS"
    assert "## Targets" in capsys.readouterr().out
