"""A scripting pass-through in front of a real llama-server: the turns a small model cannot play.

SmolLM2 never calls Claude Code's `Agent` tool, so a session with agents needs someone to make the
calls for it; a fake model would, but then nobody's cache is real. This proxy forwards everything
(/v1/messages, /slots and its save and restore POSTs, /props, /health, /metrics) to the real server
byte for byte, except the /v1/messages turns `script` chooses to answer. Such a turn is first sent
to the real server as it came (its prompt, non-streaming, one token of answer), so the slot holds
that prompt exactly as if the server had answered it, and the server's own usage (prompt tokens,
read from cache) goes back to the client with the scripted tool calls.

Every /v1/messages turn is recorded with the usage the client got, so a test can see each
conversation's turns without the gateway's insides.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Callable

import aiohttp
from aiohttp import web

from orchestrator import sse

# Hop-by-hop headers and the ones aiohttp sets itself: everything else passes as it came.
_DROP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}

@contextlib.asynccontextmanager
async def passed_on(http: aiohttp.ClientSession, request: web.Request, url: str,
                    raw: bytes) -> AsyncIterator[tuple[aiohttp.ClientResponse, web.StreamResponse]]:
    """`request` (its body `raw`) sent on to `url` as it came: the upstream's response, and the
    client's, prepared with the upstream's status and headers, ended when the block ends."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
    async with http.request(request.method, url, data=raw, headers=headers) as up:
        resp = web.StreamResponse(status=up.status, headers={k: v for k, v in up.headers.items()
                                                             if k.lower() not in _DROP})
        await resp.prepare(request)
        yield up, resp
        await resp.write_eof()


# The script: given a request body, the content blocks to answer with (tool_use or text), or None to
# let the real server answer.
Script = Callable[[dict], "list[dict] | None"]


@dataclass
class ProxyTurn:
    body: dict = field(repr=False)
    scripted: bool
    input_tokens: int = 0
    cached: int = 0
    status: int = 0

    @property
    def prompt(self) -> int:
        return self.input_tokens + self.cached


class ScriptedProxy:
    def __init__(self, upstream: str, script: Script) -> None:
        self.upstream = upstream.rstrip("/")
        self.script = script
        self.turns: list[ProxyTurn] = []
        self._http: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        if self._http is not None:
            await self._http.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            # No total timeout: a cold prefill of a long prompt on a shared 2-core machine takes a while.
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None),
                                               auto_decompress=False)
        return self._http

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if request.method == "POST" and request.path == "/v1/messages":
            body = json.loads(raw)
            blocks = self.script(body)
            if blocks is not None:
                return await self._scripted(request, body, blocks)
            turn = ProxyTurn(body, scripted=False)
            self.turns.append(turn)
            return await self._forward(request, raw, turn)
        return await self._forward(request, raw, None)

    async def _forward(self, request: web.Request, raw: bytes, turn: ProxyTurn | None) -> web.StreamResponse:
        async with passed_on(self.http, request, self.upstream + request.path_qs, raw) as (up, resp):
            parser = sse.SSEParser()
            whole = b""
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
                if turn is None:
                    continue
                if up.content_type == "text/event-stream":
                    for block in parser.feed(chunk):
                        if block.event is not None and block.event.event in ("message_start", "message_delta"):
                            _take_usage(turn, block.event.json())
                else:
                    whole += chunk
            if turn is not None:
                turn.status = up.status
                if whole:
                    _take_usage(turn, {"message": json.loads(whole)})
        return resp

    async def _scripted(self, request: web.Request, body: dict, blocks: list[dict]) -> web.StreamResponse:
        turn = ProxyTurn(body, scripted=True)
        self.turns.append(turn)
        # The same prompt to the real server, so its slot (and its cache figures) are what they would be.
        warm = {**body, "max_tokens": 1, "stream": False}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        async with self.http.post(self.upstream + "/v1/messages", json=warm, headers=headers) as up:
            answer = await up.read()
            if up.status != 200:  # e.g. the prompt is too long: the client gets the server's own refusal
                turn.status = up.status
                return web.Response(status=up.status, body=answer, content_type=up.content_type)
        message = json.loads(answer)
        _take_usage(turn, {"message": message})
        turn.status = 200
        usage = {"input_tokens": turn.input_tokens, "cache_read_input_tokens": turn.cached,
                 "cache_creation_input_tokens": 0, "output_tokens": message.get("usage", {}).get("output_tokens", 1)}
        stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        payload = stream(body.get("model", "?"), blocks, stop, usage)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(payload)
        await resp.write_eof()
        return resp


def _take_usage(turn: ProxyTurn, data) -> None:
    """The usage a message_start, message_delta or whole message carries."""
    if not isinstance(data, dict):
        return
    usage = (data.get("message") or {}).get("usage") if "message" in data else data.get("usage")
    if not isinstance(usage, dict):
        return
    if isinstance(usage.get("input_tokens"), int):
        turn.input_tokens = usage["input_tokens"]
    if isinstance(usage.get("cache_read_input_tokens"), int):
        turn.cached = usage["cache_read_input_tokens"]


def stream(model: str, blocks: list[dict], stop: str, usage: dict) -> bytes:
    """An Anthropic SSE answer with these blocks, the usage (prompt figures) in its message_start."""
    msg = {"id": "msg_scripted", "type": "message", "role": "assistant", "model": model, "content": [],
           "stop_reason": None, "stop_sequence": None, "usage": usage}
    out = [sse.encode("message_start", {"type": "message_start", "message": msg})]
    for i, b in enumerate(blocks):
        if b["type"] == "text":
            start, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": b["text"]}
        else:
            start = {"type": "tool_use", "id": b["id"], "name": b["name"], "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(b["input"])}
        out += [sse.encode("content_block_start", {"type": "content_block_start", "index": i, "content_block": start}),
                sse.encode("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}),
                sse.encode("content_block_stop", {"type": "content_block_stop", "index": i})]
    out += [sse.encode("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                         "usage": {"output_tokens": usage["output_tokens"]}}),
            sse.encode("message_stop", {"type": "message_stop"})]
    return b"".join(out)
