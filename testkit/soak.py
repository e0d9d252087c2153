"""The soak's traffic (tests/real/test_soak.py): Claude Code's real request shapes varied the way a session
varies them, some given up on at a random moment, and the judge of one answer: complete, an Anthropic-shaped
error, or a disconnect the client itself caused, else what was wrong with it."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
from dataclasses import dataclass

import aiohttp

from orchestrator.sse import SSEParser

from .client import sample

REQUEST_BOUND = 120.0        # no request may take longer, however long it queued
ABORT_PROBABILITY = 0.2
MAIN_MODEL = "claude-sonnet-4-5-soak"   # not a background name: routed to the primary backend


# ---- requests as Claude Code sends them ---------------------------------------------------------

@dataclass
class Req:
    kind: str
    path: str
    body: dict
    abort_after: float | None = None

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True


@dataclass
class Result:
    kind: str
    outcome: str                # complete, error, aborted, or a failure: hang, broken, malformed
    status: int | None = None
    gateway_status: str = ""    # the status label the gateway should count it under
    error_type: str = ""
    detail: str = ""
    seconds: float = 0.0
    abort_after: float | None = None


class Shapes:
    """Real captured request bodies, varied per request the way a session varies them."""

    def __init__(self) -> None:
        main = copy.deepcopy(sample("main-2.1.332.json")["body"])
        main["model"] = MAIN_MODEL
        main["tools"] = main["tools"][:3]   # SmolLM2's context; the shape is the same
        self.main = main
        self.title = sample("title-2.1.332.json")["body"]
        self.topic = sample("topic-2.0.77.json")["body"]
        self.warmup = sample("warmup-2.0.77.json")["body"]
        self.probe = sample("count-probe-2.1.197.json")["body"]
        self.count = sample("count_tokens-2.1.197.json")["body"]
        self.n = 0

    def make(self, kind: str, rng: random.Random, history: list) -> Req:
        self.n += 1
        n = self.n
        if kind in ("main", "main_json"):
            body = copy.deepcopy(self.main)
            # The billing line changes on every request (the gateway drops it).
            body["system"][0]["text"] = f"x-anthropic-billing-header: cc_version=2.1.332.{n:03x}; cc_entrypoint=cli;"
            body["messages"] = copy.deepcopy(history) + [{"role": "user", "content": [
                *(self.main["messages"][0]["content"][:-1] if not history else []),
                {"type": "text", "text": f"Request {n}: {rng.choice(PROMPTS)}"}]}]
            # Small, or Claude Code's own 32000 that the backend's max_output_tokens clamps.
            body["max_tokens"] = rng.choice([4, 8, 16, 32000])
            body["stream"] = kind == "main"
            return Req(kind, "/v1/messages?beta=true", body)
        if kind == "count_tokens":
            body = copy.deepcopy(self.count)
            body["messages"] = [{"role": "user", "content": f"{rng.choice(PROMPTS)} ({n % 7})"}]
            return Req(kind, "/v1/messages/count_tokens?beta=true", body)
        if kind in ("title", "title_json"):
            body = copy.deepcopy(self.title)
            body["stream"] = kind == "title"
            return Req(kind, "/v1/messages?beta=true", body)
        if kind in ("topic", "topic_json"):
            body = copy.deepcopy(self.topic)
            body["messages"][0]["content"][0]["text"] = rng.choice(PROMPTS)
            body["stream"] = kind == "topic"
            return Req(kind, "/v1/messages?beta=true", body)
        if kind == "warmup":
            return Req(kind, "/v1/messages?beta=true", copy.deepcopy(self.warmup))
        if kind == "probe":
            return Req(kind, "/v1/messages?beta=true", copy.deepcopy(self.probe))
        raise ValueError(kind)


PROMPTS = ["write a python function that reverses a string", "fix the failing test in tests/test_api.py",
           "explain what this repository does", "add a --verbose flag to the CLI",
           "why does the build fail on macOS?", "rename the class Foo to Bar everywhere"]


def give_up_after(rng: random.Random) -> float | None:
    """When the client will give up on a request, or None: some at once (before or while the
    gateway reads the body), some while queued, some mid-stream."""
    if rng.random() >= ABORT_PROBABILITY:
        return None
    return rng.choice([rng.uniform(0.0, 0.02), rng.uniform(0.02, 0.5), rng.uniform(0.5, 4.0)])


# ---- one request, judged ------------------------------------------------------------------------

def _envelope(raw: bytes) -> dict | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("type") != "error":
        return None
    err = data.get("error")
    ok = isinstance(err, dict) and isinstance(err.get("type"), str) and isinstance(err.get("message"), str)
    return err if ok else None


def judge(req: Req, status: int, ctype: str, raw: bytes) -> Result:
    r = Result(req.kind, "malformed", status=status)
    if status != 200:
        err = _envelope(raw)
        if err is None:
            r.detail = f"HTTP {status} without an Anthropic error envelope: {raw[:300]!r}"
            return r
        r.outcome, r.gateway_status, r.error_type = "error", str(status), err["type"]
        r.detail = err["message"][:200]
        return r
    if req.stream:
        if ctype != "text/event-stream":
            r.detail = f"a streaming request answered 200 with {ctype!r}: {raw[:300]!r}"
            return r
        parser = SSEParser(max_event_bytes=len(raw) + 1)
        blocks = parser.feed(raw, eof=True)
        evs = [b.event for b in blocks if b.event is not None]
        names = [e.event for e in evs]
        terminal = [i for i, e in enumerate(names) if e in ("message_stop", "error")]
        if parser.pending:
            r.detail = f"stream ends inside an event: {raw[-300:]!r}"
        elif len(terminal) != 1:
            r.detail = f"{len(terminal)} terminal events: {names}"
        elif terminal[0] != len(evs) - 1:
            r.detail = f"events after the terminal one: {names}"
        elif names.count("message_start") > 1:
            r.detail = f"two generations in one answer: {names}"
        elif names[-1] == "message_stop":
            first = next((e for e in evs if e.event != "ping"), None)
            start = first.json() if first is not None and first.event == "message_start" else None
            if not isinstance(start, dict) or not isinstance(start.get("message"), dict):
                r.detail = f"stream does not begin with message_start: {names}"
            elif req.kind == "main" and start["message"].get("model") != MAIN_MODEL:
                r.detail = f"message_start names model {start['message'].get('model')!r}"
            else:
                r.outcome, r.gateway_status = "complete", "200"
        else:
            data = evs[-1].json()
            err = data.get("error") if isinstance(data, dict) else None
            if not (isinstance(data, dict) and data.get("type") == "error" and isinstance(err, dict)
                    and isinstance(err.get("type"), str) and isinstance(err.get("message"), str)):
                r.detail = f"error event that is not Anthropic-shaped: {evs[-1].data[:300]!r}"
            else:
                r.outcome, r.gateway_status, r.error_type = "error", "stream_error", err["type"]
                r.detail = err["message"][:200]
        return r
    try:
        data = json.loads(raw)
    except ValueError:
        r.detail = f"200 that is not JSON: {raw[:300]!r}"
        return r
    if req.kind == "count_tokens":
        ok = isinstance(data, dict) and isinstance(data.get("input_tokens"), int) and data["input_tokens"] > 0
    else:
        ok = (isinstance(data, dict) and data.get("type") == "message" and isinstance(data.get("content"), list)
              and data.get("stop_reason") in ("end_turn", "max_tokens", "stop_sequence", "tool_use"))
        ok = ok and (req.kind != "main_json" or data.get("model") == MAIN_MODEL)
    if not ok:
        r.detail = f"200 that is not a whole answer: {raw[:300]!r}"
        return r
    r.outcome, r.gateway_status = "complete", "200"
    return r


async def _exchange(session: aiohttp.ClientSession, url: str, req: Req) -> Result:
    t0 = time.monotonic()
    try:
        async with session.post(url + req.path, json=req.body) as resp:
            try:
                buf = bytearray()
                async for chunk in resp.content.iter_any():
                    buf += chunk
            except BaseException:
                resp.close()    # a client that leaves closes its connection
                raise
            result = judge(req, resp.status, resp.headers.get("Content-Type", "").split(";")[0].strip(),
                           bytes(buf))
    except (aiohttp.ClientError, OSError) as e:
        # The gateway closed or broke the connection under the client: never acceptable.
        result = Result(req.kind, "broken", detail=f"{e.__class__.__name__}: {e}")
    result.seconds = time.monotonic() - t0
    return result


async def send(session: aiohttp.ClientSession, url: str, req: Req) -> Result:
    """Send one request; give up on it at `abort_after` (the client's own disconnect), and call
    it a hang past REQUEST_BOUND."""
    task = asyncio.create_task(_exchange(session, url, req))
    limit = REQUEST_BOUND if req.abort_after is None else min(req.abort_after, REQUEST_BOUND)
    t0 = time.monotonic()
    done, _ = await asyncio.wait({task}, timeout=limit)
    if not done:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            outcome = "aborted" if req.abort_after is not None and req.abort_after < REQUEST_BOUND else "hang"
            return Result(req.kind, outcome, abort_after=req.abort_after, seconds=time.monotonic() - t0,
                          detail=f"gave up after {limit:.2f}s")
    result = task.result()
    result.abort_after = req.abort_after
    return result
