"""JSON schemas of background answers: check a model's answer against one, and bound one for a small model.

A small model's answer to a title or topic request is only sent on if it is
valid against the schema the client asked for; anything else gets the
synthetic answer instead. The check covers the keywords `bodies.check_schema`
admits and Claude Code uses (type, properties, required, additionalProperties,
enum, const, anyOf/oneOf/allOf, items, string and array lengths, numeric
bounds, pattern); a keyword outside that list is not checked.

Patterns are matched with RE2, which cannot backtrack: Python's `re` takes
exponential time on `^(a+)+$` against "aaa...a!" (4.6 s at 27 characters,
doubling with each), and it holds the interpreter, so the event loop, all
along. A pattern RE2 cannot read (lookaround, backreferences) is not checked.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import re2

# A title is a few words. Without a bound, a grammar-forced string lets a small
# model ramble until max_tokens and the answer is cut (invalid JSON).
MAX_STRING_CHARS = 120
MAX_ARRAY_ITEMS = 8

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
}


def problem(value: Any, schema: Any, path: str = "answer", root: Any = None,
            followed: frozenset[str] = frozenset()) -> str | None:
    """The first way `value` breaks `schema`, or None when it is valid. `root`: the schema a local
    `$ref` (#/$defs/NAME, #/definitions/NAME) is read from; `followed`: the refs already followed
    for this same value (a ref that comes back to itself without descending checks nothing more)."""
    if root is None:
        root = schema
    if schema is True or not isinstance(schema, dict):
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref not in followed:
        target = local_ref(root, ref)
        if target is not None and (p := problem(value, target, path, root, followed | {ref})) is not None:
            return p
    if "const" in schema and not _equal(value, schema["const"]):
        return f"{path}: must be {schema['const']!r}"
    if "enum" in schema and isinstance(schema["enum"], list) and not any(_equal(value, e) for e in schema["enum"]):
        return f"{path}: must be one of {schema['enum']!r}"
    for sub in schema.get("allOf") or ():
        if (p := problem(value, sub, path, root, followed)) is not None:
            return p
    if schema.get("anyOf") and all(problem(value, s, path, root, followed) is not None for s in schema["anyOf"]):
        return f"{path}: matches none of anyOf"
    if schema.get("oneOf") and sum(problem(value, s, path, root, followed) is None
                                   for s in schema["oneOf"]) != 1:
        return f"{path}: must match exactly one of oneOf"
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_TYPES.get(k, lambda v: False)(value) for k in kinds):
            return f"{path}: must be of type {' or '.join(kinds)}"
    if isinstance(value, dict):
        return _object_problem(value, schema, path, root)
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            return f"{path}: {len(value)} items is out of bounds"
        for i, item in enumerate(value):
            if (p := problem(item, schema.get("items", True), f"{path}[{i}]", root)) is not None:
                return p
    elif isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            return f"{path}: {len(value)} characters is out of bounds"
        pattern = schema.get("pattern")
        if isinstance(pattern, str) and not _search(pattern, value):
            return f"{path}: does not match {pattern!r}"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        bound = {k: schema[k] for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
                 if _TYPES["number"](schema.get(k))}  # draft 4's boolean exclusive* are not bounds
        if value < bound.get("minimum", -math.inf) or value > bound.get("maximum", math.inf) \
                or value <= bound.get("exclusiveMinimum", -math.inf) \
                or value >= bound.get("exclusiveMaximum", math.inf):
            return f"{path}: {value} is out of bounds"
    return None


def _object_problem(value: dict[str, Any], schema: dict[str, Any], path: str, root: Any) -> str | None:
    props = schema.get("properties") or {}
    for key in schema.get("required") or ():
        if key not in value:
            return f"{path}: lacks required {key!r}"
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        sub = props.get(key, extra)
        if sub is False:
            return f"{path}: has no room for {key!r}"
        if (p := problem(item, sub, f"{path}.{key}", root)) is not None:
            return p
    return None


def local_ref(root: Any, ref: str) -> Any:
    """The schema a local `$ref` names (#/$defs/NAME or #/definitions/NAME), or None."""
    for key in ("$defs", "definitions"):
        prefix = f"#/{key}/"
        if ref.startswith(prefix) and isinstance(root, dict) and isinstance(root.get(key), dict):
            return root[key].get(ref[len(prefix):])
    return None


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1, at any depth; 1 is 1.0."""
    if _TYPES["number"](a) and _TYPES["number"](b):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# RE2's own memory for one compiled pattern; a pattern that needs more is not checked.
_RE2_MAX_MEM = 8 * 1024 * 1024


class PatternError(ValueError):
    """A pattern RE2 reads but refuses: a repetition that is contradictory (`a{5,2}`) or too large
    (`((a?){40}){40}` expands to 1600 copies; RE2 stops at 1000)."""


@functools.lru_cache(maxsize=256)
def compiled(pattern: str) -> Any:
    """The pattern compiled by RE2; None when RE2 cannot read it (not checked); PatternError when
    it is a repetition no engine should expand."""
    options = re2.Options()
    options.max_mem = _RE2_MAX_MEM
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        why = str(e.args[0] if e.args else e)
        if "repetition" in why or "pattern too large" in why:
            raise PatternError(why.strip("b'\"")) from None
        return None


def _search(pattern: str, value: str) -> bool:
    """Linear in the value's length whatever the pattern (JSON Schema's `pattern` is unanchored)."""
    try:
        rx = compiled(pattern)
    except PatternError:
        return False  # nothing matches a pattern that cannot be expanded
    return True if rx is None else rx.search(value) is not None


# What of a client's schema a grammar may see. llama.cpp turns a schema into a grammar by
# expanding it: a `pattern` becomes a regex-to-grammar translation (nested repetitions explode,
# `a{5,2}` never ends), unknown keywords are its own business. The gateway checks the answer
# against the client's whole schema anyway, so the grammar only gets this subset: what it loses
# (patterns, formats, remote $refs) is checked afterwards, and an answer that fails it gets the
# synthetic one. Local $refs stay (a grammar rule each, their chains bounded by schema_limits).
GRAMMAR_KEYS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf", "oneOf",
    "allOf", "minLength", "maxLength", "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "$ref", "$defs", "definitions"})


def bounded(schema: Any) -> Any:
    """The part of `schema` a grammar may see (GRAMMAR_KEYS), with a length bound on every string
    and array: at most MAX_STRING_CHARS characters and MAX_ARRAY_ITEMS items, or exactly the minimum
    when the minimum is above that (a grammar must never expand a repetition of thousands).

    Only wider where keywords were dropped, narrower everywhere else; the answer is checked against
    `schema` itself.
    """
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if k in GRAMMAR_KEYS}
    ref = out.get("$ref")
    if "$ref" in out and not (isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/"))):
        del out["$ref"]  # a remote schema is never fetched
    for key in ("properties", "$defs", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {k: bounded(v) for k, v in out[key].items()}
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(out.get(key), list):
            out[key] = [bounded(s) for s in out[key]]
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = bounded(out[key])
    if "enum" in out or "const" in out or "$ref" in out:
        return out  # its values (or the schema it names) are its bound
    kinds = out.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []
    for kind, low, high, cap in (("string", "minLength", "maxLength", MAX_STRING_CHARS),
                                 ("array", "minItems", "maxItems", MAX_ARRAY_ITEMS)):
        if kind in kinds or low in out or high in out:
            least = out.get(low, 0) if isinstance(out.get(low), int) else 0
            most = out.get(high) if isinstance(out.get(high), int) else math.inf
            out[high] = min(most, max(least, cap))
    return out
