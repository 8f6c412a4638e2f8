"""A fast "is this instance valid?" check, compiled once per schema with ``fastjsonschema``.

Why it exists: every hook request is validated against its JSON Schema, and jsonschema's
``iter_errors`` costs a few hundred microseconds per typical request (its descend/evolve
machinery), although almost every request is valid. ``fastjsonschema`` compiles a schema to
plain Python and answers the valid case an order of magnitude faster. It is only ever asked
"valid?": when it says no, the caller runs jsonschema as before, so every error response is
built by jsonschema alone and stays byte-for-byte what it was.

Why it can never be looser than jsonschema: ``fastjsonschema`` implements drafts 04/06/07
and silently ignores any keyword it does not know (``uuid`` format, ``dependentRequired``,
``$ref`` siblings...), so our draft 2020-12 schemas are not handed to it as they are. They
are translated by :func:`compile_fast_check`, which

* accepts only the keywords in an explicit allowlist whose draft-07 meaning in
  ``fastjsonschema`` equals their 2020-12 meaning in jsonschema, with values restricted to
  the forms where that holds (e.g. ``const``/``enum`` only of strings and null, because
  ``True == 1`` in Python but not in JSON Schema), and REFUSES anything else with
  :class:`UnsupportedSchemaError` naming the keyword and the schema. A schema edit can
  therefore lose the fast path, never be under-checked by it;
* rewrites the 2020-12-only forms into their draft-07 equivalents (``dependentRequired`` ->
  array ``dependencies``; a ``$ref`` with sibling keywords -> ``allOf``, since draft-07
  ignores a ``$ref``'s siblings);
* checks ``format`` and ``pattern`` with callables that ask exactly what jsonschema asks: the
  very ``FormatChecker`` the jsonschema validator uses (so a format jsonschema does not
  assert is not asserted here either), and ``re.search`` on the untouched pattern
  (``fastjsonschema`` would rewrite ``$`` to ``\\Z``, which differs before a final newline).

The guarantee is for JSON values (what ``json.loads`` returns); anything unexpected while
checking (e.g. a RecursionError) answers "not known valid" and jsonschema decides.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import fastjsonschema
from jsonschema import Draft202012Validator, FormatChecker

FastCheck = Callable[[Any], bool]
"""``check(instance)`` is True only if jsonschema would find no error in ``instance``."""

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
_DRAFT_07 = "http://json-schema.org/draft-07/schema#"  # picks fastjsonschema's draft-07 code

# Annotations: no effect on validity in either draft, so they are dropped. Dropping
# ``default`` matters: fastjsonschema would otherwise write defaults into the instance.
_ANNOTATIONS = frozenset(
    {"title", "description", "$comment", "examples", "default", "deprecated", "readOnly",
     "writeOnly"}
)
_JSON_TYPES = frozenset({"null", "boolean", "object", "array", "number", "string", "integer"})
_COUNTS = frozenset(
    {"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"}
)
_BOUNDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})
_SUBSCHEMA = frozenset({"additionalProperties", "items", "propertyNames", "not", "if", "then",
                        "else"})
_SUBSCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf"})
_ROOT_ONLY = frozenset({"$schema", "$id", "$defs"})

ALLOWED_KEYWORDS = frozenset(
    _ANNOTATIONS | _COUNTS | _BOUNDS | _SUBSCHEMA | _SUBSCHEMA_LISTS | _ROOT_ONLY
    | {"type", "enum", "const", "required", "dependentRequired", "properties", "pattern",
       "format", "$ref"}
)
"""Every keyword the translation accepts; anything else (``uniqueItems``, ``contains``,
``patternProperties``, ``multipleOf``, ``unevaluatedProperties``, ``prefixItems``,
``dependentSchemas``, ``$anchor``, ...) refuses the schema. Adding one here needs a reason in
``_Translator`` and a test that fastjsonschema then agrees with jsonschema."""

# fastjsonschema pastes property names and ``$defs`` names into generated source, escaping
# only double quotes: a backslash or brace could make it check a different key. Plain names
# only (every name in our schemas is one).
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.$-]*\Z")
_LOCAL_REF = re.compile(r"#/\$defs/([A-Za-z0-9_.-]+)\Z")


class UnsupportedSchemaError(ValueError):
    """The schema uses a keyword or value the fast check cannot assert exactly as jsonschema."""


def compile_fast_check(
    schema: Mapping[str, Any],
    schema_name: str,
    format_checker: FormatChecker = Draft202012Validator.FORMAT_CHECKER,
) -> FastCheck:
    """A fast validity check for a draft 2020-12 ``schema``, or UnsupportedSchemaError.

    ``format_checker`` must be the one the jsonschema validator of the same schema uses.
    """
    translator = _Translator(schema_name, format_checker)
    translated = translator.root(schema)
    try:
        validate = fastjsonschema.compile(
            translated,
            formats=translator.string_checks,
            use_default=False,  # never write into the instance
            use_formats=True,
            # Only "valid?" is asked, but detailed_exceptions=False breaks code generation
            # for const in fastjsonschema 2.22 (KeyError 'definition_rule').
            detailed_exceptions=True,
        )
    except Exception as exc:  # any failure to generate code just means: no fast path
        raise UnsupportedSchemaError(
            f"{schema_name}: fastjsonschema cannot compile the translated schema: {exc}"
        ) from exc

    def check(instance: Any) -> bool:
        try:
            validate(instance)
        except Exception:  # invalid, or something odd (RecursionError): jsonschema decides
            return False
        return True

    return check


class _Translator:
    """Draft 2020-12 schema -> equivalent draft-07 schema for fastjsonschema, or refusal."""

    def __init__(self, schema_name: str, format_checker: FormatChecker) -> None:
        self.schema_name = schema_name
        self.format_checker = format_checker
        # Synthetic format name -> predicate; passed to fastjsonschema as custom formats.
        self.string_checks: dict[str, Callable[[str], bool]] = {}
        self._check_names: dict[tuple[str | None, str | None], str] = {}
        self._defs: frozenset[str] = frozenset()

    def refuse(self, where: str, why: str) -> UnsupportedSchemaError:
        return UnsupportedSchemaError(f"{self.schema_name} at {where or '/'}: {why}")

    def root(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(schema, Mapping):
            raise self.refuse("", "the root schema must be an object")
        declared = schema.get("$schema", DRAFT_2020_12)
        if not isinstance(declared, str) or declared.rstrip("#") != DRAFT_2020_12:
            raise self.refuse("/$schema", f"only draft 2020-12 is translated, not {declared!r}")
        defs = schema.get("$defs", {})
        if not isinstance(defs, Mapping):
            raise self.refuse("/$defs", "$defs must be an object")
        self._defs = frozenset(self.name(name, "/$defs") for name in defs)
        out = self.schema(schema, "", root=True)
        if not isinstance(out, dict):  # pragma: no cover - a Mapping translates to a dict
            raise self.refuse("", "the root schema must be an object")
        # Declaring draft-07 selects fastjsonschema's draft-07 generator (its default is
        # 2019-09); $id is left out so that nothing is resolved against a remote base.
        out = {"$schema": _DRAFT_07, **out}
        if defs:
            out["$defs"] = {
                name: self.schema(sub, f"/$defs/{name}") for name, sub in defs.items()
            }
        return out

    def name(self, name: Any, where: str) -> str:
        if not isinstance(name, str) or not _SAFE_NAME.match(name):
            raise self.refuse(where, f"name {name!r} is not a plain name")
        return name

    def names(self, value: Any, where: str) -> list[str]:
        if not isinstance(value, list) or len(set(map(str, value))) != len(value):
            raise self.refuse(where, "expected an array of distinct names")
        return [self.name(item, where) for item in value]

    def schema(self, node: Any, where: str, root: bool = False) -> dict[str, Any] | bool:
        if isinstance(node, bool):
            return node  # true/false schemas mean the same in draft-07
        if not isinstance(node, Mapping):
            raise self.refuse(where, "a schema must be an object or a boolean")
        out: dict[str, Any] = {}
        for keyword, value in node.items():
            at = f"{where}/{keyword}"
            if keyword not in ALLOWED_KEYWORDS:
                raise self.refuse(at, f"keyword {keyword!r} is not supported by the fast check")
            if keyword in _ROOT_ONLY:
                if not root:
                    raise self.refuse(at, f"{keyword!r} is only translated at the root")
                continue  # handled by root()
            if keyword in _ANNOTATIONS:
                continue
            out.update(self.keyword(keyword, value, at))
        out = self._string_check(node, out, where)
        if "$ref" in out and len(out) > 1:
            # 2020-12 applies a $ref's siblings too; draft-07 (and fastjsonschema) ignores them.
            ref = out.pop("$ref")
            out = {"allOf": [{"$ref": ref}, out]}
        return out

    def keyword(self, keyword: str, value: Any, at: str) -> dict[str, Any]:
        """The draft-07 form of one assertion or applicator (pattern/format: see below)."""
        if keyword == "type":
            types = value if isinstance(value, list) else [value]
            if not types or not all(t in _JSON_TYPES for t in types):
                raise self.refuse(at, f"unknown type {value!r}")
            # fastjsonschema's draft-07 types match jsonschema's for JSON values: bool is not
            # a number or integer, and 1.0 is an integer.
            return {keyword: value}
        if keyword in ("const", "enum"):
            values = value if keyword == "enum" else [value]
            if not isinstance(values, list) or not all(
                v is None or isinstance(v, str) for v in values
            ):
                # Strings and null compare alike everywhere; numbers, booleans and containers
                # do not (True == 1 in Python, not in JSON Schema), whatever the library version.
                raise self.refuse(at, f"{keyword} is only translated for strings and null")
            return {keyword: value}
        if keyword in _COUNTS:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise self.refuse(at, f"{keyword} must be a non-negative integer")
            return {keyword: value}
        if keyword in _BOUNDS:
            # Both skip non-numbers (booleans included) and compare with Python's < and <=.
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise self.refuse(at, f"{keyword} must be a number")
            return {keyword: value}
        if keyword == "required":
            return {keyword: self.names(value, at)}
        if keyword == "dependentRequired":
            # Draft-07 spells the array form of dependencies this way; same meaning.
            if not isinstance(value, Mapping):
                raise self.refuse(at, "dependentRequired must be an object")
            return {
                "dependencies": {
                    self.name(trigger, at): self.names(names, f"{at}/{trigger}")
                    for trigger, names in value.items()
                }
            }
        if keyword == "properties":
            if not isinstance(value, Mapping):
                raise self.refuse(at, "properties must be an object")
            return {
                keyword: {
                    self.name(prop, at): self.schema(sub, f"{at}/{prop}")
                    for prop, sub in value.items()
                }
            }
        if keyword in _SUBSCHEMA:
            if keyword == "items" and not isinstance(value, Mapping | bool):
                # The array form is draft-07 tuple validation (2020-12: prefixItems).
                raise self.refuse(at, "items must be a single schema")
            return {keyword: self.schema(value, at)}
        if keyword in _SUBSCHEMA_LISTS:
            if not isinstance(value, list) or not value:
                raise self.refuse(at, f"{keyword} must be a non-empty array")
            return {keyword: [self.schema(sub, f"{at}/{i}") for i, sub in enumerate(value)]}
        if keyword == "$ref":
            match = _LOCAL_REF.match(value) if isinstance(value, str) else None
            if match is None or match.group(1) not in self._defs:
                raise self.refuse(at, f"only #/$defs/<name> references are translated: {value!r}")
            # fastjsonschema resolves it as a JSON pointer into the translated document.
            return {keyword: value}
        if keyword in ("pattern", "format"):
            return {}  # both become one string check: _string_check
        raise self.refuse(at, f"keyword {keyword!r} has no translation")  # pragma: no cover

    def _string_check(
        self, node: Mapping[str, Any], out: dict[str, Any], where: str
    ) -> dict[str, Any]:
        """``pattern`` and ``format`` as one custom format: the same predicates jsonschema uses.

        fastjsonschema applies a custom format to strings only; jsonschema's pattern skips
        non-strings, and every format checker jsonschema ships passes non-strings.
        """
        pattern, format_ = node.get("pattern"), node.get("format")
        if pattern is None and format_ is None:
            return out
        if pattern is not None:
            if not isinstance(pattern, str):
                raise self.refuse(f"{where}/pattern", "pattern must be a string")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise self.refuse(f"{where}/pattern", f"pattern does not compile: {exc}") from None
        if format_ is not None and not isinstance(format_, str):
            raise self.refuse(f"{where}/format", "format must be a string")
        key = (pattern, format_)
        name = self._check_names.get(key)
        if name is None:
            name = self._check_names[key] = f"x-string-check-{len(self._check_names)}"
            self.string_checks[name] = _string_predicate(pattern, format_, self.format_checker)
        return {**out, "format": name}


def _string_predicate(
    pattern: str | None, format_: str | None, format_checker: FormatChecker
) -> Callable[[str], bool]:
    search = re.compile(pattern).search if pattern is not None else None

    def conforms(value: str) -> bool:
        # re.search, as jsonschema's pattern keyword: "$" also matches before a final "\n".
        if search is not None and search(value) is None:
            return False
        # conforms() passes formats this checker does not assert, exactly as jsonschema does.
        return format_ is None or format_checker.conforms(value, format_)

    return conforms
