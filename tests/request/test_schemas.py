"""The gateway's check of a background answer against its schema, with jsonschema as the oracle."""

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.request.background import TOPIC_SCHEMA
from orchestrator.request.schemas import MAX_STRING_CHARS, bounded, problem

TITLE = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"],
         "additionalProperties": False}
TOPIC = {"type": "object", "properties": {"isNewTopic": {"type": "boolean"}, "title": {"type": ["string", "null"]}},
         "required": ["isNewTopic", "title"], "additionalProperties": False}
RICH = {"type": "object", "properties": {
    "kind": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 1, "maximum": 3},
    "x": {"type": "number", "exclusiveMinimum": 0}, "tags": {"type": "array", "items": {"type": "string"},
                                                             "minItems": 1, "maxItems": 2},
    "code": {"type": "string", "pattern": "^[A-Z]{2}$", "minLength": 2}, "v": {"const": True},
    "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "one": {"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 10}]},
    "both": {"allOf": [{"type": "string"}, {"maxLength": 3}]}}, "required": ["kind"]}

CASES = [
    (TITLE, {"title": "Reverse a string"}), (TITLE, {}), (TITLE, {"title": 3}), (TITLE, {"title": "a", "x": 1}),
    (TITLE, []), (TITLE, "title"), (TOPIC, {"isNewTopic": True, "title": None}),
    (TOPIC, {"isNewTopic": 1, "title": None}), (TOPIC, {"isNewTopic": False}),
    (TOPIC, {"isNewTopic": False, "title": "Py"}), (RICH, {"kind": "a"}), (RICH, {"kind": "c"}),
    (RICH, {"kind": "a", "n": 2}), (RICH, {"kind": "a", "n": 2.0}), (RICH, {"kind": "a", "n": 4}),
    (RICH, {"kind": "a", "n": True}), (RICH, {"kind": "a", "x": 0}), (RICH, {"kind": "a", "x": 0.5}),
    (RICH, {"kind": "a", "tags": []}), (RICH, {"kind": "a", "tags": ["x", "y", "z"]}),
    (RICH, {"kind": "a", "tags": ["x", 1]}), (RICH, {"kind": "a", "code": "AB"}),
    (RICH, {"kind": "a", "code": "ab"}), (RICH, {"kind": "a", "v": True}), (RICH, {"kind": "a", "v": 1}),
    (RICH, {"kind": "a", "either": 2}), (RICH, {"kind": "a", "either": 2.5}), (RICH, {"kind": "a", "one": 5}),
    (RICH, {"kind": "a", "one": 12}), (RICH, {"kind": "a", "one": 10.5}), (RICH, {"kind": "a", "both": "abcd"}),
    (RICH, {"kind": "a", "both": "ab"}), (TOPIC_SCHEMA, {"isNewTopic": False, "title": None}),
    (TOPIC_SCHEMA, {"isNewTopic": False, "title": "Py"}), (TOPIC_SCHEMA, {"isNewTopic": True, "title": ""}),
    (TOPIC_SCHEMA, {"isNewTopic": True, "title": "Python"}), (TOPIC_SCHEMA, {"isNewTopic": True, "title": None}),
]


@pytest.mark.parametrize("schema,value", CASES)
def test_agrees_with_jsonschema(schema, value):
    expected = jsonschema.Draft202012Validator(schema).is_valid(value)
    assert (problem(value, schema) is None) == expected, problem(value, schema)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-5, 5, allow_nan=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["title", "isNewTopic", "x"]),
                                                                 inner, max_size=3),
    max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(value=json_values, schema=st.sampled_from([TITLE, TOPIC, RICH, TOPIC_SCHEMA]))
def test_agrees_with_jsonschema_on_any_value(value, schema):
    expected = jsonschema.Draft202012Validator(schema).is_valid(value)
    assert (problem(value, schema) is None) == expected


def test_bounded_only_narrows_and_bounds_every_string():
    b = bounded(TOPIC)
    assert b["properties"]["title"]["maxLength"] == MAX_STRING_CHARS
    assert bounded(TITLE)["properties"]["title"]["maxLength"] == MAX_STRING_CHARS
    assert TITLE["properties"]["title"] == {"type": "string"}  # the client's schema is left as it was
    long = {"isNewTopic": True, "title": "x" * (MAX_STRING_CHARS + 1)}
    assert problem(long, TOPIC) is None and problem(long, b) is not None
    # A string that must be longer than the bound is asked for at exactly its minimum, never with
    # an unbounded (or huge) repetition a grammar would expand.
    wide = {"type": "string", "minLength": MAX_STRING_CHARS + 5, "maxLength": 10 ** 9}
    assert bounded(wide) == {"type": "string", "minLength": MAX_STRING_CHARS + 5, "maxLength": MAX_STRING_CHARS + 5}
    assert bounded(RICH)["properties"]["tags"]["maxItems"] == 2


def test_a_grammar_sees_no_pattern_remote_ref_or_unknown_keyword():
    """llama.cpp expands what it is given: a pattern's nested repetitions. The grammar gets the safe
    subset (local $refs are rules, their chains bounded); the gateway checks the answer against the
    whole schema."""
    schema = {"type": "object", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"type": "string"}},
              "properties": {"t": {"type": "string", "pattern": "^((a?){40}){40}$", "format": "email"},
                             "r": {"$ref": "#/$defs/a"}},
              "additionalProperties": {"type": "string", "pattern": "^(a+)+$"}}
    assert bounded(schema) == {"type": "object",
                               "$defs": {"a": {"$ref": "#/$defs/b"},
                                         "b": {"type": "string", "maxLength": MAX_STRING_CHARS}},
                               "properties": {"t": {"type": "string", "maxLength": MAX_STRING_CHARS},
                                              "r": {"$ref": "#/$defs/a"}},
                               "additionalProperties": {"type": "string", "maxLength": MAX_STRING_CHARS}}
    assert bounded({"$ref": "https://example.com/s.json"}) == {}  # never fetched


def test_local_refs_are_followed_by_the_check():
    schema = {"$defs": {"kind": {"enum": ["a", "b"]}, "loop": {"$ref": "#/$defs/loop"},
                        "tree": {"type": "object", "properties": {"kids": {"type": "array",
                                                                           "items": {"$ref": "#/$defs/tree"}}}}},
              "type": "object", "properties": {"k": {"$ref": "#/$defs/kind"}, "l": {"$ref": "#/$defs/loop"},
                                               "t": {"$ref": "#/$defs/tree"}}}
    for value in ({"k": "a"}, {"k": "c"}, {"t": {"kids": [{"kids": []}]}}, {"t": {"kids": [{"kids": 1}]}}):
        expected = jsonschema.Draft202012Validator(schema).is_valid(value)
        assert (problem(value, schema) is None) == expected, value
    assert problem({"l": 1}, schema) is None  # a ref to itself constrains nothing, and ends


def test_a_catastrophic_pattern_is_checked_in_linear_time():
    import time

    t0 = time.monotonic()
    assert problem("a" * 100_000 + "!", {"type": "string", "pattern": "^(a+)+$"}) is not None
    assert problem("a" * 100_000, {"type": "string", "pattern": "^(a+)+$"}) is None
    # Python's re takes 4.6 s at 27 characters here, twice as long with each more: at 100,000, forever.
    # RE2 takes milliseconds; the bound leaves a loaded machine room.
    assert time.monotonic() - t0 < 10
