"""The one fake engine: an aiohttp app speaking what llama-server (or another Anthropic-compatible
server) speaks to the gateway, for what a real server cannot do on demand: crash when two generations
overlap or at a chosen byte, stall, refuse, answer slowly, keep generating after its client left,
send exactly the bytes a test wrote, call tools from a script. It records what it was sent.

    /v1/messages              streamed or not: "w0 w1 ..." text, a script's blocks, or a `Reply`
    /v1/messages/count_tokens its own count
    /v1/chat/completions      llama-server's OpenAI endpoint, a JSON schema's smallest instance
    /health, /slots           always; /props and /v1/models when `props` and `models` are set
    POST /slots/{id}          llama-server's slot save and restore into `folder`, when it is set
    POST /fake/gate/{op}      open or close the gate where a request with the `hold` knob waits

Per-request knobs come in the body's `metadata.x_fake_NAME` (the gateway forwards the body as it is,
but not a client's own headers), an `x-fake-NAME` header or an `x_fake_NAME` query parameter.

    python -m testkit.engine PORT    an instant fake in its own process (bench_overhead.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from . import sse

# Claude Code's bodies reach tens of MB in a long session; llama-server takes up to 100 MB.
MAX_BODY = 100 * 1024 * 1024


@dataclass
class Reply:
    """An answer given as it is: these writes in order (bytes, or a float: a pause of that many
    seconds), then the end of the response, or `close_after` seconds later a dropped connection."""

    writes: list[bytes | float]
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "text/event-stream"})
    close_after: float | None = None
    prefill: float = 0.0  # before the status line

    @classmethod
    def of_json(cls, value: Any, status: int = 200) -> Reply:
        return cls([json.dumps(value).encode()], status, {"Content-Type": "application/json"})


# Given a request's body and headers: the content blocks to answer with, a `Reply`, or None for the
# default answer.
Script = Callable[[dict, Any], "list[dict] | Reply | None"]


def knob(request: web.Request, body: Any, name: str, default):
    """A per-request behaviour: the body's metadata, else a header, else the query."""
    meta = body.get("metadata") if isinstance(body, dict) and isinstance(body.get("metadata"), dict) else {}
    return meta.get(f"x_fake_{name}", request.headers.get(f"x-fake-{name}",
                                                         request.query.get(f"x_fake_{name}", default)))


def _json_error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message, "type": kind}}, status=status)


@dataclass
class FakeEngine:
    """Behaviour knobs; tests flip them between requests."""

    mode: str = "ok"              # ok | die_midstream | stall | error500 | error400
    chunk_delay: float = 0.0      # seconds between SSE events
    parts: int = 5
    die_on_overlap: bool = True   # like a big model on Metal/CUDA: more generations than slots crash it
    capacity: int = 1             # its slots (llama-server's --parallel)
    prefill_delay: float = 0.0    # before the first byte
    count_delay: float = 0.0
    fail_next: int = 0            # close the connection before answering, this many times
    answer_model: str | None = None  # None: echo the request's model
    slots_endpoint: bool = True   # answer GET /slots like llama-server
    health_endpoint: bool = True  # False: 404 on /health, like a server without one
    # Like llama-server, notice a vanished client only this long after it left:
    # the generation goes on (and counts as in flight) meanwhile.
    linger: float = 0.0
    linger_ends: asyncio.Event | None = None  # set: every linger ends at once (else after `linger`)
    # /v1/chat/completions: this text, else the smallest value valid against the request's schema.
    chat_answer: str | None = None
    chat_finish: str = "stop"
    script: Script | None = None
    on_request: Callable[[dict], Awaitable[None]] | None = None  # awaited first, with the body
    parse_bodies: bool = True     # False: a body is read, never parsed nor kept (an instant fake for benchmarks)
    count: Callable[[dict], int] | None = None  # count_tokens' answer; default 1000 + the messages' JSON length
    props: dict | None = None     # GET /props (llama-server's), 404 when None
    models: list[dict] | None = None  # GET /v1/models' data (vLLM's, SGLang's), 404 when None
    named_only: bool = False      # like vLLM: a model name /v1/models does not list gets a 404
    metrics: str | None = None    # GET /metrics' Prometheus text (vLLM's), 404 when None
    # llama-server's slot actions, saving into `folder`; a save or restore while a generation runs
    # crashes the server, like a generation that overlaps another.
    folder: Path | None = None
    slot_tokens: int | None = None  # what GET /slots says slot 0 holds (n_prompt_tokens); None: not said
    slot_prompt: tuple[int, int] | None = None  # /slots' n_prompt_tokens_processed, _cache; None: not said
    tokens_per_turn: int | None = None  # a generation leaves the slot holding this many tokens
    save_delay: float = 0.0
    restore_delay: float = 0.0
    save_bytes: int = 1000
    n_saved: int = 123  # the tokens a save says it wrote (llama-server's n_saved: what the slot held)
    # Its answer to the identity probe (engines/fingerprint.py): the five likeliest tokens' figures.
    probe: str = "198:-0.806,33:-2.192,34:-2.773,378:-2.802,35:-3.390"
    # The size of the disk holding `folder`: a save that would not fit fails as llama-server's does on a
    # full disk (500 "Unable to save slot"), its file cut short. None: no bound.
    disk_bytes: int | None = None
    restored_tokens: int = 123
    restore_error: str = ""
    die_on: str = ""              # a slot action ("save", "restore") that closes the connection mid-way
    slot_answer_gate: asyncio.Event | None = None  # a slot action's answer waits for it, its file written
    loading: bool = False         # /health answers 503, like a server loading its model

    # What it saw and did.
    in_flight: int = 0
    max_in_flight: int = 0
    crashed: bool = False
    saving: bool = False
    calls: int = 0
    requests: list[dict] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    not_utf8: list[bytes] = field(default_factory=list)
    generations_started: int = 0
    generations_finished: int = 0
    cancelled: int = 0
    probes: int = 0  # identity probes answered
    count_calls: int = 0
    counted: list[dict] = field(default_factory=list)
    slots_headers: list[dict] = field(default_factory=list)
    count_headers: list[dict] = field(default_factory=list)
    actions: list[tuple[str, str]] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # "generate" and each slot action, as they came
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.gate.set()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/fake/gate/{op}", self.gate_control)
        if self.health_endpoint:
            app.router.add_get("/health", self.health)
        app.router.add_get("/slots", self.slots)
        if self.folder is not None:
            app.router.add_post("/slots/{id}", self.slot_action)
            app.router.add_post("/completion", self.completion)
        if self.props is not None:
            app.router.add_get("/props", self.get_props)
        if self.models is not None:
            app.router.add_get("/v1/models", self.get_models)
        if self.metrics is not None:
            app.router.add_get("/metrics", self.get_metrics)
        return app

    async def get_metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics, content_type="text/plain")

    def unknown_model(self, body: Any) -> web.Response | None:
        """vLLM's 404 for a model name it does not serve (with `named_only`)."""
        names = {m.get("id") for m in self.models or ()}
        if not self.named_only or not isinstance(body, dict) or body.get("model") in names:
            return None
        return web.json_response({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                            "type": "NotFoundError", "param": "model", "code": 404}}, status=404)

    async def get_props(self, request: web.Request) -> web.Response:
        return web.json_response(self.props)

    async def get_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self.models})

    async def _body(self, request: web.Request) -> Any:
        """Parsed like llama-server: UTF-8 whatever the Content-Type's charset, a 400 for what is not JSON."""
        raw = await request.read()
        if not self.parse_bodies:
            return {}
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            if isinstance(e, UnicodeDecodeError):
                self.not_utf8.append(raw[:200])
            raise web.HTTPBadRequest(text=json.dumps({"error": {"code": 400, "message": "invalid JSON body",
                                                                "type": "invalid_request_error"}}),
                                     content_type="application/json") from None

    async def health(self, request: web.Request) -> web.Response:
        if self.loading:
            return _json_error(503, "Loading model", "unavailable_error")
        return web.json_response({"status": "ok"})

    async def slots(self, request: web.Request) -> web.Response:
        if not self.slots_endpoint:
            return _json_error(501, "This server does not support slots", "not_supported_error")
        self.slots_headers.append(dict(request.headers))
        said = {} if self.slot_tokens is None else {"n_prompt_tokens": self.slot_tokens}
        if self.slot_prompt is not None:
            said.update(n_prompt_tokens_processed=self.slot_prompt[0], n_prompt_tokens_cache=self.slot_prompt[1])
        return web.json_response([{"id": i, "is_processing": i < self.in_flight, **said}
                                  for i in range(self.capacity)])

    async def gate_control(self, request: web.Request) -> web.Response:
        (self.gate.set if request.match_info["op"] == "open" else self.gate.clear)()
        return web.Response(text="ok")

    async def count_tokens(self, request: web.Request) -> web.Response:
        self.count_calls += 1
        self.count_headers.append(dict(request.headers))
        body = await self._body(request)
        self.counted.append(body)
        if (refused := self.unknown_model(body)) is not None:
            return refused
        await asyncio.sleep(self.count_delay)
        n = self.count(body) if self.count else 1000 + len(json.dumps(body.get("messages")))
        return web.json_response({"input_tokens": n})

    def _record(self, request: web.Request, body: Any) -> None:
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.paths.append(request.path_qs)

    def _start(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.generations_started += 1

    async def _lingering(self, request: web.Request, body: Any) -> None:
        self.cancelled += 1
        seconds = float(knob(request, body, "linger", self.linger))
        if self.linger_ends is None:
            await asyncio.shield(asyncio.sleep(seconds))
            return
        with contextlib.suppress(TimeoutError):  # a test ends the linger when it has seen what it waits for
            await asyncio.shield(asyncio.wait_for(self.linger_ends.wait(), seconds))

    async def chat_completions(self, request: web.Request) -> web.Response:
        from orchestrator.request.synthetic import instance_of

        body = await self._body(request)
        self._record(request, body)
        if knob(request, body, "mode", self.mode) == "error500":
            return _json_error(500, "boom", "server_error")
        self._start()
        try:
            await asyncio.sleep(self.prefill_delay)
            await self.gate.wait()  # a test holds its answers here (the gate is open by default)
            if knob(request, body, "mode", self.mode) == "stall":
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
            await self._lingering(request, body)
            raise
        finally:
            self.in_flight -= 1

    async def messages(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        body = await self._body(request)
        if self.parse_bodies:
            self.raw.append(await request.read())  # aiohttp keeps the body: read again, not re-received
            self._record(request, body)
        self.order.append("generate")
        if self.saving:
            self.crashed = True
        if self.tokens_per_turn is not None:
            self.slot_tokens = self.tokens_per_turn
        if self.on_request is not None:
            await self.on_request(body)
        mode = knob(request, body, "mode", self.mode)
        if (refused := self.unknown_model(body)) is not None:
            return refused
        if self.fail_next > 0:
            self.fail_next -= 1
            request.transport.close()
            return web.Response()
        if mode == "error500":
            return _json_error(500, "boom", "server_error")
        if mode == "error400":
            return _json_error(400, "bad thing", "invalid_request_error")
        self._start()
        try:
            if self.in_flight > self.capacity and self.die_on_overlap:
                self.crashed = True
            if self.crashed:
                request.transport.close()
                return web.Response()
            await asyncio.sleep(self.prefill_delay)
            if mode == "stall":
                await asyncio.sleep(3600)
            answer = self.script(body, request.headers) if self.script else None
            if isinstance(answer, Reply):
                return await self._reply(request, answer)
            return await self._answer(request, body, mode, answer)
        except asyncio.CancelledError:
            await self._lingering(request, body)
            raise
        except ConnectionError:
            self.cancelled += 1
            await asyncio.sleep(float(knob(request, body, "linger", self.linger)))
            raise
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, body: dict, mode: str, blocks: list[dict] | None):
        """The answer in the Messages API's shape: `blocks`, else `parts` words of text."""
        model = self.answer_model or body.get("model", "")
        stop = str(knob(request, body, "stop_reason", "end_turn")) if blocks is None else None
        parts = int(knob(request, body, "parts", self.parts))
        blocks = blocks if blocks is not None else [sse.text([f"w{i} " for i in range(parts)])]
        hold = knob(request, body, "hold", None) is not None
        # A body not parsed says nothing: the `stream` knob asks for a stream then.
        if not (body.get("stream") or knob(request, body, "stream", None) is not None):
            await asyncio.sleep(self.chunk_delay * parts)
            if hold:
                await self.gate.wait()
            self.generations_finished += 1
            return web.json_response(sse.message(blocks, model=model, stop=stop,
                                                 usage={**sse.USAGE, "output_tokens": parts}))
        events = sse.message_events(blocks, model=model, stop=stop)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, ev in enumerate(events):
            if mode == "die_midstream" and i == 3:
                await resp.write(ev[: len(ev) // 2])
                request.transport.close()
                return resp
            await resp.write(ev)
            if hold and i == 0:
                await self.gate.wait()
            await asyncio.sleep(self.chunk_delay)
        await resp.write_eof()
        self.generations_finished += 1
        return resp

    async def _reply(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        resp = web.StreamResponse(status=reply.status, headers=reply.headers)
        try:
            await asyncio.sleep(reply.prefill)
            await resp.prepare(request)
            for w in reply.writes:
                if isinstance(w, bytes):
                    await resp.write(w)
                else:
                    await asyncio.sleep(w)
            if reply.close_after is not None:
                await asyncio.sleep(reply.close_after)
                request.transport.close()
                return resp
            await resp.write_eof()
            self.generations_finished += 1
        except ConnectionError:
            pass  # the gateway left: what a test scripted is over either way
        return resp

    async def completion(self, request: web.Request) -> web.Response:
        """llama-server's /completion, as far as the identity probe asks it: one token and its figures."""
        self.probes += 1
        top = [{"id": int(i), "logprob": float(p)} for i, p in (x.split(":") for x in self.probe.split(","))]
        return web.json_response({"content": "\n", "completion_probabilities": [{**top[0], "top_logprobs": top}]})

    def disk_used(self) -> int:
        """Bytes of the files in `folder` (the fake disk's use: the saves and their metadata)."""
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file()) if self.folder else 0

    async def slot_action(self, request: web.Request) -> web.Response:
        action, name = request.query["action"], (await request.json())["filename"]
        self.order.append(action)
        if self.die_on == action:
            self.slot_tokens = 0
            request.transport.close()
            return web.Response()
        self.actions.append((action, name))
        if self.in_flight:
            self.crashed = True
        assert self.folder is not None
        self.saving = True  # slot work: a generation arriving now would overlap it
        try:
            await asyncio.sleep(self.save_delay if action == "save" else self.restore_delay)
            if action == "save":
                room = None if self.disk_bytes is None else self.disk_bytes - self.disk_used()
                (self.folder / name).write_bytes(b"k" * (self.save_bytes if room is None else
                                                         max(0, min(room, self.save_bytes))))
                if room is not None and room < self.save_bytes:
                    return _json_error(500, "Unable to save slot", "server_error")
        finally:
            self.saving = False
        if self.slot_answer_gate is not None:
            await self.slot_answer_gate.wait()
        if action == "save":
            return web.json_response({"id_slot": 0, "filename": name, "n_saved": self.n_saved, "n_written": self.save_bytes,
                                      "timings": {"save_ms": 1.0}})
        if self.restore_error or not (self.folder / name).exists():
            return _json_error(400, self.restore_error or "no file", "invalid_request_error")
        # Like llama-server, whose /slots shows no prompt tokens after a restore (checked on the real one).
        return web.json_response({"id_slot": 0, "filename": name, "n_restored": self.restored_tokens,
                                  "n_read": self.save_bytes})


if __name__ == "__main__":
    # Answers at once, its bodies read and never parsed, any number at a time.
    engine = FakeEngine(parse_bodies=False, die_on_overlap=False, capacity=1, answer_model="fake.gguf")
    web.run_app(engine.app(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
