"""Property-based fuzzing (hypothesis) of the real gateway app against fake upstreams.

1. Request bodies. Claude Code's real request shapes (tests/fixtures) with any field the gateway
   reads replaced by arbitrary JSON (huge ints, deep nesting, empty containers, any unicode,
   lone surrogates), or deleted, plus arbitrary bytes, Content-Types, Content-Encodings and
   chunked uploads, to /v1/messages and /v1/messages/count_tokens. Always: within 10 s, status
   200, a 4xx or 529; anything but 200 is an Anthropic error envelope; a 200 stream has exactly
   one terminal event, last; a synthetic answer stays under 100 KB; GET /health answers within
   0.5 s while each request runs; the slot is free afterwards.
2. Upstream SSE framing. A valid Anthropic event sequence re-framed (LF, CRLF, CR or mixed line
   endings, comment lines and comment-only blocks, id:/retry:/unknown fields, "data:" with or
   without its space, JSON split over several data lines, random chunking down to single bytes,
   tiny delays, trailing bytes after message_stop) reaches the client byte for byte, except
   message_start, whose model is set to the client's. Broken streams (an event whose data is not a
   JSON object, a cut at any byte ended cleanly or by a reset, no message_stop, the backend's own
   error event) reach the client as a well-formed SSE stream with exactly one terminal event, an
   Anthropic-shaped `error`, last, or as an Anthropic-shaped 502/529 when nothing of the answer
   could be sent yet; the slot is free afterwards. Half the examples run through a gateway
   sending keep-alive pings every 2 ms, which may only precede the backend's bytes.

Gateway bugs found by this fuzzing (all fixed) keep minimal reproductions at the end of the file.

FUZZ_SCALE=5 in the environment runs five times as many examples.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gzip
import json
import os
import re
import time
import zlib
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from orchestrator.backends.gateway import GATEWAY
from testkit.client import sample
from testkit.engine import FakeEngine, Reply

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
# The failing examples' bodies are large; hypothesis says so each time.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
REQUEST_TIMEOUT = 10.0
HEALTH_LATENCY = 0.5
SYNTHETIC_LIMIT = 100 * 1024
TERMINAL = ("message_stop", "error")
# The gateway's keep-alive ping, as Claude Code receives it.
PING = b'event: ping\ndata: {"type":"ping"}\n\n'


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, database=None,
                    print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example,
                                           HealthCheck.filter_too_much])


# ---- shared checks ---------------------------------------------------------------------------------

def assert_envelope(raw: bytes, headers) -> dict:
    assert headers.get("Content-Type", "").startswith("application/json"), headers.get("Content-Type")
    body = json.loads(raw)
    assert isinstance(body, dict) and body.get("type") == "error", body
    err = body.get("error")
    assert isinstance(err, dict) and isinstance(err.get("type"), str) and isinstance(err.get("message"), str), body
    return body


_EOL = re.compile(rb"\r\n|\r|\n")


@dataclass
class Blk:
    """One SSE block (up to and including its blank line) and the event it dispatches, if any."""

    raw: bytes
    event: str | None
    data: str | None


def sse_blocks(raw: bytes) -> tuple[list[Blk], bytes]:
    """The blocks of a whole stream per the WHATWG algorithm (a final CR ends a line), and the
    bytes after the last blank line (an unfinished block)."""
    blocks: list[Blk] = []
    start = pos = 0
    name, data = "", []
    for m in _EOL.finditer(raw):
        line, pos = raw[pos:m.start()], m.end()
        if line:
            if not line.startswith(b":"):
                f, _, v = line.decode("utf-8", "replace").partition(":")
                v = v[1:] if v.startswith(" ") else v
                if f == "event":
                    name = v
                elif f == "data":
                    data.append(v)
            continue
        blocks.append(Blk(raw[start:pos], (name or "message") if data else None,
                          "\n".join(data) if data else None))
        name, data, start = "", [], pos
    return blocks, raw[start:]


def json_or_none(text: str | None) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        return None


def assert_one_terminal_last(blocks: list[Blk]) -> Blk:
    events = [b for b in blocks if b.event is not None]
    terminals = [b for b in events if b.event in TERMINAL]
    assert len(terminals) == 1, [b.event for b in events]
    assert blocks and blocks[-1] is terminals[0], "bytes after the terminal event"
    return terminals[0]


def assert_anthropic_error_event(b: Blk) -> dict:
    data = json_or_none(b.data)
    assert isinstance(data, dict) and data.get("type") == "error", b.data
    assert isinstance(data.get("error"), dict), b.data
    assert isinstance(data["error"].get("type"), str) and isinstance(data["error"].get("message"), str), b.data
    return data


async def until_free(gw, timeout: float = 30.0) -> None:  # polled: only a stuck slot reaches it
    q = gw.backends["primary"].queue
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if q.busy == 0 and q.depth == 0 and not gw.held_slots():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"slot not free {timeout}s after the answer: busy={q.busy} depth={q.depth} "
                         f"releasing={gw.held_slots()}")


async def with_health_probes(http: aiohttp.ClientSession, base: str, coro) -> tuple[Any, float]:
    """Run `coro` while GET /health is asked over and over and a ticker watches the event loop (the
    gateway's and the client's); (its result, the longest /health or stall of the loop)."""
    task = asyncio.ensure_future(coro)
    worst = 0.0

    async def ticker() -> None:
        nonlocal worst
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            worst, last = max(worst, now - last), now

    tick = asyncio.create_task(ticker())
    try:
        while not task.done():
            t0 = time.monotonic()
            async with asyncio.timeout(REQUEST_TIMEOUT):
                async with http.get(base + "/health") as r:
                    await r.read()
                    assert r.status == 200
            worst = max(worst, time.monotonic() - t0)
            await asyncio.wait([task], timeout=0.02)
        return await task, worst
    finally:
        tick.cancel()
        if not task.done():
            task.cancel()


async def assert_responsive(worst: float, again, what: str) -> None:
    """The event loop did not stand still `worst` seconds; a stall is measured once more, with the
    same request (`again()`: its worst), before it counts: a machine busy with other work (2 cores)
    can stop the process now and then, a blocking call in the gateway stops it every time."""
    if worst >= HEALTH_LATENCY:
        retry = await again()
        assert retry < HEALTH_LATENCY, f"the event loop or GET /health stood still {worst:.2f}s, then " \
                                       f"{retry:.2f}s again, while {what} ran"


def one_in(draw, n: int) -> bool:
    """True about one time in n (hypothesis draws 0 from integers(0, n - 1) far more often than that)."""
    return draw(st.sampled_from([False] * (n - 1) + [True]))


# ---- 1. request bodies --------------------------------------------------------------------------------

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


def has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if any(0xD800 <= ord(c) <= 0xDFFF for c in v):
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


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


# ---- 2. upstream SSE framing ----------------------------------------------------------------------------

class Playing:
    """The fake engine's script: every streaming /v1/messages answered with the current fuzz
    script's bytes, in its chunks, cut off where it says."""

    def __init__(self) -> None:
        self.script: Script | None = None
        self.attempts = 0

    def __call__(self, body: dict, headers) -> Reply:
        s = self.script
        assert s is not None
        self.attempts += 1
        # A reset loses what the gateway had not read yet (aiohttp raises before it returns
        # buffered bytes): mostly give it time to read first (abrupt_after), else all is resent,
        # three times.
        return Reply([x for chunk, delay in s.chunks for x in (chunk, delay)], prefill=s.prefill,
                     close_after=s.abrupt_after if s.abrupt else None)


@dataclass
class Script:
    variant: str
    requested: str               # the client's model
    full: bytes                  # the whole framed stream
    sent: bytes                  # what the fake sends of it (before it ends, cleanly or not)
    intended: list[tuple[str, Any]]  # (event, data) the framing must parse back to (self-check)
    chunks: list[tuple[bytes, float]]
    abrupt: bool
    abrupt_after: float
    prefill: float
    pinging: bool


def anthropic_events(model: str, parts: list[str]) -> list[tuple[str, dict]]:
    msg = {"id": "msg_fuzz", "type": "message", "role": "assistant", "model": model, "content": [],
           "stop_reason": None, "stop_sequence": None,
           "usage": {"input_tokens": 12, "output_tokens": 0, "cache_read_input_tokens": 3}}
    out = [("message_start", {"type": "message_start", "message": msg}),
           ("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}})]
    out += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": t}}) for t in parts]
    out += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": len(parts)}}),
            ("message_stop", {"type": "message_stop"})]
    return out


BAD_DATA = ["[1]", '"s"', "3", "null", "true", "", "{", "not json", '{"type":"x"', "NaN", "[]", "1e999"]
UPSTREAM_ERRORS = [
    {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
    {"type": "error", "error": {"type": "api_error", "message": "é\u2028"}, "request_id": "r1"},
    {"error": {"code": 500, "message": "boom", "type": "server_error"}},
    {"error": {"code": 400, "message": "context too long", "type": "invalid_request_error"}},
    {"code": 503, "message": "loading"},
    {},
]
# Model names the gateway takes: printable Unicode (bodies.check_request refuses control
# characters and lone surrogates in `model` with a 400 before any slot).
models = st.text(st.characters(exclude_categories=()), min_size=1, max_size=20).filter(
    lambda m: "haiku" not in m.lower() and m.isprintable())


@st.composite
def scripts(draw, variants: tuple[str, ...]) -> Script:
    variant = draw(st.sampled_from(variants))
    requested = draw(models)
    answer_model = draw(st.sampled_from([requested, "/models/GLM-5-UD-IQ2_XXS-00001-of-00006.gguf", ""]))
    events: list[tuple[str, Any]] = anthropic_events(answer_model, draw(st.lists(st.text(max_size=12), max_size=4)))
    for _ in range(draw(st.integers(0, 2))):  # the backend's ping events, among the content
        events.insert(draw(st.integers(2, len(events) - 1)), ("ping", {"type": "ping"}))

    # Blocks as lists of lines (without line endings): ("event", i) blocks and comment-only blocks.
    sp_mode = draw(st.sampled_from(["always", "never", "mixed"]))
    extras = draw(st.booleans())

    def field_line(name: str, value: str) -> str:
        sp = {"always": True, "never": False}.get(sp_mode) or (sp_mode == "mixed" and draw(st.booleans()))
        return f"{name}:{' ' if sp else ''}{value}"

    def data_values(obj: Any) -> list[str]:
        ea = draw(st.booleans()) or has_lone_surrogate(obj)  # a lone surrogate has no UTF-8
        if one_in(draw, 4):
            return json.dumps(obj, indent=draw(st.integers(0, 2)), ensure_ascii=ea).split("\n")
        return [json.dumps(obj, separators=(",", ":") if draw(st.booleans()) else None, ensure_ascii=ea)]

    def event_block(name: str, data_lines: list[str]) -> list[str]:
        lines = [field_line("data", v) for v in data_lines]
        lines.insert(draw(st.integers(0, len(lines))), field_line("event", name))
        if extras:
            for extra in draw(st.lists(st.sampled_from(["id", "retry", "comment", "unknown"]), max_size=3)):
                if extra == "comment":
                    line = draw(st.sampled_from([":", ": ping", ":keep-alive", ": event: message_stop"]))
                elif extra == "id":
                    line = field_line("id", str(draw(st.integers(0, 999))))
                else:
                    line = field_line("retry", "3000") if extra == "retry" else field_line("x-llama", "1")
                lines.insert(draw(st.integers(0, len(lines))), line)
        return lines

    blocks: list[tuple[list[str], int | None]] = [(event_block(n, data_values(d)), i)
                                                  for i, (n, d) in enumerate(events)]
    for _ in range(draw(st.integers(0, 3)) if extras else 0):
        blocks.insert(draw(st.integers(0, len(blocks))), ([draw(st.sampled_from([": ping", ":", ": x"]))], None))
    stop_at = next(j for j, (_, i) in enumerate(blocks) if i is not None and events[i][0] == "message_stop")
    event_blocks = [j for j, (_, i) in enumerate(blocks) if i is not None]

    if variant == "bad_data":
        j = draw(st.sampled_from(event_blocks))
        name = events[blocks[j][1]][0]
        blocks[j] = (event_block(name, [draw(st.sampled_from(BAD_DATA))]), blocks[j][1])
        events[blocks[j][1]] = (name, "<bad>")
    elif variant == "upstream_error":
        j = draw(st.sampled_from(event_blocks[:-1]))
        err = draw(st.sampled_from(UPSTREAM_ERRORS))
        events.append(("error", err))
        blocks.insert(j, (event_block("error", data_values(err)), len(events) - 1))
    elif variant == "no_stop":
        blocks = blocks[:stop_at]
    if variant in ("ok", "truncate") and draw(st.booleans()):
        # After message_stop: never forwarded.
        junk = draw(st.sampled_from([None, ("message_start", {"type": "message_start"}), ("message", [1])]))
        if junk is None:
            blocks.append(([": bye"], None))
        else:
            events.append(junk)
            blocks.append(([f"event: {junk[0]}", f"data: {json.dumps(junk[1])}"], len(events) - 1))

    # Line endings. A CR followed by an LF is one line ending, so an empty line after a line ended
    # by CR must not end with a lone LF, or two blocks would merge.
    eol_mode = draw(st.sampled_from(["\n", "\r\n", "\r", "mixed"]))
    out = bytearray()
    ends: list[int] = []
    prev = ""
    for lines, _ in blocks:
        for line in [*lines, ""]:
            eols = ["\n", "\r\n", "\r"] if eol_mode == "mixed" else [eol_mode]
            if line == "" and prev == "\r":
                eols = [e for e in eols if e != "\n"]
            prev = draw(st.sampled_from(eols))
            out += (line + prev).encode()
        ends.append(len(out))
    full = bytes(out)
    intended = [(events[i][0], events[i][1]) for _, i in blocks if i is not None]

    abrupt = draw(st.booleans()) if variant == "truncate" else False
    sent = full
    if variant == "truncate":
        # A cut at any byte of a block chosen uniformly; one time in ten before the first event is
        # whole (sent three times then, each retry waiting for the slot to be seen idle: slow).
        first = next(j for j, (_, i) in enumerate(blocks) if i is not None)
        if one_in(draw, 10):
            sent = full[:draw(st.integers(0, ends[first] - 1))]
        else:
            k = draw(st.integers(first, len(ends) - 1))
            sent = full[:draw(st.integers(ends[k - 1] if k > first else ends[first], ends[k]))]

    if one_in(draw, 10):
        cuts = list(range(1, len(sent)))  # one byte at a time
    else:
        cuts = draw(st.lists(st.integers(1, max(1, len(sent) - 1)), max_size=25))
        if draw(st.booleans()):
            cuts += [m.end() for m in re.finditer(rb"\r", sent)]  # between a CR and what follows
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(sent))), len(sent)]
    pieces = [sent[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    delays = [draw(st.sampled_from([0, 0, 0, 0, 0.0005, 0.002])) if i < 12 else 0 for i in range(len(pieces))]
    return Script(variant, requested, full, sent, intended, list(zip(pieces, delays)), abrupt,
                  abrupt_after=draw(st.sampled_from([0, 0.02, 0.02, 0.02])),
                  prefill=draw(st.sampled_from([0, 0, 0.004])), pinging=draw(st.booleans()))


class SSEEnv:
    def __init__(self, plain: str, pinging: str, gws: list, fake: Playing,
                 http: aiohttp.ClientSession) -> None:
        self.plain, self.pinging, self.gws, self.fake, self.http = plain, pinging, gws, fake, http
        self.stats: dict[str, int] = {}

    def __repr__(self) -> str:
        return "SSEEnv"


@pytest.fixture
async def sse_env(gateway, serve_app, http):
    fake = Playing()
    url = await serve_app(FakeEngine(script=fake, die_on_overlap=False).app())
    backends = [{"name": "primary", "url": url, "slots": 1}]
    plain, app1 = await gateway({"backends": backends, "gateway": {"health_interval_seconds": 0.05}})
    pinging, app2 = await gateway({"backends": backends, "gateway": {"health_interval_seconds": 0.05,
                                                                      "ping_interval_seconds": 0.002}})
    env = SSEEnv(plain, pinging, [app1[GATEWAY], app2[GATEWAY]], fake, http)
    yield env
    print("SSE fuzz outcomes:", dict(sorted(env.stats.items())))


def same_block(client: Blk, upstream: Blk, requested: str) -> bool:
    """Byte for byte, except message_start whose model is the client's (and only then rewritten)."""
    if upstream.event == "message_start":
        data = json_or_none(upstream.data)
        msg = data.get("message") if isinstance(data, dict) else None
        if isinstance(msg, dict) and msg.get("model") != requested:
            msg["model"] = requested
            return client.event == "message_start" and json_or_none(client.data) == data
    return client.raw == upstream.raw


def stop_point(blocks: list[Blk]) -> tuple[str, int]:
    """Where a relay must stop in these upstream blocks: (why, index of that block)."""
    for i, b in enumerate(blocks):
        if b.event is None:
            continue
        if not isinstance(json_or_none(b.data), dict):
            return "problem", i
        if b.event in TERMINAL:
            return b.event, i
    return "eof", len(blocks)


async def run_script(env: SSEEnv, s: Script) -> tuple[int, Any, bytes]:
    env.fake.script, env.fake.attempts = s, 0
    base = env.pinging if s.pinging else env.plain
    body = {"model": s.requested, "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with asyncio.timeout(REQUEST_TIMEOUT):
        async with env.http.post(base + "/v1/messages", json=body) as r:
            return r.status, r.headers, await r.read()


def check_stream(s: Script, status: int, headers, raw: bytes, attempts: int) -> str:
    upstream, _ = sse_blocks(s.sent)
    why, stop = stop_point(upstream)
    # What the relay must forward before it stops, and whether it stops with the backend's terminal.
    sends_events = any(b.event is not None for b in upstream[:stop])
    assert 1 <= attempts <= 3, attempts
    if not s.abrupt and (sends_events or why != "eof"):
        assert attempts == 1, "sent again after answer bytes had reached the client"
    if not s.abrupt and not sends_events and why == "eof":
        assert attempts == 3, "a stream that ended before its first event is sent again, twice"
    if status != 200:
        # Only before any event could reach the client: the error is an HTTP status, Anthropic-shaped.
        etype = assert_envelope(raw, headers)["error"]["type"]
        assert (status, etype) in ((502, "api_error"), (529, "overloaded_error")), (status, etype)
        assert s.abrupt or not sends_events, "an HTTP error where the answer had begun"
        return f"{status} {etype}"
    assert headers.get("Content-Type", "").startswith("text/event-stream"), headers
    rest = raw
    while rest.startswith(PING):
        rest = rest[len(PING):]
    if not s.pinging:
        assert rest == raw, "a keep-alive ping from a gateway that pings every 10 s"
    client, tail = sse_blocks(rest)
    assert tail == b"", f"unfinished SSE block at the end: {tail[-200:]!r}"
    last = assert_one_terminal_last(client)
    n = len(client) - 1
    if attempts == 1:
        for i, (c, u) in enumerate(zip(client[:n], upstream)):
            assert same_block(c, u, s.requested), f"block {i}: {c.raw[:300]!r} != {u.raw[:300]!r}"
        assert n <= stop, "forwarded past where the stream had to stop"
    else:
        # Earlier sends failed before their first event: only their comment blocks may have gone out.
        got = [(b.event, json_or_none(b.data)) for b in client[:n] if b.event is not None]
        want = [(b.event, json_or_none(b.data)) for b in upstream[:stop] if b.event is not None][:len(got)]
        for g, w in zip(got, want):
            if w[0] == "message_start":
                w[1]["message"]["model"] = s.requested
        assert got == want
    if last.event == "message_stop":
        assert why == "message_stop" and n == stop, "message_stop passed on for a broken stream"
        assert same_block(last, upstream[stop], s.requested) and attempts == 1
        return "200 message_stop"
    err = assert_anthropic_error_event(last)
    if not s.abrupt and attempts == 1:
        assert n == stop, f"{n} blocks forwarded before the error, expected {stop}"
    if why == "error" and n == stop:
        upstream_err = json_or_none(upstream[stop].data)
        if isinstance(upstream_err.get("error"), dict) and upstream_err.get("type") == "error":
            assert last.raw == upstream[stop].raw  # already Anthropic-shaped: passed on as it is
    elif why == "problem" and n == stop:
        assert err["error"]["type"] == "api_error", err
    elif not s.abrupt:
        assert err["error"]["type"] == "overloaded_error", err
    return f"200 error after {why}"


async def fuzz_one_stream(env: SSEEnv, s: Script) -> None:
    # Self-check of the generator: the framing parses back to the events it was built from.
    parsed, tail = sse_blocks(s.full)
    assert tail == b""
    assert [(b.event, b.data if d == "<bad>" else json.loads(b.data)) for b, (_, d)
            in zip([b for b in parsed if b.event], s.intended)] == [(e, d if d != "<bad>" else b.data) for (e, d), b
                                                                     in zip(s.intended, [b for b in parsed if b.event])]
    assert len([b for b in parsed if b.event]) == len(s.intended)
    note(f"variant={s.variant} pinging={s.pinging} abrupt={s.abrupt} requested={s.requested!r}")
    note(f"sent ({len(s.sent)} bytes in {len(s.chunks)} chunks): {s.sent!r}")
    (status, headers, raw), worst = await with_health_probes(env.http, env.plain, run_script(env, s))
    note(f"client got {status}: {raw!r}; attempts={env.fake.attempts}")
    label = check_stream(s, status, headers, raw, env.fake.attempts)
    key = f"{s.variant}{' abrupt' if s.abrupt else ''}: {label}"
    env.stats[key] = env.stats.get(key, 0) + 1
    for gw in env.gws:
        await until_free(gw)

    async def again() -> float:
        return (await with_health_probes(env.http, env.plain, run_script(env, s)))[1]

    await assert_responsive(worst, again, "this stream")
    for gw in env.gws:
        await until_free(gw)


@fuzz_settings(150)
@given(s=scripts(("ok",)))
async def test_fuzz_sse_framing_is_passed_through(sse_env, s):
    await fuzz_one_stream(sse_env, s)


@fuzz_settings(150)
@given(s=scripts(("bad_data", "truncate", "truncate", "no_stop", "upstream_error")))
async def test_fuzz_broken_upstream_streams_end_in_one_error(sse_env, s):
    await fuzz_one_stream(sse_env, s)


# ---- bugs found by the fuzzing: minimal reproductions -------------------------------------------------

MAIN = {"model": "big-model", "max_tokens": 50, "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
async def bug_env(gateway, serve_app, http):
    fake = FakeEngine(die_on_overlap=False, answer_model="/models/fake-model.gguf", parts=2)
    url = await serve_app(fake.app())
    base, app = await gateway({"backends": [{"name": "primary", "url": url}]})
    return BodyEnv(base, app[GATEWAY], fake, http)


async def post_raw(env: BodyEnv, path: str, data: bytes, **headers: str) -> tuple[int, Any, bytes]:
    async with asyncio.timeout(REQUEST_TIMEOUT):
        async with env.http.post(env.base + path, data=data,
                                 headers={"Content-Type": "application/json", **headers}) as r:
            return r.status, r.headers, await r.read()


def title_request(schema: dict, text: str = "fix the login bug", stream: bool = False) -> dict:
    return {"model": "claude-haiku-4-5", "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
            "output_config": {"format": {"type": "json_schema", "schema": schema}}}


# Found by this fuzzing (fixed): a JSON string holding a lone surrogate ("\ud800", valid JSON, accepted by the gateway's
# parser) makes the gateway answer 500 "internal gateway error": counting.{_prepare,content_key}
# (count_tokens, count probes), routing.forwarded_body (billing line dropped, max_tokens clamped) and
# request/forward.py (the model name set back in a non-streaming answer) encode it with
# json.dumps(ensure_ascii=False).encode(), which raises UnicodeEncodeError. Expected: a 400 from
# check_request, as llama-server itself answers such a body ("surrogate U+D800..U+DBFF must be
# followed by U+DC00..U+DFFF"), or at least not a 500.
@pytest.mark.parametrize("path,data", [
    ("/v1/messages/count_tokens", rb'{"model":"m","messages":[{"role":"user","content":"\ud800"}]}'),
    ("/v1/messages", rb'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}],'
                     rb'"system":[{"type":"text","text":"x-anthropic-billing-header: cc_version=1;"},'
                     rb'{"type":"text","text":"\ud800"}]}'),
    ("/v1/messages", rb'{"model":"\ud800","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'),
], ids=["count_tokens", "billing-line-rewrite", "model-rename"])
async def test_lone_surrogate_is_not_a_500(bug_env, path, data):
    status, headers, raw = await post_raw(bug_env, path, data)
    assert status in (200, 400), (status, raw)


# Found by this fuzzing (fixed): a body whose Content-Encoding (gzip, deflate) does not match its bytes is a 500 "internal
# gateway error": aiohttp raises web_protocol.RequestPayloadError (not an HttpProcessingError) from
# request.content.readany(), which bodies.read_body does not catch. Expected: 400.
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_request_is_refused(bug_env, encoding):
    status, headers, raw = await post_raw(bug_env, "/v1/messages", json.dumps(MAIN).encode(),
                                          **{"Content-Encoding": encoding})
    assert status == 415, (status, raw)  # no compressed request is taken
    assert_envelope(raw, headers)


# Found by this fuzzing (fixed): a synthetic answer was not bounded by the size of what it repeats. synthetic.instance_of
# charges its 64 KB budget one character per value, but a const or enum value, or the title, is
# copied whole, minItems times: a 1 KB title request makes a multi-megabyte answer (40 MB for
# const "y" * 2000; a 30 MB body, within max_body_bytes, makes gigabytes), built and serialised on the
# event loop. The title itself (make_title) is unbounded too: a 300 KB word makes a 300 KB title.
@pytest.mark.parametrize("items", [{"const": "y" * 200}, {"enum": ["y" * 200]}, {"type": "string"}],
                         ids=["const", "enum", "title"])
async def test_synthetic_answer_is_bounded(bug_env, items):
    schema = {"type": "object", "properties": {"title": {"type": "string"},
                                               "x": {"type": "array", "minItems": 20000, "items": items}}}
    body = title_request(schema, text="Refactor the authentication middleware thoroughly")
    status, headers, raw = await post_raw(bug_env, "/v1/messages", json.dumps(body).encode())
    assert bug_env.fake.requests == []  # answered by the gateway itself
    assert status == 400 or len(raw) < SYNTHETIC_LIMIT, f"{status}: a {len(raw)}-byte answer to a " \
                                                        f"{len(json.dumps(body))}-byte request"


# Found by this fuzzing (fixed): synthetic.user_words searched the user's text with <session>(.*?)</session> (re.S), which is
# quadratic in the number of "<session>" without a closing tag: a 60 KB title request holding
# "<session>" 7000 times blocks the event loop for seconds (every other client, /health included,
# waits), and a 1 MB one for minutes. Expected: a linear search (find the tag, then str.find the end).
async def test_session_tag_search_is_linear(bug_env):
    body = title_request({"type": "object", "properties": {"title": {"type": "string"}}},
                         text="<session>" * 7000)
    (status, headers, raw), worst = await with_health_probes(
        bug_env.http, bug_env.base, post_raw(bug_env, "/v1/messages", json.dumps(body).encode()))
    assert status == 200
    assert worst < HEALTH_LATENCY, f"the event loop stood still {worst:.2f}s while one title request was answered"


# Found by this fuzzing (fixed): a small gzip body that inflates to gigabytes blocks every client for seconds. The gateway
# accepts "Content-Encoding: gzip" on requests and aiohttp inflates it in its protocol callback, on
# the event loop. read_body's 413 comes at 32 MB (gateway.max_body_bytes), but aiohttp then goes on
# reading, and inflating, what the client had already sent, before it closes the connection. Here
# 2 MB inflating to 2 GB stops the event loop ~2.2 s in all, 1-1.3 s at a stretch, on 2 cores (the
# same body sent by curl: GET /health waits ~2.5 s).
# Expected: refuse a Content-Encoding on requests (Claude Code sends none), or close at the 413.
async def test_gzip_bomb_is_refused_before_inflating(bug_env):
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = c.compress(b'{"model":"m","messages":[],"pad":"') + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(b"a" * (1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)  # the same bytes each time after a full flush
    bomb = head + block * 2000  # 2 MB inflating to 2 GB (no gzip trailer: never reached)

    async def send_all_at_once() -> bytes:
        # Like curl: the whole body is written without waiting for the answer.
        host, port = bug_env.base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"POST /v1/messages/count_tokens HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                         f"\r\nContent-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n".encode() + bomb)
            async with asyncio.timeout(30):
                await writer.drain()
                answer = await reader.readuntil(b"\r\n\r\n")
                with contextlib.suppress(ConnectionError):
                    await reader.read()  # the connection stays open until the gateway closes it, as with curl
                return answer
        finally:
            writer.close()

    head_raw, worst = await with_health_probes(bug_env.http, bug_env.base, send_all_at_once())
    assert head_raw.startswith(b"HTTP/1.1 415"), head_raw  # refused before any byte is inflated
    assert worst < HEALTH_LATENCY, f"the event loop stood still {worst:.2f}s while one {len(bomb)}-byte " \
                                   f"request was refused"


# Found by this fuzzing (fixed): a body in UTF-16 or UTF-32 (json.loads detects the encoding of bytes) passes the
# gateway's checks and is forwarded as it is, taking the main slot, to a backend that reads UTF-8
# JSON only (RFC 8259 8.1; llama-server answers 400 "parse error ... invalid literal"); the client
# gets the backend's error. Expected: a 400 before any slot.
async def test_utf16_body_is_refused(bug_env):
    status, headers, raw = await post_raw(bug_env, "/v1/messages", json.dumps(MAIN).encode("utf-16"))
    assert bug_env.fake.not_utf8 == [] and status == 400, (status, raw)
