"""Property-based fuzzing (hypothesis) of the real gateway app against a fake upstream: its SSE framing.

A valid Anthropic event sequence re-framed (LF, CRLF, CR or mixed line endings, comment lines and
comment-only blocks, id:/retry:/unknown fields, "data:" with or without its space, JSON split over several
data lines, random chunking down to single bytes, tiny delays, trailing bytes after message_stop) reaches
the client byte for byte, except message_start, whose model is set to the client's. Broken streams (an
event whose data is not a JSON object, a cut at any byte ended cleanly or by a reset, no message_stop, the
backend's own error event) reach the client as a well-formed SSE stream with exactly one terminal event,
an Anthropic-shaped `error`, last, or as an Anthropic-shaped 502/529 when nothing of the answer could be
sent yet; the slot is free afterwards. Half the examples run through a gateway sending keep-alive pings
every 2 ms, which may only precede the backend's bytes.

FUZZ_SCALE=5 in the environment runs five times as many examples.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from orchestrator.backends.gateway import GATEWAY
from testkit.engine import FakeEngine, Reply
from testkit.fuzz import (REQUEST_TIMEOUT, TERMINAL, Blk, assert_anthropic_error_event, assert_envelope,
                          assert_one_terminal_last, assert_responsive, fuzz_settings, json_or_none, one_in,
                          sse_blocks, until_free, with_health_probes)

# The failing examples' bodies are large; hypothesis says so each time.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
# The gateway's keep-alive ping, as Claude Code receives it.
PING = b'event: ping\ndata: {"type":"ping"}\n\n'


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
