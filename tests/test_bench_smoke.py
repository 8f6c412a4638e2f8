"""Smoke test of the benchmark (``python -m bench``): workloads and one call of each.

Nothing here is about time: it checks that the generated workloads are what the README says,
that they are valid FHIR with the intended clinical content, and that the service answers
each with the expected card, so that ``python -m bench`` measures real work.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

import bench.__main__ as bench_main
from bench import cold, inprocess, servers, unrecorded_app
from bench.__main__ import (
    MEMSTORE,
    NO_LOG,
    NO_RECORDING,
    UNRECORDED,
    _diagnostic_table,
    ratio_range,
    run_round,
)
from bench.floor_app import app as floor_app
from bench.http_load import LoadGenerator, LoadResult
from bench.procfs import cpu_seconds
from bench.workloads import (
    IRRELEVANT_CONDITIONS,
    IRRELEVANT_MEDICATIONS,
    LOINC,
    NO_PREFETCH_MISSING,
    OTHER_LABS,
    BodyTemplate,
    all_workloads,
    large,
    typical,
)
from cds_service.app import create_app
from cds_service.context.model import Coding
from cds_service.fhir_models import model_problems
from cds_service.knowledge import default_knowledge
from cds_service.logging_setup import REQUEST_LOGGER
from cds_service.protocol.feedback import STORE_EXTENSION
from cds_service.protocol.services import PREFETCH_KEYS
from cds_service.settings import Settings
from cds_service.store.writer import CardWriter


def _counts(resources: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for resource in resources:
        out[resource["resourceType"]] = out.get(resource["resourceType"], 0) + 1
    return out


def test_workloads_are_deterministic_and_sized_as_documented() -> None:
    assert json.dumps(large().request) == json.dumps(large().request)
    assert _counts(typical().patient) == {
        "Patient": 1,
        "Condition": 20,
        "MedicationRequest": 12,
        "MedicationStatement": 3,
        "Observation": 10,
    }
    big = large()
    counts = _counts(big.patient)
    assert counts["Condition"] == 1000
    assert counts["MedicationRequest"] + counts["MedicationStatement"] == 500
    assert counts["Observation"] == 500
    assert len(big.request["context"]["draftOrders"]["entry"]) == 3


def test_prefetch_keys_are_the_services_own() -> None:
    names = {key.name for key in PREFETCH_KEYS}
    for workload in all_workloads():
        present = set(workload.request["prefetch"])
        assert present == names - set(workload.missing_keys)
    no_prefetch = [w for w in all_workloads() if w.missing_keys]
    assert {w.fhir_server_delay_ms for w in no_prefetch} == {0, 50}
    assert all(set(w.missing_keys) == set(NO_PREFETCH_MISSING) for w in no_prefetch)
    assert "medicationStatements" not in NO_PREFETCH_MISSING


def test_noise_codes_match_nothing_in_the_knowledge_base() -> None:
    knowledge = default_knowledge()
    for icd, snomed, _ in IRRELEVANT_CONDITIONS:
        codings = [
            Coding("http://hl7.org/fhir/sid/icd-10-cm", icd),
            Coding("http://snomed.info/sct", snomed),
        ]
        assert not knowledge.condition_groups(codings), icd
    for code, name, text in IRRELEVANT_MEDICATIONS:
        codings = [Coding("http://www.nlm.nih.gov/research/umls/rxnorm", code, name)]
        assert knowledge.drug_groups(codings, f"{name} ({text})") == (frozenset(), None), name
        assert knowledge.match_magnesium(codings, f"{name} ({text})") is None, name
    for lab in OTHER_LABS:
        assert knowledge.lab_kind([Coding(LOINC, lab[0])]) is None, lab[1]


def test_generated_resources_are_valid_fhir_r4() -> None:
    workload = typical()
    drafts = [e["resource"] for e in workload.request["context"]["draftOrders"]["entry"]]
    drafts += [e["resource"] for e in large().request["context"]["draftOrders"]["entry"]]
    for resource in [*workload.patient, *drafts]:
        assert model_problems(resource, "R4") == [], resource["id"]


def test_each_request_has_its_own_hook_instance() -> None:
    template = BodyTemplate(typical().request)
    first, second = json.loads(template.render(1)), json.loads(template.render(2))
    assert first["hookInstance"] != second["hookInstance"]
    assert len(template.render(1)) == template.size
    first.pop("hookInstance"), second.pop("hookInstance")
    assert first == second


def test_one_call_of_each_workload_answers_with_the_expected_card(tmp_path: Path) -> None:
    workloads = all_workloads()
    # Not process-wide: a server's GC settings and silenced logs are not for a test session.
    app = inprocess.make_app(tmp_path, "smoke", process_wide=False)
    prefetched = [w for w in workloads if w.fhir_server_delay_ms is None]
    fetched = [w for w in workloads if w.fhir_server_delay_ms is not None]
    results = [inprocess.run(app, w, iterations=1, warmup=0) for w in prefetched]
    with servers.fixture_servers(fetched, tmp_path, [0, 50]) as urls:
        for workload in fetched:
            url = urls[workload.fhir_server_delay_ms or 0]
            results.append(inprocess.run(app, workload, 1, 0, fhir_server=url))
    for workload, result in zip([*prefetched, *fetched], results, strict=True):
        assert dict(result.statuses) == {200: 1}, workload.name
        assert workload.expected_rule_ids <= set(result.rule_ids), workload.name
        stages = set(result.stages_ms)
        assert {"parse", "validation", "context", "rules", "cards", "record"} <= stages


def test_a_failed_run_still_writes_the_queued_cards_before_its_directory_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A part of the run that fails after calls were answered: their cards are still queued
    # (the writer waits out a long window here), and must be written before the work
    # directory is removed, not by a writer thread racing its removal.
    writers: list[CardWriter] = []

    def answer_then_fail(plan: object, workloads: object, workdir: Path) -> None:
        app = inprocess.make_app(workdir, "failing", process_wide=False)
        writer = app.extensions[STORE_EXTENSION].card_writer
        writer.window_s = 60.0
        writers.append(writer)
        result = inprocess.run(app, typical(), iterations=1, warmup=0)
        assert dict(result.statuses) == {200: 1}
        assert writer.batches_written == 0  # still queued
        raise RuntimeError("a part of the run failed")

    monkeypatch.setattr(bench_main, "run_inprocess", answer_then_fail)
    with pytest.raises(RuntimeError, match="a part of the run failed"):
        bench_main.main(["--quick", "--only", "inprocess"])
    [writer] = writers
    assert writer.batches_written == 1 and writer.pending_cards() == 0


def test_the_floor_parses_and_answers_no_cards() -> None:
    client = floor_app.test_client()
    body = BodyTemplate(typical().request).render(0)
    path = "/cds-services/magnesium-order-sign"
    response = client.post(path, data=body, content_type="application/json")
    assert response.status_code == 200
    assert response.get_json() == {"cards": []}


def test_alternating_rounds_combine_into_one_measurement_per_target() -> None:
    # Floor and ours alternate in short rounds (the VM's speed changes within seconds); each
    # target's rounds then count as one run: every request over all measured time.
    rounds = [
        LoadResult("ours", "typical", 4, 300, 0, 1.0, {}, {200: 300}, [1.0] * 300),
        LoadResult("ours", "typical", 4, 100, 1, 0.5, {}, {200: 99, 0: 1}, [3.0] * 100),
    ]
    combined = LoadResult.combined(rounds)
    assert (combined.requests, combined.errors, combined.seconds) == (400, 1, 1.5)
    assert round(combined.rps, 3) == round(400 / 1.5, 3)
    assert combined.statuses == {200: 399, 0: 1}
    assert combined.latency_ms["median"] == 1.0 and combined.latency_ms["p99"] == 3.0
    assert "latencies" not in combined.to_json() and combined.to_json()["rps"] == combined.rps
    assert ratio_range([0.512, 0.58, 0.547]) == "51–58 %" and ratio_range([]) == "–"
    assert ratio_range([None, 0.6]) == "60–60 %"  # a round the floor answered nothing in


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(
    ("name", "skip", "logs", "records"),
    [
        ("ours", None, True, True),
        ("no-log", ("log",), False, True),
        ("no-recording", ("cards",), True, False),
        ("unrecorded", ("log", "cards"), False, False),
    ],
)
def test_each_diagnostic_variant_answers_alike_and_skips_only_what_it_names(
    tmp_path: Path, name: str, skip: tuple[str, ...] | None, logs: bool, records: bool
) -> None:
    # `--diagnose` compares the service with these variants to show what each piece of per-call
    # bookkeeping costs: each must do the same clinical work and skip only its own piece.
    body = BodyTemplate(typical().request).render(0)
    path = f"/cds-services/{typical().service_id}"
    request_logger = logging.getLogger(REQUEST_LOGGER)
    level_before = request_logger.level
    seen = _Records()
    request_logger.addHandler(seen)
    settings = Settings(auth="off", database_url=f"sqlite:///{tmp_path / name}.db")
    try:
        app = create_app(settings) if skip is None else unrecorded_app.build_app(settings, skip)
        response = app.test_client().post(path, data=body, content_type="application/json")
        assert response.status_code == 200
        cards = response.get_json()["cards"]
        store = app.extensions[STORE_EXTENSION]
        assert store.flush_recorder()
        issued = store.issued_by(card["uuid"] for card in cards)
        lines = len(seen.records)
    finally:
        request_logger.removeHandler(seen)
        request_logger.setLevel(level_before)  # build_app's setting is process-wide
    assert inprocess.rule_ids_of({"cards": cards}) == ("myasthenia-magnesium",)
    assert lines == (1 if logs else 0)
    assert len(issued) == (len(cards) if records else 0)


@pytest.mark.parametrize(
    ("argv", "skip"),
    [([], ("log", "cards")), (["log"], ("log",)), (["cards"], ("cards",))],
)
def test_the_diagnostic_command_line_names_what_to_skip(
    argv: list[str], skip: tuple[str, ...]
) -> None:
    # What `python -m bench --diagnose` starts: servers.unrecorded_command(*argv).
    command = servers.unrecorded_command(*argv)
    assert command[1:3] == ["-m", "bench.unrecorded_app"]
    assert unrecorded_app.parse_skip(command[3:]) == skip


def test_the_diagnostic_command_line_refuses_what_it_cannot_skip(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        unrecorded_app.parse_skip(["log", "audit"])
    assert exit_info.value.code == 2
    assert "cannot skip audit: choose from log, cards" in capsys.readouterr().err


@pytest.mark.parametrize("skip", [(), ("log", "audit")])
def test_a_diagnostic_variant_refuses_to_skip_nothing_or_something_unknown(
    tmp_path: Path, skip: tuple[str, ...]
) -> None:
    settings = Settings(auth="off", database_url=f"sqlite:///{tmp_path / 'x'}.db")
    with pytest.raises(ValueError, match="skip one or more of"):
        unrecorded_app.build_app(settings, skip)


def test_the_diagnostic_table_shows_each_variant_against_ours_and_the_floor() -> None:
    def result(target: str, requests: int) -> LoadResult:
        latency = {"median": 2.0, "p95": 2.0, "p99": 2.0}
        return LoadResult(target, "typical", 4, requests, 0, 1.0, latency, {200: requests}, [2.0])

    results = [
        result("floor", 2000),
        result("ours", 1000),
        result(MEMSTORE, 1100),
        result(NO_LOG, 1150),
        result(NO_RECORDING, 1200),
        result(UNRECORDED, 1250),
    ]
    lines = _diagnostic_table(results).splitlines()
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines if "typical" in line]
    assert [row[0] for row in rows] == [MEMSTORE, NO_LOG, NO_RECORDING, UNRECORDED]
    # variant, workload, concurrency, ours req/s, variant req/s, share of the floor's
    assert {row[-1] for row in rows} == {"– / –"}  # no CPU figures in these results
    assert [row[1:6] for row in rows] == [
        ["typical", "4", "1,000", "1,100", "55 %"],
        ["typical", "4", "1,000", "1,150", "57 %"],
        ["typical", "4", "1,000", "1,200", "60 %"],
        ["typical", "4", "1,000", "1,250", "62 %"],
    ]


def test_a_load_round_reports_the_servers_cpu_per_measured_call_without_the_warmup(
    tmp_path: Path,
) -> None:
    # The floor under the production gunicorn options, loaded through the real generator:
    # the CPU its processes used while the requests were measured comes back with the round.
    port = servers.free_port()
    env = servers.production_env(tmp_path, "floor", port, Settings(workers=1, threads=2))
    workload = typical()
    with (
        servers.gunicorn_server("floor", servers.floor_command(), env, port, tmp_path) as floor,
        LoadGenerator() as load,
    ):
        processes = [floor.process.pid, *floor.worker_pids()]
        before = cpu_seconds(processes)
        result = run_round(
            load,
            floor,
            workload=workload.name,
            path=f"/cds-services/{workload.service_id}",
            template=BodyTemplate(workload.request),
            concurrency=2,
            max_requests=300,
            max_seconds=20,
            warmup_seconds=1.5,  # at full load, several times the measured requests' CPU
        )
        whole_round = cpu_seconds(processes)
    assert result.requests == 300 and result.statuses == {200: 300}
    assert before is not None and whole_round is not None
    measured = result.server_cpu_seconds
    assert measured is not None and 0 < measured < 0.6 * (whole_round - before)
    cpu_ms = result.server_cpu_ms_per_call
    assert cpu_ms is not None and 0 < cpu_ms < 10  # the floor: well under 1 ms here
    assert result.to_json()["server_cpu_ms_per_call"] == cpu_ms


class _WorkerReplaced(servers.Server):
    """A server whose worker list changes during the round, as when gunicorn replaces one."""

    listed = 0

    def worker_pids(self) -> list[int]:
        self.listed += 1
        workers = super().worker_pids()
        return workers if self.listed == 1 else [*workers, 2**22 + 1]


def test_a_round_whose_workers_changed_has_no_cpu_figure(tmp_path: Path) -> None:
    port = servers.free_port()
    env = servers.production_env(tmp_path, "floor", port, Settings(workers=1, threads=1))
    workload = typical()
    with (
        servers.gunicorn_server("floor", servers.floor_command(), env, port, tmp_path) as floor,
        LoadGenerator() as load,
    ):
        replaced = _WorkerReplaced(floor.name, floor.port, floor.process, floor.log_path)
        result = run_round(
            load,
            replaced,
            workload=workload.name,
            path=f"/cds-services/{workload.service_id}",
            template=BodyTemplate(workload.request),
            concurrency=1,
            max_requests=20,
            max_seconds=20,
            warmup_seconds=0,
        )
    assert result.requests == 20 and result.statuses == {200: 20}
    assert result.server_cpu_seconds is None and result.server_cpu_ms_per_call is None


def test_cpu_seconds_counts_user_and_system_time_as_the_kernel_does() -> None:
    times_before, ours_before = os.times(), cpu_seconds([os.getpid()])
    deadline = time.process_time() + 0.15
    while time.process_time() < deadline:  # user time
        sum(range(1000))
    with open("/dev/zero", "rb", buffering=0) as zero:  # system time: the kernel fills pages
        deadline = time.process_time() + 0.3
        while time.process_time() < deadline:
            zero.read(1 << 22)
    times_after, ours_after = os.times(), cpu_seconds([os.getpid()])
    assert ours_before is not None and ours_after is not None
    system = times_after.system - times_before.system
    both = system + times_after.user - times_before.user
    assert system > 0.05  # else this test would not tell user-only from user + system
    assert abs((ours_after - ours_before) - both) < 0.03  # two readings of 10 ms ticks


def test_server_cpu_combines_over_rounds_and_is_unknown_if_any_round_lacks_it() -> None:
    def round_of(requests: int, cpu: float | None) -> LoadResult:
        return LoadResult("ours", "typical", 4, requests, 0, 1.0, {}, {200: requests}, [1.0], cpu)

    combined = LoadResult.combined([round_of(300, 0.3), round_of(100, 0.2)])
    assert combined.server_cpu_seconds == 0.5 and combined.server_cpu_ms_per_call == 1.25
    unknown = LoadResult.combined([round_of(300, 0.3), round_of(100, None)])
    assert unknown.server_cpu_seconds is None and unknown.server_cpu_ms_per_call is None
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert cpu_seconds([pid_max + 1]) is None  # no such process: unknown, not zero


def test_a_direct_wsgi_call_does_all_a_served_call_does(tmp_path: Path) -> None:
    # The warm/cold diagnostic times calls through WSGI, as gunicorn makes them: the answer,
    # the request line and the recorded cards must all happen inside the timed call.
    request_logger = logging.getLogger(REQUEST_LOGGER)
    seen = _Records()
    request_logger.addHandler(seen)
    try:
        app = inprocess.make_app(tmp_path, "wsgi", process_wide=False)
        body = BodyTemplate(typical().request).render(7)
        status, cpu_ms, answer = cold.wsgi_call(
            app, f"/cds-services/{typical().service_id}", body
        )
        cards = json.loads(answer)["cards"]
        store = app.extensions[STORE_EXTENSION]
        assert store.flush_recorder()
        issued = store.issued_by(card["uuid"] for card in cards)
        hook_instance = json.loads(body)["hookInstance"]
        lines = [r for r in seen.records if getattr(r, "hookInstance", None) == hook_instance]
    finally:
        request_logger.removeHandler(seen)
    assert status == 200
    assert cpu_ms > 0
    assert len(lines) == 1 and lines[0].ruleIds == ["myasthenia-magnesium"]
    assert inprocess.rule_ids_of({"cards": cards}) == ("myasthenia-magnesium",)
    assert len(issued) == len(cards)


def test_the_warm_and_cold_rounds_time_each_target_in_each_mode(tmp_path: Path) -> None:
    sweeps: list[int] = []
    targets = {
        "floor": floor_app,
        "ours": inprocess.make_app(tmp_path, "cold", process_wide=False),
    }
    results = cold.run(
        targets, typical(), calls_per_round=2, rounds=2, sweep=lambda: sweeps.append(1)
    )
    by_key = {(r.target, r.mode): r for r in results}
    assert set(by_key) == {(t, m) for t in ("floor", "ours") for m in ("warm", "cold")}
    for result in results:
        assert result.statuses == {200: 4}  # 2 rounds of 2 counted calls; settling calls not
        assert len(result.cpu_ms) == 4 and all(ms > 0 for ms in result.cpu_ms)
    # The caches are swept before every cold call (counted or settling) and never otherwise.
    assert len(sweeps) == 2 * 2 * (cold._SETTLE + 2)
    report = cold.table(results, floor="floor", ours="ours")
    assert "| floor | 4 |" in report and "| ours | 4 |" in report
    assert "ours − floor:" in report and "200×8" in report


def test_the_cache_sweep_writes_every_cache_line_of_its_buffer() -> None:
    sweep = cold.CacheSweep(mib=1)
    buffer = sweep._buffer
    buffer[:] = b"\xff" * len(buffer)
    sweep()
    assert set(buffer[::64]) == {0}
    assert set(buffer[1::64]) == {0xFF}  # one byte a line: the rest is left as it was
