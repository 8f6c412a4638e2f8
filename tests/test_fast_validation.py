"""The fast validity check (fastjsonschema) agrees with jsonschema, and errors are unchanged.

``schema_problems`` asks the fast check first and returns at once when it says "valid"; so the
one thing that must never happen is the fast check accepting what jsonschema refuses. These
tests compare the two verdicts on every request fixture, on systematic mutations of them and
on Hypothesis-generated ones, check what the translation refuses, and check over HTTP that an
invalid request still gets exactly the 400 body it got before the fast path existed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from cds_service.app import create_app
from cds_service.protocol import validation
from cds_service.protocol.fast_validation import (
    DRAFT_2020_12,
    UnsupportedSchemaError,
    compile_fast_check,
)
from cds_service.resources import bundled_dir, load_schema
from cds_service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
REQUESTS_DIR = ROOT / "fixtures" / "requests"
FIXTURES = sorted(path.name for path in REQUESTS_DIR.glob("*.json"))
HOOK_REQUEST = "hook-request.schema.json"
FEEDBACK = "feedback.schema.json"
FORMAT_CHECKER = Draft202012Validator.FORMAT_CHECKER

# The schemas that get a fast path. A schema edit that drops one from this set (an unsupported
# keyword) must be a decision, not an accident: hook-request is the hot one.
FAST_SCHEMAS = {HOOK_REQUEST, FEEDBACK}

HOOKS = ["order-select", "order-sign", "patient-view", "medication-prescribe"]
UUID = "8acea8ca-57f0-4143-887d-39ac9d922504"
STAMP = "2025-03-01T10:05:31Z"
# Values of every JSON type, including the ones Python confuses: True == 1, 1.0 == 1.
WRONG_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 1.0, 1.5, "", "x", [], ["x"], {}, {"resourceType": "Bundle"},
]
UUID_STRINGS = [
    UUID,
    UUID.upper(),
    "8ACEA8CA-57f0-4143-887D-39ac9d922504",
    UUID.replace("-", ""),
    UUID[:8] + UUID[9:],  # one dash missing
    UUID[:9] + "-" + UUID[9:],  # one dash too many
    "{" + UUID + "}",
    "{" + UUID.replace("-", "") + "}",
    "urn:uuid:" + UUID,
    UUID + "\n",
    " " + UUID,
    UUID + " ",
    UUID[:-1] + "g",
    UUID[:-1],
    UUID + "0",
    "00000000-0000-0000-0000-000000000000",
    "8acea8ca57f0-4143-887d-39ac-9d922504",  # 36 characters, dashes in the wrong places
    "not-a-uuid",
    "",
]
URL_STRINGS = [
    "http://127.0.0.1:8090",
    "https://fhir.example.org/r4/",
    "HTTP://EXAMPLE.ORG",
    "https://example.org/fhir\n",  # "$" matches before a final newline (re.search)
    "https://example.org/ fhir",
    "ftp://example.org",
    "http://",
    "example.org",
    "https://exa mple.org",
    "",
]
TIMESTAMPS = [
    STAMP,
    "2025-03-01t10:05:31z",
    "2020-12-11T00:00:00.52+01:00",
    "2025-03-01T10:05:31Z\n",
    "2025-02-30T10:05:31Z",  # pattern allows it; date-time (if asserted) does not
    "2025-03-01T24:00:00Z",
    "2025-03-01 10:05:31Z",
    "2025-03-01T10:05:31",
    "2025-03-01T10:05:60Z",
    "yesterday",
    "",
]
# Strings Hypothesis mixes into random values so that it often hits a schema's edge.
INTERESTING_STRINGS = [
    *UUID_STRINGS, *URL_STRINGS, *TIMESTAMPS, *HOOKS, "Bearer", "bearer", "Bundle",
    "accepted", "overridden", "dismissed", "Patient", "x\n", "\U0001d11e",
]


def fast_valid(schema_name: str, instance: Any) -> bool:
    check = validation.fast_check(schema_name)
    assert check is not None
    return check(instance)


def slow_valid(schema_name: str, instance: Any) -> bool:
    return validation.validator(schema_name).is_valid(instance)


def disagreements(schema_name: str, cases: list[tuple[str, Any]]) -> list[str]:
    out = []
    for label, instance in cases:
        before = copy.deepcopy(instance)
        fast, slow = fast_valid(schema_name, instance), slow_valid(schema_name, instance)
        assert instance == before, f"{label}: the fast check changed the instance"
        if fast != slow:
            out.append(f"{label}: fast={fast} jsonschema={slow}")
    return out


def load(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((REQUESTS_DIR / name).read_text(encoding="utf-8"))
    return body


# --- which schemas get a fast path ---------------------------------------------------------


def test_exactly_the_expected_schemas_get_a_fast_path() -> None:
    names = sorted(path.name for path in bundled_dir("schemas").glob("*.schema.json"))
    assert set(names) >= FAST_SCHEMAS
    fast = {name for name in names if validation.fast_check(name) is not None}
    assert fast == FAST_SCHEMAS
    for name in set(names) - FAST_SCHEMAS:
        with pytest.raises(UnsupportedSchemaError, match=name.replace(".", r"\.")):
            compile_fast_check(load_schema(name), name)


def test_a_refused_schema_falls_back_to_jsonschema_alone() -> None:
    # trusted-issuers uses uniqueItems (not on the allowlist): jsonschema still validates it.
    assert validation.fast_check("trusted-issuers.schema.json") is None
    problems = validation.schema_problems({"issuers": [{}]}, "trusted-issuers.schema.json")
    assert {"path": "$.issuers[0].iss", "message": "is required but missing"} in problems
    assert validation.schema_problems({"issuers": []}, "trusted-issuers.schema.json") == []


# --- refusals --------------------------------------------------------------------------------


def schema(**keywords: Any) -> dict[str, Any]:
    return {"$schema": DRAFT_2020_12, **keywords}


@pytest.mark.parametrize(
    ("keywords", "named"),
    [
        ({"unevaluatedProperties": False}, "unevaluatedProperties"),
        ({"properties": {"a": {"unevaluatedItems": False}}}, "unevaluatedItems"),
        ({"$defs": {"d": {"uniqueItems": True}}}, "uniqueItems"),
        ({"prefixItems": [{"type": "string"}]}, "prefixItems"),
        ({"dependentSchemas": {"a": {"required": ["b"]}}}, "dependentSchemas"),
        ({"patternProperties": {"^x$": {"type": "string"}}}, "patternProperties"),
        ({"contains": {"type": "string"}}, "contains"),
        ({"multipleOf": 0.1}, "multipleOf"),
        ({"$anchor": "here"}, "$anchor"),
        ({"dependencies": {"a": ["b"]}}, "dependencies"),  # not a 2020-12 keyword
        ({"const": True}, "const"),  # True == 1 in Python, not in JSON Schema
        ({"const": 1}, "const"),
        ({"enum": ["a", 1]}, "enum"),
        ({"items": [{"type": "string"}]}, "items"),
        ({"$ref": "https://example.org/other.json"}, "references"),
        ({"$ref": "#/$defs/missing"}, "references"),
        ({"properties": {"a": {"$id": "https://example.org/a"}}}, "$id"),
        ({"properties": {"a\\b": {"type": "string"}}}, "plain name"),
        ({"required": ["a", "a"]}, "distinct"),
        ({"minLength": True}, "minLength"),
        ({"minimum": False}, "minimum"),
        ({"type": "float"}, "type"),
        ({"pattern": "("}, "pattern"),
        ({"$schema": "http://json-schema.org/draft-07/schema#"}, "draft 2020-12"),
    ],
)
def test_what_cannot_be_checked_exactly_is_refused(keywords: dict[str, Any], named: str) -> None:
    with pytest.raises(UnsupportedSchemaError) as refused:
        compile_fast_check(schema(**keywords), "example.schema.json")
    assert named in str(refused.value)
    assert "example.schema.json" in str(refused.value)


def test_the_refusal_reaches_schema_problems_as_a_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    strict = schema(type="object", properties={"a": {"type": "string"}},
                    unevaluatedProperties=False)
    monkeypatch.setattr(validation, "load_schema", lambda name: strict)
    validation.fast_check.cache_clear()
    validation.validator.cache_clear()
    try:
        assert validation.fast_check("strict.schema.json") is None
        # jsonschema alone: unevaluatedProperties is still enforced.
        assert validation.schema_problems({"a": "x", "b": 1}, "strict.schema.json")
        assert validation.schema_problems({"a": "x"}, "strict.schema.json") == []
    finally:
        validation.fast_check.cache_clear()
        validation.validator.cache_clear()


# --- the translation, keyword by keyword -----------------------------------------------------


def agree(schema_: dict[str, Any], instances: list[Any]) -> None:
    check = compile_fast_check(schema_, "example.schema.json")
    reference = Draft202012Validator(schema_, format_checker=FORMAT_CHECKER)
    for instance in instances:
        before = copy.deepcopy(instance)
        assert check(instance) == reference.is_valid(instance), instance
        assert instance == before


def test_uuid_format_is_jsonschemas_predicate_not_a_regex() -> None:
    # fastjsonschema does not know "uuid" and would skip it silently.
    agree(schema(type="string", format="uuid"), [*UUID_STRINGS, 1, None])
    check = compile_fast_check(schema(format="uuid"), "example.schema.json")
    assert not check("{" + UUID + "}")  # UUID() parses it; jsonschema also wants the dashes
    assert not check(UUID.replace("-", ""))
    assert check(UUID.upper())


def test_formats_follow_the_format_checker_jsonschema_uses() -> None:
    # Whatever this environment's FORMAT_CHECKER asserts (uri and date-time need optional
    # packages), the fast check asserts too, and nothing more: fastjsonschema's own "uri" and
    # "date-time" regexes are never used.
    for format_, values in [("uri", URL_STRINGS), ("date-time", TIMESTAMPS),
                            ("uuid", UUID_STRINGS), ("email", ["a@b.c", "nope"])]:
        agree(schema(format=format_), [*values, "not a thing", 5])


def test_every_format_used_by_a_fast_schema_passes_non_strings() -> None:
    # fastjsonschema applies a format to strings only; jsonschema asks the checker about any
    # value, so the checker must pass non-strings for the two to agree.
    formats: set[str] = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("format"), str):
                formats.add(node["format"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    for name in FAST_SCHEMAS:
        collect(load_schema(name))
    assert "uuid" in formats
    for format_ in formats:
        for value in WRONG_VALUES:
            if not isinstance(value, str):
                assert FORMAT_CHECKER.conforms(value, format_), (format_, value)


def test_pattern_is_re_search_with_dollar_before_a_final_newline() -> None:
    # fastjsonschema would turn "$" into "\Z"; jsonschema's re.search lets "a\n" match "^a$".
    agree(schema(pattern="^a$"), ["a", "a\n", "a\n\n", "ba", "ab", 1])
    agree(schema(pattern="[$]"), ["$", "a"])
    agree(schema(pattern="b"), ["abc", "ac"])  # search, not match


def test_integers_numbers_and_booleans() -> None:
    instances = [0, 1, -1, 1.0, -1.0, 0.5, True, False, None, "1", 10**30, 1e20]
    agree(schema(type="integer", minimum=0), instances)
    agree(schema(type="number", exclusiveMaximum=1), instances)
    agree(schema(minimum=0.5), instances)  # booleans are not numbers: not compared
    agree(schema(type=["integer", "boolean"]), instances)


def test_const_and_enum_of_strings_and_null() -> None:
    agree(schema(const="Bearer"), ["Bearer", "bearer", "Bearer ", None, 1, True, ["Bearer"]])
    agree(schema(enum=["a", None]), ["a", None, "b", 0, False, []])


def test_min_length_counts_code_points() -> None:
    agree(schema(minLength=2, maxLength=2), ["\U0001d11e", "\U0001d11e\U0001d11e", "ab", "é", 12])


def test_dependent_required_becomes_dependencies() -> None:
    dependent = schema(dependentRequired={"a": ["b", "c"]})
    agree(dependent, [{}, {"a": 1}, {"a": 1, "b": 1}, {"a": 1, "b": 1, "c": 1}, {"b": 1}, [1]])


def test_ref_siblings_are_not_ignored() -> None:
    # draft-07 ignores a $ref's siblings; 2020-12 applies them: translated to allOf.
    with_siblings = schema(
        properties={"x": {"$ref": "#/$defs/s", "minLength": 2, "description": "d"}},
        **{"$defs": {"s": {"type": "string"}}},
    )
    agree(with_siblings, [{"x": "ab"}, {"x": "a"}, {"x": 1}, {}])


def test_if_then_else_all_any_one_not() -> None:
    conditional = schema(
        **{"if": {"required": ["k"], "properties": {"k": {"const": "a"}}}},
        then={"required": ["a"]},
        **{"else": {"required": ["b"]}},
        anyOf=[{"required": ["x"]}, {"required": ["y"]}],
        oneOf=[{"required": ["x"]}, {"not": {"required": ["x"]}}],
        allOf=[{"not": {"required": ["z"]}}],
    )
    instances = [
        {"k": "a", "a": 1, "x": 1}, {"k": "a", "x": 1}, {"k": "b", "b": 1, "y": 1},
        {"k": "b", "a": 1, "y": 1}, {"b": 1}, {"b": 1, "y": 1}, {"b": 1, "y": 1, "z": 1}, 5,
    ]
    agree(conditional, instances)


def test_defaults_are_never_written_into_the_instance() -> None:
    agree(schema(properties={"a": {"default": 1}, "b": {"items": {"default": 2}}}),
          [{}, {"b": []}, {"b": [1]}])


# --- agreement on the request fixtures and their mutations ---------------------------------


def paths(value: Any, prefix: tuple[Any, ...] = (), depth: int = 6) -> Iterator[tuple[Any, ...]]:
    """Every path into ``value`` up to ``depth``, looking at the first two items of arrays."""
    if depth == 0:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*prefix, key)
            yield from paths(item, (*prefix, key), depth - 1)
    elif isinstance(value, list):
        for index, item in enumerate(value[:2]):
            yield (*prefix, index)
            yield from paths(item, (*prefix, index), depth - 1)


def replaced(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    out = copy.deepcopy(body)
    target = out
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return out


def dropped(body: Any, path: tuple[Any, ...]) -> Any:
    out = copy.deepcopy(body)
    target = out
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    return out


def structural_mutants(body: dict[str, Any]) -> list[tuple[str, Any]]:
    """Each key dropped and each value replaced by every JSON type (prefetch kept shallow)."""
    cases: list[tuple[str, Any]] = []
    for path in paths(body):
        if path[0] == "prefetch" and len(path) > 2:
            continue  # FHIR content: the schema only checks prefetch values are objects/null
        cases.append((f"drop {path}", dropped(body, path)))
        cases.extend((f"{path} = {value!r}", replaced(body, path, value))
                     for value in WRONG_VALUES)
    return cases


def hook_request_mutants(body: dict[str, Any]) -> list[tuple[str, Any]]:
    cases: list[tuple[str, Any]] = [("as is", body)]
    cases += [(f"hookInstance {s!r}", {**body, "hookInstance": s}) for s in UUID_STRINGS]
    cases += [(f"fhirServer {s!r}", {**body, "fhirServer": s}) for s in URL_STRINGS]
    for key in ("hook", "hookInstance", "context", "fhirServer", "prefetch"):
        if key in body:
            cases.append((f"drop {key}", dropped(body, (key,))))
    # Both branches of every hook's if/then, whatever this fixture's own hook is.
    for hook in [*HOOKS, "unknown-hook", "", "Order-Select", 1, None]:
        relabelled = {**body, "hook": hook}
        cases.append((f"hook {hook!r}", relabelled))
        for key in list(body.get("context", {})):
            cases.append((f"hook {hook!r} without context.{key}",
                          dropped(relabelled, ("context", key))))
    authorization = {"access_token": "t", "token_type": "Bearer", "expires_in": 3600,
                     "scope": "patient/*.read", "subject": "cds-service", "patient": "p1"}
    with_auth = {**body, "fhirServer": "https://example.org/fhir",
                 "fhirAuthorization": authorization}
    cases.append(("with fhirAuthorization", with_auth))
    cases.append(("fhirAuthorization without fhirServer", dropped(with_auth, ("fhirServer",))))
    for key in authorization:
        cases.append((f"drop fhirAuthorization.{key}",
                      dropped(with_auth, ("fhirAuthorization", key))))
    for value in [*WRONG_VALUES, 0, 3600.0, 3600.5, -0.0, "3600", 10**20]:
        cases.append((f"expires_in {value!r}",
                      replaced(with_auth, ("fhirAuthorization", "expires_in"), value)))
    for value in ["Bearer", "bearer", "Bearer ", "MAC", "", None, True, 1]:
        cases.append((f"token_type {value!r}",
                      replaced(with_auth, ("fhirAuthorization", "token_type"), value)))
    context = body.get("context", {})
    if isinstance(context.get("draftOrders"), dict):
        for value in ["bundle", "Bundle ", None, 1]:
            cases.append((f"draftOrders.resourceType {value!r}",
                          replaced(body, ("context", "draftOrders", "resourceType"), value)))
        cases.append(("draftOrders entry without resource.resourceType",
                      replaced(body, ("context", "draftOrders", "entry"), [{"resource": {}}])))
        cases.append(("draftOrders entry not an object",
                      replaced(body, ("context", "draftOrders", "entry"), ["x"])))
    for selections in [[], [""], ["MedicationRequest/1", 1], "MedicationRequest/1", ["ok"]]:
        cases.append((f"selections {selections!r}",
                      replaced(body, ("context", "selections"), selections)))
    for value in [None, {}, [], 1, "x", {"resourceType": "Patient"}]:
        cases.append((f"prefetch.extra {value!r}", replaced(body, ("prefetch",), {"k": value})))
    for value in [{}, {"a": 1}, [], "x"]:
        cases.append((f"extension {value!r}", {**body, "extension": value}))
    for value in WRONG_VALUES:
        cases.append((f"body {value!r}", value))
    return cases


@pytest.mark.parametrize("fixture", FIXTURES)
def test_fixtures_and_targeted_mutations_agree(fixture: str) -> None:
    body = load(fixture)
    assert fast_valid(HOOK_REQUEST, body) and slow_valid(HOOK_REQUEST, body)
    assert disagreements(HOOK_REQUEST, hook_request_mutants(body)) == []


# One fixture per hook is walked exhaustively (every path, every JSON type).
WALKED = [
    "mg-pyridostigmine.order-select.json",
    "mg-pyridostigmine.order-sign.json",
    "mg-pyridostigmine.patient-view.json",
    "mg-pyridostigmine.medication-prescribe.stu3.json",
    "mg-pyridostigmine.order-select.sandbox.json",
]


@pytest.mark.parametrize("fixture", WALKED)
def test_every_value_of_a_fixture_replaced_by_every_json_type_agrees(fixture: str) -> None:
    body = load(fixture)
    cases = structural_mutants(body)
    assert len(cases) > 100
    assert disagreements(HOOK_REQUEST, cases) == []


# --- feedback bodies (as tests/test_feedback.py sends them) --------------------------------


FEEDBACK_BODIES: list[dict[str, Any]] = [
    {"feedback": [
        {"card": UUID, "outcome": "accepted", "outcomeTimestamp": STAMP,
         "acceptedSuggestions": [{"id": "c2f1d7a0-0000-4000-8000-000000000001"}]},
        {"card": UUID.upper(), "outcome": "overridden", "outcomeTimestamp": STAMP,
         "overrideReason": {"reason": {"code": "benefit-outweighs-risk",
                                       "system": "http://example.org/override"},
                            "userComment": "discussed with neurology"}},
    ]},
    {"feedback": [{"card": UUID, "outcome": "overridden",
                   "outcomeTimestamp": "2020-12-11T00:00:00.52+01:00"}]},
    {"feedback": [{"card": UUID, "outcome": "overridden", "outcomeTimestamp": STAMP,
                   "overrideReason": {"reason": {"code": "c", "system": "s", "display": "d"}},
                   "extension": {"x": 1}}],
     "extension": {"org.example": True}},
]


def feedback_mutants(body: dict[str, Any]) -> list[tuple[str, Any]]:
    cases: list[tuple[str, Any]] = [("as is", body), *structural_mutants(body)]
    item = ("feedback", 0)
    cases += [(f"card {s!r}", replaced(body, (*item, "card"), s)) for s in UUID_STRINGS]
    cases += [(f"outcomeTimestamp {s!r}", replaced(body, (*item, "outcomeTimestamp"), s))
              for s in TIMESTAMPS]
    first = body["feedback"][0]
    for outcome in ["accepted", "overridden", "dismissed", "Accepted", None]:
        relabelled = replaced(body, (*item, "outcome"), outcome)
        cases.append((f"outcome {outcome!r}", relabelled))
        cases.append((f"outcome {outcome!r} with suggestions", replaced(
            relabelled, (*item, "acceptedSuggestions"), [{"id": "s"}])))
        cases.append((f"outcome {outcome!r} with reason", replaced(
            relabelled, (*item, "overrideReason"), {"userComment": "no"})))
    for value in [[], [{}], [{"id": ""}], [{"id": 1}], [{"id": "s", "x": 1}]]:
        cases.append((f"acceptedSuggestions {value!r}",
                      replaced(body, item, {**first, "outcome": "accepted",
                                            "acceptedSuggestions": value})))
    for value in [{}, {"userComment": ""}, {"reason": {}}, {"reason": {"code": ""}},
                  {"reason": {"code": "c"}}, {"extension": {}}]:
        cases.append((f"overrideReason {value!r}",
                      replaced(body, item, {**first, "outcome": "overridden",
                                            "overrideReason": value})))
    cases += [("no items", {"feedback": []}), ("cards", {"cards": []})]
    return cases


@pytest.mark.parametrize("index", range(len(FEEDBACK_BODIES)))
def test_feedback_bodies_and_mutations_agree(index: int) -> None:
    body = FEEDBACK_BODIES[index]
    assert fast_valid(FEEDBACK, body) and slow_valid(FEEDBACK, body)
    assert disagreements(FEEDBACK, feedback_mutants(body)) == []


# --- Hypothesis: random JSON at random places in a valid body -----------------------------


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(INTERESTING_STRINGS),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
KNOWN_KEYS = [
    "hook", "hookInstance", "fhirServer", "fhirAuthorization", "context", "prefetch",
    "extension", "userId", "patientId", "encounterId", "selections", "draftOrders",
    "medications", "resourceType", "entry", "resource", "access_token", "token_type",
    "expires_in", "scope", "subject", "patient", "feedback", "card", "outcome",
    "outcomeTimestamp", "acceptedSuggestions", "overrideReason", "id", "reason",
    "userComment", "code", "system", "display",
]
AUTHORIZED = {
    **load("mg-pyridostigmine.order-select.json"),
    "fhirServer": "https://example.org/fhir",
    "fhirAuthorization": {"access_token": "t", "token_type": "Bearer", "expires_in": 60,
                          "scope": "s", "subject": "x"},
}
HYPOTHESIS_BASES: dict[str, list[Any]] = {
    HOOK_REQUEST: [*(load(name) for name in WALKED[:4]), AUTHORIZED],
    FEEDBACK: FEEDBACK_BODIES,
}


def containers(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Paths of every object and array in ``value`` (arrays: first three items)."""
    if isinstance(value, dict):
        yield prefix
        for key, item in value.items():
            yield from containers(item, (*prefix, key))
    elif isinstance(value, list):
        yield prefix
        for index, item in enumerate(value[:3]):
            yield from containers(item, (*prefix, index))


@st.composite
def mutated(draw: st.DrawFn, schema_name: str) -> Any:
    body = copy.deepcopy(draw(st.sampled_from(HYPOTHESIS_BASES[schema_name])))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        where = draw(st.sampled_from(list(containers(body))))
        target = body
        for part in where:
            target = target[part]
        if isinstance(target, dict):
            key = draw(st.sampled_from(sorted(target)) | st.sampled_from(KNOWN_KEYS)
                       | st.text(max_size=4)) if target else draw(st.sampled_from(KNOWN_KEYS))
            if key in target and draw(st.booleans()):
                del target[key]
            else:
                target[key] = draw(json_values)
        elif target:
            index = draw(st.integers(min_value=0, max_value=len(target) - 1))
            target[index] = draw(json_values)
        else:
            target.append(draw(json_values))
    return body


HYPOTHESIS_SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@HYPOTHESIS_SETTINGS
@given(body=mutated(HOOK_REQUEST))
def test_random_hook_requests_agree(body: Any) -> None:
    assert disagreements(HOOK_REQUEST, [("generated", body)]) == []


@HYPOTHESIS_SETTINGS
@given(body=mutated(FEEDBACK))
def test_random_feedback_agrees(body: Any) -> None:
    assert disagreements(FEEDBACK, [("generated", body)]) == []


# --- over HTTP: the 400 bodies are what they were before the fast path ----------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    database = tmp_path_factory.mktemp("fast-validation") / "cds.sqlite3"
    return create_app(Settings(auth="off", database_url=f"sqlite:///{database}"))


def invalid_select() -> dict[str, Any]:
    # The body of test_service_calls.py::test_schema_violations_are_400_naming_each_path.
    body = load("mg-pyridostigmine.order-select.json")
    body.pop("fhirServer", None)
    body["hookInstance"] = "not-a-uuid"
    del body["context"]["selections"]
    body["fhirAuthorization"] = {"access_token": "t", "token_type": "MAC", "expires_in": 1,
                                 "scope": "s", "subject": "x"}
    return body


def invalid_sign() -> dict[str, Any]:
    body = load("mg-pyridostigmine.order-sign.json")
    body.pop("fhirServer", None)
    body["hookInstance"] = "{" + body["hookInstance"].upper() + "}"
    body["context"]["draftOrders"] = {"resourceType": "Bundle", "entry": [{"resource": {}}]}
    body["fhirAuthorization"] = {"access_token": "t", "token_type": "Bearer", "expires_in": True,
                                 "scope": "s", "subject": "x"}
    return body


UUID_PATTERN = "'^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'"
STAMP_PATTERN = (
    "'^\\\\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\\\\d|3[01])[Tt](?:[01]\\\\d|2[0-3]):[0-5]\\\\d:"
    "(?:[0-5]\\\\d|60)(?:\\\\.\\\\d+)?(?:[Zz]|[+-](?:[01]\\\\d|2[0-3]):[0-5]\\\\d)$'"
)
HOOK_ERROR = "the hook request does not conform to CDS Hooks 2.0"
# Recorded from the service before the fast path was added.
BEFORE: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "order-select": ("/cds-services/magnesium-order-select", invalid_select(), {
        "error": "invalid-request",
        "message": HOOK_ERROR,
        "problems": [
            {"path": "$.fhirServer", "message": "is required but missing"},
            {"path": "$.context.selections", "message": "is required but missing"},
            {"path": "$.fhirAuthorization.token_type", "message": "'Bearer' was expected"},
            {"path": "$.hookInstance", "message": "'not-a-uuid' is not a 'uuid'"},
            {"path": "$.hookInstance", "message": f"'not-a-uuid' does not match {UUID_PATTERN}"},
        ],
    }),
    "order-sign": ("/cds-services/magnesium-order-sign", invalid_sign(), {
        "error": "invalid-request",
        "message": HOOK_ERROR,
        "problems": [
            {"path": "$.fhirServer", "message": "is required but missing"},
            {"path": "$.context.draftOrders.entry[0].resource.resourceType",
             "message": "is required but missing"},
            {"path": "$.fhirAuthorization.expires_in",
             "message": "True is not of type 'integer'"},
            {"path": "$.hookInstance",
             "message": "'{8ACEA8CA-57F0-5143-887D-39AC9D922504}' is not a 'uuid'"},
            {"path": "$.hookInstance", "message": "'{8ACEA8CA-57F0-5143-887D-39AC9D922504}' "
                                                  f"does not match {UUID_PATTERN}"},
        ],
    }),
    "feedback": ("/cds-services/magnesium-order-select/feedback", {"feedback": [
        {"card": "card-1", "outcome": "accepted", "outcomeTimestamp": "yesterday",
         "overrideReason": {}},
    ]}, {
        "error": "invalid-request",
        "message": "the feedback does not conform to CDS Hooks 2.0",
        "problems": [
            {"path": "$.feedback[0].acceptedSuggestions", "message": "is required but missing"},
            {"path": "$.feedback[0].card", "message": "'card-1' is not a 'uuid'"},
            {"path": "$.feedback[0].card", "message": f"'card-1' does not match {UUID_PATTERN}"},
            {"path": "$.feedback[0].outcomeTimestamp",
             "message": f"'yesterday' does not match {STAMP_PATTERN}"},
            {"path": "$.feedback[0].overrideReason", "message": "{} should be non-empty"},
            {"path": "$.feedback[0].overrideReason", "message": "{} should not be valid under {}"},
        ],
    }),
}


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_invalid_requests_get_the_same_400_as_before(
    app: Flask, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, body, expected = BEFORE[case]
    with_fast_path = app.test_client().post(url, json=body)
    assert with_fast_path.status_code == 400
    assert with_fast_path.get_json() == expected
    # Byte for byte what jsonschema alone answers.
    monkeypatch.setattr(validation, "fast_check", lambda schema_name: None)
    without = app.test_client().post(url, json=body)
    assert (without.status_code, without.data) == (400, with_fast_path.data)


def test_a_valid_request_is_answered_by_the_fast_path(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_jsonschema(schema_name: str) -> Any:
        raise AssertionError(f"jsonschema was asked about a valid {schema_name}")

    monkeypatch.setattr(validation, "validator", no_jsonschema)
    body = load("mg-pyridostigmine.order-select.json")
    body.pop("fhirServer", None)
    response = app.test_client().post("/cds-services/magnesium-order-select", json=body)
    assert response.status_code == 200, response.get_json()


def test_the_app_compiles_the_request_checks_at_start_up() -> None:
    validation.fast_check.cache_clear()
    validation.validator.cache_clear()
    create_app(Settings(auth="off", database_url="sqlite://"))
    # Compiled before any request (and, under gunicorn, before the workers fork).
    assert validation.fast_check.cache_info().currsize == len(validation.REQUEST_SCHEMAS)
    assert validation.validator.cache_info().currsize == len(validation.REQUEST_SCHEMAS)
    assert all(validation.fast_check(name) for name in validation.REQUEST_SCHEMAS)
