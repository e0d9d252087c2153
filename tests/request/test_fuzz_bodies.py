"""Property-based fuzzing (hypothesis) of the real gateway app against a fake upstream: request bodies.

Claude Code's real request shapes (tests/fixtures) with any field the gateway reads replaced by arbitrary
JSON (huge ints, deep nesting, empty containers, any unicode, lone surrogates), or deleted, plus arbitrary
bytes, Content-Types, Content-Encodings and chunked uploads, to /v1/messages and /v1/messages/count_tokens.
Always: within 10 s, status 200, a 4xx or 529; anything but 200 is an Anthropic error envelope; a 200
stream has exactly one terminal event, last; a synthetic answer stays under 100 KB; GET /health answers
within 0.5 s while each request runs; the slot is free afterwards.

Upstream SSE framing: test_fuzz_streams; the bugs this fuzzing found: test_fuzz_bugs.
FUZZ_SCALE=5 in the environment runs five times as many examples.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import zlib
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from orchestrator.backends.gateway import GATEWAY
from testkit.client import sample
from testkit.engine import FakeEngine
from testkit.fuzz import (REQUEST_TIMEOUT, SYNTHETIC_LIMIT, assert_anthropic_error_event, assert_envelope,
                          assert_one_terminal_last, assert_responsive, fuzz_settings, json_or_none, one_in,
                          sse_blocks, until_free, with_health_probes)

# The failing examples' bodies are large; hypothesis says so each time.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")


FIXTURE_BODIES = [sample(n)["body"] for n in ("main-2.1.332.json", "title-2.1.332.json", "topic-2.0.77.json",
                                               "warmup-2.0.77.json", "count_tokens-2.1.197.json",
                                               "count-probe-2.1.197.json")]
TITLE_SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"],
                "additionalProperties": False}
SMALL_BODIES = [
    {"model": "big-model", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]},
    {"model": "big-model", "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "hello"}]},
    {"model": "claude-haiku-4-5", "max_tokens": 64, "stream": True,
     "messages": [{"role": "user", "content": [{"type": "text", "text": "<session>fix the login bug</session>"}]}],
     "output_config": {"format": {"type": "json_schema", "schema": TITLE_SCHEMA}}},
    {"model": "claude-3-5-HAIKU", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
]
BASES = FIXTURE_BODIES + SMALL_BODIES

WORDS = ["", " ", "text", "image", "tool_use", "tool_result", "json_schema", "user", "assistant", "system",
         "Warmup", "{", "isNewTopic", "title", "string", "array", "object", "integer", "number", "boolean",
         "null", "claude-haiku-4-5", "HAIKU", "big-model", "*", "[", "x-anthropic-billing-header: cc_version=1; cch=0;",
         "<session>", "</session>", "<session>add a cache</session>", "message_stop", "event: error\n\ndata: {}\n\n",
         "\r\n\r\n", "\x00", "\ud800", "\udfff", "\U0001f600", "ééé", "a" * 300, "write a title", "NaN"]
SCHEMA_KEYS = ["type", "properties", "items", "anyOf", "oneOf", "allOf", "required", "enum", "const", "minLength",
               "maxLength", "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum", "additionalProperties"]
TYPES = ["string", "array", "object", "integer", "number", "boolean", "null"]

any_text = st.text(st.characters(exclude_categories=()), max_size=30)  # lone surrogates included
strings = st.one_of(st.sampled_from(WORDS), any_text, st.text(max_size=120))
ints = st.one_of(st.integers(), st.integers(-3, 70), st.integers(0, 70_000),
                 st.sampled_from([2**31 - 1, 2**31, 2**53 + 1, 2**63, 2**64, 10**100, -10**100, 32000, 64 * 1024,
                                  10**4000]))
floats = st.floats(allow_nan=False, allow_infinity=False)
leaves = st.one_of(st.none(), st.booleans(), ints, floats, strings)
json_values = st.recursive(leaves, lambda c: st.lists(c, max_size=4) | st.dictionaries(strings, c, max_size=4),
                           max_leaves=12)


@dataclass(frozen=True)
class Deep:
    """A value nested `depth` levels deep, spliced in as raw JSON (json.dumps could not write it)."""

    kind: str
    depth: int

    def text(self) -> str:
        n = self.depth
        if self.kind == "list":
            return "[" * n + "]" * n
        if self.kind == "dict":
            return '{"a":' * n + "1" + "}" * n
        # A schema of nested arrays: check_schema's depth bound, instance_of's recursion.
        return '{"type":"array","minItems":1,"items":' * n + '{"type":"string"}' + "}" * n


deep = st.builds(Deep, st.sampled_from(["list", "dict", "schema"]),
                 st.one_of(st.integers(1, 40), st.integers(28, 36), st.integers(900, 1100), st.integers(1, 5000)))
schema_leaf = st.fixed_dictionaries({}, optional={
    "type": st.one_of(st.sampled_from(TYPES), st.lists(st.sampled_from(TYPES), max_size=3), json_values),
    "minLength": ints, "maxLength": ints, "minItems": ints, "enum": st.lists(json_values, max_size=3),
    "const": json_values, "minimum": st.one_of(ints, floats), "additionalProperties": st.booleans(),
})
prop_names = st.one_of(st.sampled_from(["title", "isNewTopic", "name", ""]), strings)
schemas = st.recursive(schema_leaf, lambda sub: st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["object", "array", "string"]),
    "properties": st.dictionaries(prop_names, sub, max_size=4),
    "items": sub, "anyOf": st.lists(sub, max_size=3), "oneOf": st.lists(sub, max_size=2),
    "allOf": st.lists(sub, max_size=2), "required": st.lists(prop_names, max_size=4),
    "minItems": ints, "additionalProperties": st.booleans(),
}), max_leaves=8)

S = ("output_config", "format", "schema")
PATHS: list[tuple] = [
    ("model",), ("messages",), ("max_tokens",), ("stream",), ("system",), ("tools",), ("tool_choice",),
    ("metadata",), ("thinking",), ("output_config",),
    ("messages", 0), ("messages", -1), ("messages", -1, "role"), ("messages", -1, "content"),
    ("messages", -1, "content", 0), ("messages", -1, "content", 0, "type"), ("messages", -1, "content", 0, "text"),
    ("messages", -1, "content", -1, "text"), ("messages", 0, "content"),
    ("system", 0), ("system", 0, "text"), ("system", -1, "text"), ("system", 0, "type"),
    ("tools", 0), ("tools", 0, "input_schema"), ("tool_choice", "type"), ("metadata", "user_id"),
    ("thinking", "type"), ("thinking", "budget_tokens"),
    ("output_config", "format"), ("output_config", "format", "type"), S,
    *[(*S, k) for k in SCHEMA_KEYS],
    (*S, "properties", "title"), (*S, "properties", "title", "type"), (*S, "properties", "title", "minLength"),
    (*S, "properties", "title", "enum"), (*S, "properties", "extra"), (*S, "items", "items"),
]


def value_for(path: tuple) -> st.SearchStrategy:
    last = path[-1]
    choices = [json_values, deep]
    if "schema" in path or last in ("properties", "items", "title", "extra", "input_schema"):
        choices += [schemas, schemas]
    if last in ("minLength", "maxLength", "minItems", "maxItems", "minimum", "maximum", "max_tokens",
                "budget_tokens", "exclusiveMinimum"):
        choices += [ints, ints]
    if last == "type":
        choices += [st.sampled_from(TYPES + ["text", "json_schema", "enabled", "auto"])]
    if last in ("model", "role", "text", "content"):
        choices += [strings, strings]
    if last in ("stream", "additionalProperties"):
        choices += [st.booleans()]
    return st.one_of(choices)


def put(obj: Any, path: tuple, value: Any) -> None:
    """Set path to value, making dicts on the way; a step that cannot be taken leaves obj as it is."""
    for key in path[:-1]:
        if isinstance(obj, dict) and isinstance(key, str):
            if not isinstance(obj.get(key), (dict, list)):
                obj[key] = {}
            obj = obj[key]
        elif isinstance(obj, list) and isinstance(key, int):
            if not obj:
                obj.append({})
            if not isinstance(obj[key], (dict, list)):
                obj[key] = {}
            obj = obj[key]
        else:
            return
    last = path[-1]
    if isinstance(obj, dict) and isinstance(last, str):
        obj[last] = value
    elif isinstance(obj, list) and isinstance(last, int):
        if obj:
            obj[last] = value
        else:
            obj.append(value)


def delete(obj: Any, path: tuple) -> None:
    for key in path[:-1]:
        try:
            obj = obj[key]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(obj, dict):
        obj.pop(path[-1], None)
    elif isinstance(obj, list) and isinstance(path[-1], int) and obj:
        del obj[path[-1]]


def serialize(body: Any, ensure_ascii: bool, compact: bool) -> bytes:
    """JSON bytes of body, Deep values spliced in raw; lone surrogates written as (invalid) UTF-8."""
    deeps: list[Deep] = []

    def default(o):
        if isinstance(o, Deep):
            deeps.append(o)
            return f"\x00DEEP{len(deeps) - 1}\x00"
        raise TypeError(type(o))

    text = json.dumps(body, ensure_ascii=ensure_ascii, default=default,
                      separators=(",", ":") if compact else None)
    for i, d in enumerate(deeps):
        text = text.replace(json.dumps(f"\x00DEEP{i}\x00"), d.text(), 1)
    return text.encode("utf-8", "surrogatepass")


class Case:
    def __init__(self, path: str, data: bytes, plain: bytes, headers: dict[str, str],
                 chunks: list[bytes] | None) -> None:
        self.path = path
        self.data = data          # what goes on the wire
        self.plain = plain        # the JSON text before any Content-Encoding
        self.headers = headers
        self.chunks = chunks      # None: one body with Content-Length; else chunked, in these pieces

    def __repr__(self) -> str:
        data = self.data if len(self.data) <= 2000 else self.data[:2000] + b"..."
        return (f"Case(POST {self.path}, headers={self.headers}, "
                f"chunks={None if self.chunks is None else [len(c) for c in self.chunks]}, "
                f"{len(self.data)} bytes: {data!r})")


@st.composite
def mutated_bodies(draw) -> Any:
    body = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 2, 3, 4]))):
        path = draw(st.sampled_from(PATHS))
        if one_in(draw, 10):
            delete(body, path)
        else:
            put(body, path, draw(value_for(path)))
    if one_in(draw, 8):
        # Across the gateway's inline-parse threshold (64 KB) and its body limit (256 KB here).
        body["pad"] = "x" * draw(st.sampled_from([70_000, 300_000]))
    return body


def _raw_templates() -> st.SearchStrategy[bytes]:
    ok = b'"messages":[{"role":"user","content":"hi"}]'
    return st.one_of(
        st.builds(lambda n: b'{"model":"m","max_tokens":' + b"9" * n + b"," + ok + b"}", st.integers(4290, 4400)),
        st.sampled_from([
            b"", b"null", b"[]", b'"s"', b"1e999999", b"{}", b"{", b"}", b"\xef\xbb\xbf{}",
            b'{"model":"m","max_tokens":5,' + ok + b',"temperature":NaN}',
            b'{"model":"m","max_tokens":5,' + ok + b',"temperature":-Infinity}',
            b'{"model":"m","max_tokens":1e999,' + ok + b"}",
            b'{"model":"m","model":{},"max_tokens":5,' + ok + b"}",
            b'{"model":{},"model":"m","max_tokens":5,' + ok + b"}",
            b'{"model":"\\ud800","max_tokens":5,' + ok + b"}",
            b'{"model":"m\xff","max_tokens":5,' + ok + b"}",
            b'{"model":"m","max_tokens":5,' + ok + b"}\x00",
            b' \r\n\t{"model":"m","max_tokens":5,' + ok + b"} \n",
        ]),
    )


@st.composite
def raw_bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["binary", "template", "corrupt", "utf16", "bom"]))
    if kind == "binary":
        return draw(st.binary(max_size=300))
    if kind == "template":
        return draw(_raw_templates())
    data = serialize(draw(mutated_bodies()), ensure_ascii=True, compact=True)
    if kind == "utf16":
        return data.decode("utf-8").encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32"])))
    if kind == "bom":
        return b"\xef\xbb\xbf" + data
    i = draw(st.integers(0, len(data)))
    op = draw(st.sampled_from(["cut", "insert", "replace"]))
    junk = draw(st.binary(min_size=1, max_size=3))
    return (data[:i] if op == "cut" else data[:i] + junk + data[i:] if op == "insert"
            else data[:i] + junk + data[i + len(junk):])


@st.composite
def schema_bodies(draw) -> Any:
    """A title request (synthetic: a Haiku name, or the title shape) whose output schema is generated."""
    schema = draw(schemas)
    if draw(st.booleans()):
        props = schema.setdefault("properties", {}) if isinstance(schema.get("properties", {}), dict) else {}
        props["title"] = draw(st.one_of(st.just({"type": "string"}), schemas))
    body = copy.deepcopy(SMALL_BODIES[2])
    body["output_config"]["format"]["schema"] = schema
    body["stream"] = draw(st.booleans())
    body["model"] = draw(st.sampled_from(["claude-haiku-4-5", "big-model"]))
    body["messages"][0]["content"][0]["text"] = draw(strings)
    return body


@st.composite
def cases(draw) -> Case:
    path = draw(st.sampled_from(["/v1/messages", "/v1/messages?beta=true", "/v1/messages/count_tokens",
                                 "/v1/messages/count_tokens?beta=true"]))
    kind = draw(st.sampled_from(["raw", "mutated", "mutated", "mutated", "schema"]))
    if kind == "raw":
        plain = draw(raw_bodies())
    else:
        body = draw(mutated_bodies() if kind == "mutated" else schema_bodies())
        plain = serialize(body, ensure_ascii=draw(st.booleans()), compact=draw(st.booleans()))
    headers = {"Content-Type": draw(st.sampled_from(
        ["application/json"] * 8 + ["application/json; charset=utf-8", "APPLICATION/JSON", "", "text/plain",
                                    "application/vnd.anthropic+json", "application/x-www-form-urlencoded",
                                    "multipart/form-data; boundary=x", "application/json; charset=utf-16"]))}
    headers.update(draw(st.sampled_from([{}, {"anthropic-version": "2023-06-01"},
                                         {"anthropic-beta": "a,b", "x-api-key": "sk-x"}])))
    encoding = draw(st.sampled_from([None] * 12 + ["gzip", "gzip-raw", "deflate", "br", "identity", "x-bogus"]))
    data = plain
    if encoding == "gzip":
        data = gzip.compress(plain)
    elif encoding == "deflate":
        data = zlib.compress(plain)
    if encoding is not None:
        headers["Content-Encoding"] = "gzip" if encoding == "gzip-raw" else encoding  # gzip-raw: says gzip, is not
    chunks = None
    if one_in(draw, 5):
        cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=8))))
        bounds = [0, *cuts, len(data)]
        chunks = [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    return Case(path, data, plain, headers, chunks)


def parse_like_gateway(data: bytes) -> Any:
    try:
        return json.loads(data, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    except (ValueError, RecursionError):
        return None


class BodyEnv:
    def __init__(self, base: str, gw: Any, fake: FakeEngine, http: aiohttp.ClientSession) -> None:
        self.base, self.gw, self.fake, self.http = base, gw, fake, http
        self.stats: dict[str, int] = {}

    def __repr__(self) -> str:
        return "BodyEnv"


@pytest.fixture
async def body_env(gateway, serve_app, http):
    # Parses its bodies like llama-server (a 400 for what is not JSON, UTF-8 whatever the charset).
    fake = FakeEngine(die_on_overlap=False, answer_model="/models/fake-model.gguf", parts=2)
    url = await serve_app(fake.app())
    base, app = await gateway({"backends": [{"name": "primary", "url": url, "slots": 1, "max_output_tokens": 64}],
                               "gateway": {"max_body_bytes": 256 * 1024, "health_interval_seconds": 0.05}})
    env = BodyEnv(base, app[GATEWAY], fake, http)
    yield env
    print("body fuzz outcomes:", dict(sorted(env.stats.items())))


async def send(env: BodyEnv, case: Case) -> tuple[int, Any, bytes]:
    kwargs: dict[str, Any] = {}
    if case.chunks is None:
        kwargs["data"] = case.data
    else:
        async def gen():
            for c in case.chunks:
                yield c
                await asyncio.sleep(0)
        kwargs["data"] = gen()
    headers = dict(case.headers)
    skip = ()
    if headers.get("Content-Type") == "":
        del headers["Content-Type"]
        skip = ("Content-Type",)
    async with asyncio.timeout(REQUEST_TIMEOUT):
        async with env.http.post(env.base + case.path, headers=headers, skip_auto_headers=skip, **kwargs) as r:
            return r.status, r.headers, await r.read()


def check_body_answer(env: BodyEnv, case: Case, status: int, headers, raw: bytes) -> str:
    """The body property for one answer; returns a label for the statistics."""
    body = parse_like_gateway(case.plain)
    assert status == 200 or 400 <= status < 500 or status == 529, (status, raw[:500])
    if status != 200:
        etype = assert_envelope(raw, headers)["error"]["type"]
        return f"{status} {etype}"
    assert isinstance(body, dict), "200 for a body that is not a JSON object"
    if "count_tokens" in case.path:
        answer = json.loads(raw)
        assert isinstance(answer.get("input_tokens"), int) and answer["input_tokens"] >= 0, answer
        return "200 count"
    if body.get("stream") is True:
        assert headers.get("Content-Type", "").startswith("text/event-stream"), headers
        blocks, tail = sse_blocks(raw)
        assert tail == b"", f"unfinished SSE block at the end: {tail[:200]!r}"
        last = assert_one_terminal_last(blocks)
        start = json_or_none(next((b.data for b in blocks if b.event == "message_start"), None))
        synthetic = isinstance(start, dict) and str(start.get("message", {}).get("id", "")).startswith("msg_synth_")
        label = f"200 stream {last.event}"
        if isinstance(start, dict):
            assert start["message"]["model"] == body["model"], start  # the client's name, not the backend's
        if last.event == "error":
            assert_anthropic_error_event(last)
    else:
        msg = json.loads(raw)
        assert isinstance(msg, dict) and msg.get("type") == "message", msg
        synthetic = str(msg.get("id", "")).startswith("msg_synth_")
        assert msg.get("model") == body["model"]
        label = "200 message"
    if synthetic:
        label += " synthetic"
        assert len(raw) < SYNTHETIC_LIMIT, f"synthetic answer of {len(raw)} bytes"
    return label


@fuzz_settings(500)
@given(case=cases())
async def test_fuzz_request_bodies(body_env, case):
    env = body_env
    note(f"POST {case.path} headers={case.headers} chunks={None if case.chunks is None else len(case.chunks)} "
         f"body[:600]={case.data[:600]!r} ({len(case.data)} bytes)")
    (status, headers, raw), worst = await with_health_probes(env.http, env.base, send(env, case))
    note(f"answer {status} {raw[:400]!r}")
    label = check_body_answer(env, case, status, headers, raw)
    env.stats[label] = env.stats.get(label, 0) + 1
    await until_free(env.gw)

    async def again() -> float:
        return (await with_health_probes(env.http, env.base, send(env, case)))[1]

    await assert_responsive(worst, again, "this request")
    await until_free(env.gw)
