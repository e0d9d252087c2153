"""A pass-through in front of a real llama-server, for what a small model cannot do itself.

It forwards everything (/v1/messages, /slots and its save and restore POSTs, /props, /health,
/metrics) to the real server byte for byte, and records every /v1/messages turn: the body the server
got, the answer's bytes as they came (aiohttp undoes only the chunked transfer coding) and the usage
the client got, so a test sees each conversation's turns without the gateway's insides. Two ways to
play what SmolLM2 cannot:

- `script`: SmolLM2 never calls Claude Code's `Agent` tool, so a session with agents needs someone to
  make the calls for it; a fake model would, but then nobody's cache is real. A turn the script
  answers is first sent to the real server as it came (its prompt, non-streaming, one token of
  answer), so the slot holds that prompt exactly as if the server had answered it, and the server's
  own usage (prompt tokens, read from cache) goes back to the client with the scripted blocks.
- `rewrite`: each line of an answer changed on its way (a "max_tokens" stop given as "tool_use",
  for a tool loop SmolLM2 cannot run).
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

from .sse import message_events

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
    answer: bytes = field(default=b"", repr=False)

    @property
    def prompt(self) -> int:
        return self.input_tokens + self.cached


class Proxy:
    def __init__(self, upstream: str, script: Script | None = None,
                 rewrite: Callable[[bytes], bytes] | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.script = script
        self.rewrite = rewrite
        self.turns: list[ProxyTurn] = []
        self._http: aiohttp.ClientSession | None = None

    @property
    def exchanges(self) -> list[tuple[dict, bytes]]:
        """Each /v1/messages turn: the body the server got and its answer's bytes."""
        return [(t.body, t.answer) for t in self.turns]

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
        turn = None
        if request.method == "POST" and request.path == "/v1/messages":
            body = json.loads(raw)
            blocks = self.script(body) if self.script is not None else None
            if blocks is not None:
                return await self._scripted(request, body, blocks)
            turn = ProxyTurn(body, scripted=False)
            self.turns.append(turn)
        try:
            return await self._forward(request, raw, turn)
        except aiohttp.ClientConnectorError as e:
            # The server is not up yet (the gateway's first health checks): what a dead server gives.
            return web.Response(status=502, text=f"proxy: {e}")

    async def _forward(self, request: web.Request, raw: bytes, turn: ProxyTurn | None) -> web.StreamResponse:
        async with passed_on(self.http, request, self.upstream + request.path_qs, raw) as (up, resp):
            parser = sse.SSEParser()
            got = bytearray()
            chunks = up.content if self.rewrite is not None else up.content.iter_any()
            async for chunk in chunks:
                if self.rewrite is not None:
                    chunk = self.rewrite(chunk)
                await resp.write(chunk)
                if turn is None:
                    continue
                got += chunk
                if up.content_type == "text/event-stream":
                    for block in parser.feed(chunk):
                        if block.event is not None and block.event.event in ("message_start", "message_delta"):
                            _take_usage(turn, block.event.json())
            if turn is not None:
                turn.status, turn.answer = up.status, bytes(got)
                if got and up.content_type != "text/event-stream":
                    _take_usage(turn, {"message": json.loads(got)})
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
                 "cache_creation_input_tokens": 0}
        out = message.get("usage", {}).get("output_tokens", 1)
        payload = b"".join(message_events(blocks, model=body.get("model", "?"), usage={**usage, "output_tokens": out},
                                          output_tokens=out, message_id="msg_scripted"))
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
