"""Schemas that no answer satisfies, or too big for a grammar, are refused before any backend sees them."""

from __future__ import annotations


import pytest

from orchestrator.backends.gateway import GATEWAY
from orchestrator.errors import InvalidRequest
from orchestrator.http.bodies import check_schema
from orchestrator.http.schema_limits import (
    MAX_ENUM_VALUES,
    MAX_PROPERTIES,
    MAX_REF_CHAIN,
)
from testkit.client import sample
from testkit.engine import FakeEngine

TITLE = sample("title-2.1.332.json")["body"]


def _chain(n: int) -> dict:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(n)}
    defs[f"d{n}"] = {"type": "string"}
    return {"type": "object", "properties": {"title": {"$ref": "#/$defs/d0"}}, "$defs": defs}


def _nested_defs(n: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(n):
        schema = {"$defs": {"d": schema}}
    return schema


def _title(sub: dict) -> dict:
    return {"type": "object", "properties": {"title": sub}, "required": ["title"]}


# Each of these wedged or exhausted a real llama-server (issue 21): 13.5 GB in 50 s, a core at 100%
# for 150 s with /slots unanswered, or a grammar too big to build.
HOSTILE = {
    "min_length_over_max": (_title({"type": "string", "minLength": 5, "maxLength": 2}), "minLength 5 is greater"),
    "min_items_over_max": (_title({"type": "array", "minItems": 5, "maxItems": 2}), "minItems 5 is greater"),
    "contradictory_repetition": (_title({"type": "string", "pattern": "^a{5,2}$"}), "pattern"),
    "nested_repetition": (_title({"type": "string", "pattern": "^((a?){40}){40}$"}), "expands past 1000"),
    "huge_enum": (_title({"enum": [f"v{i}" for i in range(100_000)]}), f"more than {MAX_ENUM_VALUES} enum"),
    "defs_chain": (_chain(500), f"$ref chain longer than {MAX_REF_CHAIN}"),
    "many_optional_properties": ({"type": "object", "properties": {f"p{i}": {"type": "string"}
                                                                   for i in range(12_000)}},
                                 f"at most {MAX_PROPERTIES}"),
    "const_breaks_pattern": (_title({"type": "string", "const": "a" * 40 + "!", "pattern": "^(a+)+$"}),
                             "const breaks"),
    "enum_breaks_length": (_title({"type": "string", "enum": ["ok", "far too long"], "maxLength": 3}),
                           "enum breaks"),
    "deep_defs": (_nested_defs(200), "nested deeper than"),
    "empty_number_range": (_title({"type": "number", "exclusiveMinimum": 3, "exclusiveMaximum": 3}),
                           "no value between"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_schemas_are_refused_naming_the_limit(name):
    schema, says = HOSTILE[name]
    with pytest.raises(InvalidRequest) as e:
        check_schema(schema, "output_config.format.schema")
    assert says in e.value.message and e.value.message.startswith("output_config.format.schema"), e.value.message


@pytest.mark.parametrize("schema", [
    TITLE["output_config"]["format"]["schema"],
    _chain(MAX_REF_CHAIN - 1),
    _title({"enum": [f"v{i}" for i in range(MAX_ENUM_VALUES)]}),
    {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(MAX_PROPERTIES)}},
    _title({"type": "string", "pattern": "^[A-Z][a-z]{2,40}( [a-z]+){0,6}$", "minLength": 3, "maxLength": 60}),
    # A recursive schema (a tree) expands nothing: a grammar rule that names itself.
    {"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array",
                                                                  "items": {"$ref": "#/$defs/node"}}}}},
     "$ref": "#/$defs/node"},
    # A pattern RE2 cannot read (lookahead) is not checked, as before, and never reaches a grammar.
    _title({"type": "string", "pattern": "^(?=a)a+$"}),
])
def test_ordinary_schemas_pass(schema):
    check_schema(schema, "output_config.format.schema")


async def test_the_gateway_refuses_them_before_any_backend_is_contacted(gateway, serve_app, http):
    small, big = FakeEngine(), FakeEngine()
    base, app = await gateway({"backends": [{"name": "primary", "url": await serve_app(big.app())},
                                            {"name": "small", "url": await serve_app(small.app()),
                                             "role": "background"}],
                               "routing": {"background": "small"}})
    gw = app[GATEWAY]
    for name, (schema, says) in HOSTILE.items():
        body = {**TITLE, "output_config": {"format": {"type": "json_schema", "schema": schema}}}
        async with http.post(base + "/v1/messages?beta=true", json=body) as r:
            status, answer = r.status, await r.json()
        assert status == 400, name
        assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error", answer
        assert says in answer["error"]["message"], (name, answer)
    assert small.requests == [] and big.requests == []
    assert gw.metrics.rejections.labels("bad_request")._value.get() == len(HOSTILE)


def _rich_title_schema(optional: int) -> dict:
    props = {"title": {"type": "string", "pattern": "^[^\\n]*$", "minLength": 1},
             "kind": {"$ref": "#/$defs/kind"}}
    props.update({f"p{i}": {"type": "boolean"} for i in range(optional)})
    return {"type": "object", "properties": props, "required": ["title", "kind"], "additionalProperties": False,
            "$defs": {"kind": {"enum": [f"k{i}" for i in range(MAX_ENUM_VALUES)]}}}


@pytest.mark.real
@pytest.mark.parametrize("optional", [8, MAX_PROPERTIES - 2])
async def test_schemas_within_the_limits_reach_the_real_model_as_work(gateway, serve_app, http, llama, optional):
    """The limits leave room: a title schema with a pattern, a $ref to a 1000-value enum and up to 98
    optional properties passes the gateway's check. It is no Claude Code title (issue 28: only Claude
    Code's own {title} schema is housekeeping), so the main model answers it, the real llama-server
    here; the small background model is never asked, and nothing is made up by the gateway."""
    import time

    schema = _rich_title_schema(optional)
    check_schema(schema, "output_config.format.schema")
    small = FakeEngine()
    base, app = await gateway({"backends": [{"name": "primary", "url": llama.url},
                                            {"name": "small", "url": await serve_app(small.app()), "role": "background"}],
                               "routing": {"background": "small"}})
    gw = app[GATEWAY]
    body = {**TITLE, "stream": False, "max_tokens": 16, "output_config": {"format": {"type": "json_schema", "schema": schema}}}
    t0 = time.monotonic()
    async with http.post(base + "/v1/messages?beta=true", json=body) as r:
        answer = await r.json()
        assert r.status == 200, answer
    took = time.monotonic() - t0
    assert answer["content"] and small.requests == [] and gw.backends["small"].queue.acquired_total == 0
    assert sum(gw.metrics.background_answers.labels("small", "title", result)._value.get()
               for result in ("model", "invalid", "timeout", "failed", "busy")) == 0
    print(f"\n{optional} optional properties: answered by the main model in {took:.1f} s")
