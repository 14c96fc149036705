"""The shipped JSON Schemas, and their violations in plain words: each one located in
its file, with the key path and what was expected ("did you mean" for a close key)."""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.resources
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stapctl.cache import cache_dir
from stapctl.errors import Issue
from stapctl.yamldoc import Document, KeyPath

if TYPE_CHECKING:
    import jsonschema
    from referencing import Registry

SCHEMA_BASE = "https://stapctl.invalid/schemas/v1/"


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    """A schema shipped in the package, e.g. ``manifest.schema.json``."""
    text = importlib.resources.files("stapctl.schemas").joinpath(name).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.cache
def registry() -> Registry[Any]:
    from referencing import Registry, Resource
    return Registry().with_resources(
        (SCHEMA_BASE + name, Resource.from_contents(load_schema(name)))
        for name in ("manifest.schema.json", "inventory.schema.json")
    )


@functools.cache
def schema_validator(name: str, definition: str | None = None) -> jsonschema.Draft202012Validator:
    """A validator for a shipped schema, or for one of its ``$defs``."""
    import jsonschema
    schema: dict[str, Any] = load_schema(name)
    if definition is not None:
        schema = {"$ref": f"{SCHEMA_BASE}{name}#/$defs/{definition}"}
    return jsonschema.Draft202012Validator(schema, registry=registry())


def schema_issues(doc: Document, data: Any, name: str, definition: str | None = None
                  ) -> list[tuple[KeyPath, Issue]]:
    """Every violation of ``data`` (``doc``'s) of a shipped schema or one of its
    ``$defs``, in plain words.

    Data found valid once is not checked again (a verdict file in the cache, named by the
    digest of the schema and the data): jsonschema's import alone is a tenth of a warm
    start-up. Data with a violation is checked every time.
    """
    verdict = _verdict(name, definition, data)
    if verdict is not None and verdict.exists():
        return []
    validator = schema_validator(name, definition)
    found: list[tuple[KeyPath, Issue]] = []
    for error in validator.iter_errors(data):
        for path, message, of_key in _plain_errors(validator, error):
            found.append((path, doc.issue(path, message, of_key=of_key)))
    if not found and verdict is not None:
        with contextlib.suppress(OSError):  # a cache that cannot be written costs a check
            verdict.parent.mkdir(parents=True, exist_ok=True)
            verdict.touch()
    return found


def _verdict(name: str, definition: str | None, data: Any) -> Path | None:
    """Where the verdict "valid" on ``data`` is kept; None for data that has no exact
    JSON form (then it is always checked). Every value is written with its type, so a
    date and the string of it, or 1 and 1.0, are told apart."""
    try:
        text = json.dumps([load_schema(name), definition, _typed(data)], sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        return None
    return cache_dir() / "schema-valid" / hashlib.sha256(text.encode()).hexdigest()


def _typed(value: Any) -> Any:
    if isinstance(value, dict):
        return [[_typed(k), _typed(v)] for k, v in value.items()]
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return [type(value).__name__, value]


def _plain_errors(validator: jsonschema.Draft202012Validator,
                  error: jsonschema.ValidationError) -> Iterator[tuple[KeyPath, str, bool]]:
    path: KeyPath = tuple(error.absolute_path)
    schema: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}
    kind = error.validator
    expected: Any = error.validator_value
    instance: Any = error.instance
    if kind in ("anyOf", "oneOf"):
        branch = _branch_for(validator, expected, instance)
        if branch is not None:  # the value has the type of one choice: its errors say more
            for sub in error.context or ():
                if sub.relative_schema_path[0] == branch:
                    yield from _plain_errors(validator, sub)
            return
    if "propertyNames" in error.absolute_schema_path:
        yield (path + (instance,), f"'{instance}' is not a valid name here: expected "
               f"{schema.get('x-expected', 'a different name')}", True)
    elif kind == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        for key in instance:
            if key not in allowed:
                yield path + (key,), unknown_key_message(key, allowed), True
    elif kind == "required":
        for key in expected:
            if key not in instance:
                yield path, f"missing required key '{key}'", False
    elif kind == "type" and "x-expected" not in schema:
        types = [expected] if isinstance(expected, str) else expected
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in types)
        yield path, f"expected {words}, got {describe(instance)}", False
    elif kind == "enum":
        choices = ", ".join(repr(choice) for choice in expected)
        yield path, f"expected one of {choices}, got {describe(instance)}" + (
            did_you_mean(instance, [str(c) for c in expected]) if isinstance(instance, str)
            else ""), False
    elif kind in _BOUND_WORDS:
        yield path, f"must be {_BOUND_WORDS[kind]} {expected}, got {describe(instance)}", False
    elif kind == "minItems":
        yield path, f"needs at least {expected} item{'s' if expected != 1 else ''}", False
    elif kind == "minLength":
        yield path, "must not be empty", False
    elif kind == "maxLength":
        yield path, f"must be at most {expected} characters long, got {len(instance)}", False
    elif "x-expected" in schema:
        yield path, f"expected {schema['x-expected']}, got {describe(instance)}", False
    elif kind == "const":
        yield path, f"expected {expected!r}, got {describe(instance)}", False
    else:
        yield path, error.message, False


_TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "text",
               "integer": "a whole number", "number": "a number", "boolean": "true or false",
               "null": "nothing"}
_BOUND_WORDS = {"minimum": "at least", "maximum": "at most",
                "exclusiveMinimum": "more than", "exclusiveMaximum": "less than"}


def _branch_for(validator: jsonschema.Draft202012Validator, branches: list[Any],
                instance: Any) -> int | None:
    """The one anyOf/oneOf choice whose declared type the value has, if exactly one."""
    matching = [
        index for index, branch in enumerate(branches)
        if isinstance(branch, Mapping) and "type" in branch
        and any(validator.is_type(instance, t) for t in
                ([branch["type"]] if isinstance(branch["type"], str) else branch["type"]))
    ]
    return matching[0] if len(matching) == 1 else None


def describe(value: Any) -> str:
    """A value in words, for "expected X, got Y"."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def unknown_key_message(key: str, allowed: list[str]) -> str:
    """``unknown key 'nmae' (did you mean 'name'?); expected one of: ...``"""
    return (f"unknown key '{key}'{did_you_mean(key, allowed)}; "
            f"expected one of: {', '.join(allowed)}")


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:
        close = [choice for choice in choices if choice.lower() == word.lower()]
    return f" (did you mean '{close[0]}'?)" if close else ""


def object_view(node: Mapping[str, Any], resolver: Any) -> tuple[Mapping[str, Any], Any]:
    """The part of a schema node that has keys: follow $ref, list items, and the
    mapping choice of an anyOf."""
    node, resolver = follow_ref(node, resolver)
    if node.get("type") == "array" and isinstance(node.get("items"), Mapping):
        node, resolver = follow_ref(node["items"], resolver)
    for choice in node.get("anyOf", ()):
        if "object" in choice.get("type", ()):
            return object_view(choice, resolver)
    return node, resolver


def follow_ref(node: Mapping[str, Any], resolver: Any) -> tuple[Mapping[str, Any], Any]:
    while "$ref" in node:
        resolved = resolver.lookup(node["$ref"])
        node, resolver = resolved.contents, resolved.resolver
    return node, resolver


def resolved(node: Mapping[str, Any], resolver: Any) -> Mapping[str, Any]:
    return follow_ref(node, resolver)[0]
