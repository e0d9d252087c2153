"""splice.splice: a rewrite cut into the client's own bytes, every other byte kept, proven or not done.

The oracle is the re-serialising path (`utf8_json` of the rewritten body): whatever forwarded_body
sends must parse to the same JSON; and when the splice is taken, the bytes are the client's minus
exactly the first system block (or with exactly the max_tokens number replaced).
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.conversation import strip_billing_header
from orchestrator.jsonvalues import utf8_json
from orchestrator.request.routing import Rewrites, forwarded_body
from orchestrator.splice import SPLICE_TAIL_BYTES, splice
from testkit.client import sample

BILLING = {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332.7a0; cc_entrypoint=cli;"}
WS = b" \t\n\r"


def rewritten(body: dict, clamp: int = 0, model: str | None = None) -> dict:
    out = strip_billing_header(body) or body
    if clamp and isinstance(out.get("max_tokens"), int) and out["max_tokens"] > clamp:
        out = {**out, "max_tokens": clamp}
    if model and out.get("model") != model:
        out = {**out, "model": model}
    return out


def assert_one_block_cut(raw: bytes, sent: bytes, block: dict) -> None:
    """`sent` is `raw` with one cut: the block's JSON, then an optional comma and whitespace."""
    d = len(raw) - len(sent)
    assert d > 0
    p = 0
    while p < len(sent) and raw[p] == sent[p]:
        p += 1
    for s in range(p, max(-1, p - d - 1), -1):
        if raw[:s] + raw[s + d:] == sent:
            cut = raw[s:s + d].strip(WS)
            cut = cut[:-1].rstrip(WS) if cut.endswith(b",") else cut
            try:
                if json.loads(cut) == block:
                    return
            except ValueError:
                continue
    raise AssertionError("the forwarded bytes are not the client's minus the billing block")


def test_claude_code_body_is_spliced_byte_for_byte():
    body = sample("main-2.1.332.json")["body"]
    raw = utf8_json(body)
    sent = forwarded_body(body, raw, Rewrites(strip_billing=True, max_tokens=0))
    assert sent == raw.replace(utf8_json(body["system"][0]) + b",", b"", 1)
    assert json.loads(sent) == rewritten(body)


def test_billing_block_alone_leaves_an_empty_list():
    raw = b'{"model":"m","system":[ {"type":"text","text":"x-anthropic-billing-header: a;"} ],"messages":[]}'
    sent = forwarded_body(json.loads(raw), raw, Rewrites(strip_billing=True, max_tokens=0))
    assert sent == b'{"model":"m","system":[ ],"messages":[]}'


def test_pretty_printed_and_ascii_escaped_bodies_are_spliced():
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo ✓ \"q\" \\ \n"}],
            "system": [BILLING, {"type": "text", "text": "You are Claude Code. é"}], "max_tokens": 32000}
    for raw in (json.dumps(body, indent=2).encode(), json.dumps(body).encode(),
                json.dumps(body, ensure_ascii=False, indent="\t").encode() + b"\n\n"):
        sent = splice(body, rewritten(body), raw)
        assert sent is not None
        assert_one_block_cut(raw, sent, BILLING)
        assert json.loads(sent) == rewritten(body)


def test_max_tokens_clamp_replaces_only_the_number():
    body = sample("main-2.1.332.json")["body"]
    raw = utf8_json(body)
    sent = forwarded_body(body, raw, Rewrites(strip_billing=False, max_tokens=256))
    assert sent == raw.replace(b'"max_tokens":32000', b'"max_tokens":256', 1)
    both = forwarded_body(body, raw, Rewrites(strip_billing=True, max_tokens=256))
    assert json.loads(both) == rewritten(body, 256)
    assert len(both) == len(raw) - len(utf8_json(BILLING | {"text": body["system"][0]["text"]})) - 1 - 2


def test_string_system_keeps_everything_but_its_first_line():
    raw = b'{"model":"m", "system" : "x-anthropic-billing-header: cch=1;\\nYou are \\u00e9 helpful","messages":[]}'
    body = json.loads(raw)
    sent = forwarded_body(body, raw, Rewrites(strip_billing=True, max_tokens=0))
    assert json.loads(sent) == {"model": "m", "system": "You are é helpful", "messages": []}


DECOY = {"system": [BILLING, {"type": "text", "text": "nested"}]}


@pytest.mark.parametrize("where", ["tool_after", "message_before", "both"])
def test_a_nested_system_key_is_never_cut(where):
    """A tool schema or a tool call's input with its own "system" (the same billing block in it):
    only the top-level member is cut, whichever comes last in the bytes."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "system": [BILLING, {"type": "text", "text": "top"}], "tools": [], "max_tokens": 9}
    if where in ("message_before", "both"):
        body["messages"].append({"role": "assistant", "content": [
            {"type": "tool_use", "id": "t", "name": "Edit", "input": DECOY}]})
    if where in ("tool_after", "both"):
        body["tools"] = [{"name": "x", "input_schema": {"type": "object", "properties": DECOY}}]
    raw = utf8_json(body)
    sent = splice(body, rewritten(body), raw)
    assert sent is not None
    assert json.loads(sent) == rewritten(body)
    assert json.loads(sent)["system"] == [{"type": "text", "text": "top"}]


def test_an_escaped_key_ending_in_system_is_not_the_member():
    raw = (b'{"model":"m","messages":[],"system":[' + utf8_json(BILLING) +
           b',{"type":"text","text":"top"}],"meta":{"a\\"system":[' + utf8_json(BILLING) + b']}}')
    body = json.loads(raw)
    sent = splice(body, rewritten(body), raw)
    assert sent is not None and json.loads(sent) == rewritten(body)


def test_a_top_level_key_ending_in_system_is_not_the_member():
    """`"a\\"system":` at the top level, after the real member, reads like it from its inner quote on."""
    raw = (b'{"model":"m","messages":[],"system":[' + utf8_json(BILLING) + b',{"type":"text","text":"top"}],'
           b'"a\\"system":[' + utf8_json(BILLING) + b']}')
    body = json.loads(raw)
    assert "a\"system" in body
    sent = forwarded_body(body, raw, Rewrites(strip_billing=True, max_tokens=0))
    assert json.loads(sent) == rewritten(body)


def test_duplicate_top_level_system_cuts_the_one_json_keeps():
    raw = (b'{"system":[' + utf8_json(BILLING) + b',{"type":"text","text":"first"}],"model":"m","messages":[],'
           b'"system":[' + utf8_json(BILLING) + b',{"type":"text","text":"last"}]}')
    body = json.loads(raw)
    assert body["system"][1]["text"] == "last"
    sent = forwarded_body(body, raw, Rewrites(strip_billing=True, max_tokens=0))
    assert json.loads(sent) == rewritten(body)
    assert sent.count(b"x-anthropic-billing-header") == 1  # the first (ignored) member stays as sent


def test_a_later_member_not_written_as_found_is_not_missed():
    """A second top-level "system" written `"system" :` (not found by the search) after the one found:
    the proof sees it, so nothing is spliced and the body is re-serialised."""
    raw = (b'{"model":"m","messages":[],"system":[' + utf8_json(BILLING) + b'],'
           b'"system" :[' + utf8_json(BILLING) + b',{"type":"text","text":"last"}]}')
    body = json.loads(raw)
    assert splice(body, rewritten(body), raw) is None
    assert json.loads(forwarded_body(body, raw, Rewrites(strip_billing=True, max_tokens=0))) == rewritten(body)


def test_a_member_far_from_the_end_is_re_serialised():
    """System before a conversation much larger than the proof's reach: not spliced, still right."""
    body = {"model": "m", "system": [BILLING, {"type": "text", "text": "s"}],
            "messages": [{"role": "user", "content": "y" * (SPLICE_TAIL_BYTES + 1)}]}
    raw = utf8_json(body) + b" " * (SPLICE_TAIL_BYTES * 2)
    assert splice(body, rewritten(body), raw) is None
    assert json.loads(forwarded_body(body, raw, Rewrites(strip_billing=True, max_tokens=0))) == rewritten(body)


def test_lone_surrogate_elsewhere_is_forwarded_as_sent():
    raw = (b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"\\ud800"}],'
           b'"system":[' + utf8_json(BILLING) + b',{"type":"text","text":"s"}]}')
    sent = forwarded_body(json.loads(raw), raw, Rewrites(strip_billing=True, max_tokens=0))
    assert b'"\\ud800"' in sent and b"billing" not in sent


# ---- fuzzing: random bodies, layouts and decoys, against the re-serialising path -----------------

keys = st.sampled_from(["system", "type", "text", "a\"system", "max_tokens", "messages", "x", "é", "sys\\tem",
                        "model"])
scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=20)
blocks = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)})


def dumps(value, rng: random.Random) -> str:
    """JSON text in one of many layouts, whitespace anywhere JSON allows it."""
    indent = rng.choice([None, None, 0, 1, "\t"])
    sep = rng.choice([(",", ":"), (", ", ": "), (" ,", " : "), (",\n", ":\r\n ")])
    return json.dumps(value, indent=indent, separators=sep if indent is None else (sep[0].rstrip(), sep[1]),
                      ensure_ascii=rng.random() < 0.5)


@st.composite
def documents(draw):
    """(raw bytes, body) of a Messages-like object: billing block first or not, nested decoys, members in
    any order, sometimes a duplicate `system` member, raw written member by member."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    system = draw(st.lists(blocks, max_size=3))
    if draw(st.booleans()):
        system = [{"type": "text", "text": "x-anthropic-billing-header: cch=" + draw(st.text(max_size=8))}] + system
    system_value = system if draw(st.integers(0, 5)) else "x-anthropic-billing-header: a;\n" + draw(st.text(max_size=9))
    decoy = {"system": [BILLING, *draw(st.lists(blocks, max_size=2))], "x": draw(values)}
    members = [("model", "m"), ("system", system_value), ("max_tokens", draw(st.integers(1, 100000))),
               ("messages", [{"role": "user", "content": draw(values)},
                             {"role": "assistant", "content": [{"type": "tool_use", "input": decoy}]}]),
               ("tools", [{"name": "t", "input_schema": {"properties": decoy}}]),
               ("extra", draw(values))]
    rng.shuffle(members)
    if draw(st.integers(0, 4)) == 0:
        members.insert(rng.randrange(len(members) + 1), ("system", draw(values)))
    if draw(st.integers(0, 4)) == 0:  # a second model: the one json.loads keeps is the last
        members.insert(rng.randrange(len(members) + 1), ("model", draw(values)))
    ws = lambda: rng.choice(["", "", " ", "\n", "\t ", "\r\n"])
    # A key written with an escape reads the same: "mod\u0065l" is "model" to json.loads.
    name = lambda k: '"mod\\u0065l"' if k == "model" and rng.random() < 0.2 else json.dumps(k)
    text = "{" + ws() + ("," + ws()).join(f"{name(k)}{ws()}:{ws()}{dumps(v, rng)}{ws()}" for k, v in members) \
        + "}" + ws()
    raw = text.encode()
    return raw, json.loads(raw)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), st.sampled_from([0, 1, 50, 100000]), st.sampled_from([None, "m", "served/é"]))
def test_forwarded_bytes_parse_as_the_re_serialised_body(doc, clamp, model):
    raw, body = doc
    out = rewritten(body, clamp, model)
    sent = forwarded_body(body, raw, Rewrites(strip_billing=True, max_tokens=clamp, model=model))
    assert json.loads(sent) == json.loads(utf8_json(out))
    spliced = splice(body, out, raw) if out is not body else None
    if spliced is not None and out.get("max_tokens") == body.get("max_tokens") \
            and out.get("model") == body.get("model") and isinstance(body.get("system"), list):
        assert_one_block_cut(raw, spliced, body["system"][0])


@settings(max_examples=300, deadline=None)
@given(st.lists(blocks, max_size=3), st.integers(0, 30), st.booleans())
def test_claude_code_shaped_bodies_always_take_the_splice(rest, turns, clamp):
    """Compact JSON, members in Claude Code's order, conversation of any length before `system`:
    the fast path is taken, never the re-serialisation."""
    body = sample("main-2.1.332.json")["body"]
    body = {**body, "system": [body["system"][0], *rest],
            "messages": body["messages"] + [{"role": "user", "content": f"turn {i} \"é\"\n"} for i in range(turns)]}
    raw = utf8_json(body)
    out = rewritten(body, 256 if clamp else 0)
    sent = splice(body, out, raw)
    assert sent is not None
    assert json.loads(sent) == out


def test_the_engines_model_name_replaces_only_the_name():
    body = sample("main-2.1.332.json")["body"]
    raw = utf8_json(body)
    assert raw.count(b'"model"') > 1  # the Task tool's `model` parameter, in `tools`
    sent = splice(body, {**body, "model": "HuggingFaceTB/SmolLM2"}, raw)
    assert sent == raw.replace(utf8_json(body["model"]), b'"HuggingFaceTB/SmolLM2"', 1)
    # "model" written again in the conversation: proven only by re-serialising.
    more = {**body, "messages": [*body["messages"], {"role": "user", "content": [{"type": "text", "text": "x"}],
                                                     "model": "decoy"}]}
    raw = utf8_json(more)
    assert splice(more, {**more, "model": "s"}, raw) is None
    assert json.loads(forwarded_body(more, raw, Rewrites(model="s"))) == {**more, "model": "s"}
