"""What a client's JSON schema may ask for: no contradiction, and a size a grammar and a check can afford.

A title request's schema becomes a grammar on the background llama-server,
which expands it: a 100,000-value enum, 12,000 optional properties (the
grammar of n optional properties grows as n²) or a 500-step `$ref` chain
exhaust it, and `minLength > maxLength` makes it grow without end (13.5 GB in
50 s). The grammar gets only a safe subset (`schemas.bounded`), but a schema
that no answer can satisfy, or that is too big to check or answer cheaply, is
refused here with a 400 that names the key and the limit, before anything
else reads it: like every other invalid schema, and on every route.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from ..errors import InvalidRequest
from ..request.schemas import PatternError, compiled, problem

# Schema objects in one schema, `$defs` included (Claude Code's title schema has 2).
MAX_NODES = 1000
# Enum values in one schema, all enums together.
MAX_ENUM_VALUES = 1000
# Properties of one object.
MAX_PROPERTIES = 100
# Steps of a `$ref` chain (a definition naming one that names another ...).
MAX_REF_CHAIN = 16
# Nesting through every keyword ($defs, not, if ... too): what recurses over a schema must not
# run out of stack (bodies.MAX_SCHEMA_DEPTH counts properties, items and the *Of keywords).
MAX_NESTING = 32

_BOUNDS = (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"),
           ("minimum", "maximum"))
# What of a schema its own const and enum strings must satisfy (a grammar forces them, whatever
# the rest says).
_LOCAL = ("minLength", "maxLength", "pattern")


def check(schema: Any, path: str) -> None:
    """Raise InvalidRequest naming the first key of `schema` past a limit or contradicting itself."""
    nodes = enum_values = 0
    for node, where, depth in _walk(schema, path):
        if depth > MAX_NESTING:
            raise InvalidRequest(f"{where}: nested deeper than {MAX_NESTING} levels")
        nodes += 1
        if nodes > MAX_NODES:
            raise InvalidRequest(f"{where}: the schema has more than {MAX_NODES} schema objects")
        props = node.get("properties")
        if isinstance(props, dict) and len(props) > MAX_PROPERTIES:
            raise InvalidRequest(f"{where}.properties: {len(props)} properties; at most {MAX_PROPERTIES} "
                                 f"are accepted")
        enum = node.get("enum")
        if isinstance(enum, list):
            enum_values += len(enum)
            if enum_values > MAX_ENUM_VALUES:
                raise InvalidRequest(f"{where}.enum: more than {MAX_ENUM_VALUES} enum values in one schema")
        _check_bounds(node, where)
        _check_pattern(node, where)
        _check_own_values(node, where)
    _check_refs(schema, path)


def _walk(schema: Any, path: str) -> Iterator[tuple[dict[str, Any], str, int]]:
    """Every schema object in `schema` with its depth, iteratively (a chain of $defs must not recurse)."""
    stack = [(schema, path, 0)]
    while stack:
        node, where, depth = stack.pop()
        if not isinstance(node, dict):
            continue
        yield node, where, depth
        for key in ("properties", "$defs", "definitions", "patternProperties"):
            if isinstance(node.get(key), dict):
                stack += [(v, f"{where}.{key}.{k}", depth + 1) for k, v in node[key].items()]
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if isinstance(node.get(key), list):
                stack += [(v, f"{where}.{key}.{i}", depth + 1) for i, v in enumerate(node[key])]
        for key in ("items", "additionalProperties", "not", "if", "then", "else", "contains"):
            if isinstance(node.get(key), dict):
                stack.append((node[key], f"{where}.{key}", depth + 1))


def _number(v: Any) -> bool:
    # An int past a float's range is still a number (math.isfinite would overflow on it).
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))


def _check_bounds(node: dict[str, Any], where: str) -> None:
    for low, high in _BOUNDS:
        if _number(node.get(low)) and _number(node.get(high)) and node[low] > node[high]:
            raise InvalidRequest(f"{where}: {low} {node[low]} is greater than {high} {node[high]}; "
                                 f"no value can satisfy it")
    lo, hi = node.get("exclusiveMinimum", node.get("minimum")), node.get("exclusiveMaximum", node.get("maximum"))
    if ("exclusiveMinimum" in node or "exclusiveMaximum" in node) and _number(lo) and _number(hi) and lo >= hi:
        raise InvalidRequest(f"{where}: the numeric bounds leave no value between {lo} and {hi}")


def _check_pattern(node: dict[str, Any], where: str) -> None:
    pattern = node.get("pattern")
    if not isinstance(pattern, str):
        return
    try:
        compiled(pattern)
    except PatternError as e:
        raise InvalidRequest(f"{where}.pattern: {pattern[:100]!r} cannot be used ({e}): a repetition "
                             f"that contradicts itself or expands past 1000 copies") from None


def _check_own_values(node: dict[str, Any], where: str) -> None:
    """A const or enum value its own schema refuses: the grammar would force it, the check refuse it."""
    own = {k: node[k] for k in _LOCAL if k in node}
    if not own:
        return
    values = [("const", node["const"])] if "const" in node else []
    if isinstance(node.get("enum"), list):
        values += [(f"enum.{i}", v) for i, v in enumerate(node["enum"])]
    for key, value in values:
        if not isinstance(value, str):
            continue
        wrong = problem(value, own, f"{where}.{key}")
        if wrong is not None:
            raise InvalidRequest(f"{wrong}: the schema's own {key.split('.')[0]} breaks its other keywords")


def _check_refs(schema: Any, path: str) -> None:
    """The longest chain of local `$ref`s through `$defs`/`definitions`, at most MAX_REF_CHAIN."""
    if not isinstance(schema, dict):
        return
    defs: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            defs.update({f"#/{key}/{name}": sub for name, sub in schema[key].items()})
    depth: dict[str, int] = {}

    def refs(node: Any) -> list[str]:
        found = []
        for sub, _, _ in _walk(node, ""):
            ref = sub.get("$ref")
            if isinstance(ref, str) and ref in defs:
                found.append(ref)
        return found

    def chain(ref: str, seen: tuple[str, ...]) -> int:
        if ref in depth:
            return depth[ref]
        if ref in seen:
            return 0  # recursion (a tree): a grammar rule refers to itself, nothing expands
        if len(seen) >= MAX_REF_CHAIN:
            raise InvalidRequest(f"{path}: a $ref chain longer than {MAX_REF_CHAIN} steps ({seen[0]} ...)")
        depth[ref] = 1 + max((chain(r, seen + (ref,)) for r in refs(defs[ref])), default=0)
        return depth[ref]

    for ref in defs:
        chain(ref, ())
