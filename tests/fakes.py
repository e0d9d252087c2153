"""A fake upstream for what a real llama-server cannot do on demand: crash at a
chosen byte, crash when two generations overlap, stall, answer OpenAI-shaped errors."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from aiohttp import web

from orchestrator import sse


def sse_message(text_parts: list[str], model: str = "fake-model", input_tokens: int = 10,
                stop_reason: str = "end_turn") -> list[bytes]:
    """A complete Anthropic SSE answer, one bytes object per event."""
    msg = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [],
           "stop_reason": None, "stop_sequence": None,
           "usage": {"input_tokens": input_tokens, "output_tokens": 0, "cache_read_input_tokens": 3}}
    out = [sse.encode("message_start", {"type": "message_start", "message": msg}),
           sse.encode("content_block_start", {"type": "content_block_start", "index": 0,
                                              "content_block": {"type": "text", "text": ""}})]
    for t in text_parts:
        out.append(sse.encode("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                      "delta": {"type": "text_delta", "text": t}}))
    out += [sse.encode("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse.encode("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason,
                                                                            "stop_sequence": None},
                                         "usage": {"output_tokens": len(text_parts)}}),
            sse.encode("message_stop", {"type": "message_stop"})]
    return out


def knob(request: web.Request, body: dict, name: str, default):
    """A per-request behaviour: `metadata.x_fake_NAME` in the body (the gateway forwards the body as
    it is, but not a client's own headers), else an `x-fake-NAME` header sent to the fake directly."""
    meta = body.get("metadata") if isinstance(body, dict) and isinstance(body.get("metadata"), dict) else {}
    return meta.get(f"x_fake_{name}", request.headers.get(f"x-fake-{name}", default))


@dataclass
class FakeUpstream:
    """Behaviour knobs; tests flip them between requests."""

    mode: str = "ok"              # ok | die_midstream | stall | error500 | error400 | close_before_answer
    chunk_delay: float = 0.0      # seconds between SSE events
    parts: int = 5
    die_on_overlap: bool = True   # like a big model on Metal/CUDA: more generations than slots crash it
    capacity: int = 1             # its slots (llama-server's --parallel)
    prefill_delay: float = 0.0    # before the first byte
    count_delay: float = 0.0
    fail_next: int = 0            # close the connection before answering, this many times
    in_flight: int = 0
    max_in_flight: int = 0
    crashed: bool = False
    requests: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    generations_started: int = 0
    generations_finished: int = 0
    cancelled: int = 0
    count_calls: int = 0
    answer_model: str | None = None  # None: echo the request's model
    slots_endpoint: bool = True   # answer GET /slots like llama-server
    slots_headers: list[dict] = field(default_factory=list)
    count_headers: list[dict] = field(default_factory=list)
    # Like llama-server, notice a vanished client only this long after it left:
    # the generation goes on (and counts as in flight) meanwhile.
    linger: float = 0.0
    # /v1/chat/completions (llama-server's OpenAI endpoint, where a JSON schema is enforced):
    # this text, else the smallest value valid against the request's schema.
    chat_answer: str | None = None
    chat_finish: str = "stop"

    def app(self) -> web.Application:
        # Claude Code's bodies reach tens of MB in a long session; llama-server takes up to 100 MB.
        app = web.Application(client_max_size=100 * 1024 * 1024)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/health", self.health)
        app.router.add_get("/slots", self.slots)
        return app

    async def slots(self, request: web.Request) -> web.Response:
        if not self.slots_endpoint:
            return web.json_response({"error": {"code": 501, "message": "This server does not support slots"}},
                                     status=501)
        self.slots_headers.append(dict(request.headers))
        return web.json_response([{"id": i, "is_processing": i < self.in_flight} for i in range(self.capacity)])

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def count_tokens(self, request: web.Request) -> web.Response:
        self.count_calls += 1
        self.count_headers.append(dict(request.headers))
        body = await request.json()
        await asyncio.sleep(self.count_delay)
        return web.json_response({"input_tokens": 1000 + len(json.dumps(body.get("messages")))})

    async def chat_completions(self, request: web.Request) -> web.Response:
        from orchestrator.request.synthetic import instance_of

        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.paths.append(request.path_qs)
        mode = knob(request, body, "mode", self.mode)
        if mode == "error500":
            return web.json_response({"error": {"code": 500, "message": "boom", "type": "server_error"}},
                                     status=500)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.generations_started += 1
        try:
            await asyncio.sleep(self.prefill_delay)
            if mode == "stall":
                await asyncio.sleep(3600)
            schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema")
            text = self.chat_answer if self.chat_answer is not None else json.dumps(instance_of(schema, "Fake title"))
            self.generations_finished += 1
            return web.json_response({
                "id": "chatcmpl-fake", "object": "chat.completion", "model": "fake",
                "choices": [{"index": 0, "finish_reason": self.chat_finish,
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49}})
        except asyncio.CancelledError:
            self.cancelled += 1
            await asyncio.shield(asyncio.sleep(float(knob(request, body, "linger", self.linger))))
            raise
        finally:
            self.in_flight -= 1

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.paths.append(request.path_qs)
        mode = knob(request, body, "mode", self.mode)
        if self.fail_next > 0:
            self.fail_next -= 1
            request.transport.close()
            return web.Response()
        if mode == "error500":
            return web.json_response({"error": {"code": 500, "message": "boom", "type": "server_error"}},
                                     status=500)
        if mode == "error400":
            return web.json_response({"error": {"code": 400, "message": "bad thing",
                                                "type": "invalid_request_error"}}, status=400)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.generations_started += 1
        try:
            if self.in_flight > self.capacity and self.die_on_overlap:
                self.crashed = True
            if self.crashed:
                request.transport.close()
                return web.Response()
            await asyncio.sleep(self.prefill_delay)
            if mode == "stall":
                await asyncio.sleep(3600)
            model = self.answer_model or body.get("model", "")
            stop = str(knob(request, body, "stop_reason", "end_turn"))
            events = sse_message([f"w{i} " for i in range(self.parts)], model=model, stop_reason=stop)
            if not body.get("stream"):
                await asyncio.sleep(self.chunk_delay * self.parts)
                self.generations_finished += 1
                return web.json_response({
                    "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": "".join(f"w{i} " for i in range(self.parts))}],
                    "stop_reason": stop, "stop_sequence": None,
                    "usage": {"input_tokens": 10, "output_tokens": self.parts, "cache_read_input_tokens": 3}})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i, ev in enumerate(events):
                if mode == "die_midstream" and i == 3:
                    await resp.write(ev[: len(ev) // 2])
                    request.transport.close()
                    return resp
                await resp.write(ev)
                await asyncio.sleep(self.chunk_delay)
            await resp.write_eof()
            self.generations_finished += 1
            return resp
        except asyncio.CancelledError:
            self.cancelled += 1
            await asyncio.shield(asyncio.sleep(float(knob(request, body, "linger", self.linger))))
            raise
        except ConnectionError:
            self.cancelled += 1
            await asyncio.sleep(float(knob(request, body, "linger", self.linger)))
            raise
        finally:
            self.in_flight -= 1
