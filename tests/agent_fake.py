"""A scripted model for Claude Code's agent tree: the main conversation delegates with `Agent` tool
calls, each agent's own conversation answers with its marker, and the main conversation's follow-up
repeats what its agents reported. Every request is recorded with its headers."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from aiohttp import web

from orchestrator import sse

TASK = re.compile(r"AGENT-TASK-([a-z]+)")
MARKER = re.compile(r"MARKER-[a-z]+-7f3a")


def marker(name: str) -> str:
    return f"MARKER-{name}-7f3a"


# The agents the main conversation launches, all in one answer (Claude Code runs them at once).
AGENTS = [
    {"description": "Explore the project", "prompt": "AGENT-TASK-explore: look around and report.",
     "subagent_type": "Explore"},
    {"description": "General work on haiku", "prompt": "AGENT-TASK-haiku: do the work and report.",
     "subagent_type": "general-purpose", "model": "haiku"},
]


def _texts(content) -> list[str]:
    if isinstance(content, str):
        return [content]
    out = []
    for b in content if isinstance(content, list) else []:
        if isinstance(b, dict) and isinstance(b.get("text"), str):
            out.append(b["text"])
        elif isinstance(b, dict) and b.get("type") == "tool_result":
            out += _texts(b.get("content"))
    return out


def first_user_text(body: dict) -> str:
    first = next((m for m in body.get("messages", []) if m.get("role") == "user"), {})
    return "\n".join(_texts(first.get("content")))


def user_texts(body: dict) -> list[str]:
    """Every text the conversation's user turns carry: tool results, and notifications of agents
    that ran in the background (Claude Code 2.1.332 runs agents so by default)."""
    return [t for m in body.get("messages", []) if m.get("role") == "user" for t in _texts(m.get("content"))]


def tool_results(body: dict) -> list[str]:
    return ["\n".join(_texts(b.get("content"))) for m in body.get("messages", []) if m.get("role") == "user"
            and isinstance(m.get("content"), list) for b in m["content"]
            if isinstance(b, dict) and b.get("type") == "tool_result"]


def stream(model: str, blocks: list[dict], stop: str) -> bytes:
    msg = {"id": "msg_agentfake", "type": "message", "role": "assistant", "model": model, "content": [],
           "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}}
    out = [sse.encode("message_start", {"type": "message_start", "message": msg})]
    for i, b in enumerate(blocks):
        if b["type"] == "text":
            out += [sse.encode("content_block_start", {"type": "content_block_start", "index": i,
                                                       "content_block": {"type": "text", "text": ""}}),
                    sse.encode("content_block_delta", {"type": "content_block_delta", "index": i,
                                                       "delta": {"type": "text_delta", "text": b["text"]}})]
        else:
            start = {"type": "tool_use", "id": b["id"], "name": b["name"], "input": {}}
            out += [sse.encode("content_block_start", {"type": "content_block_start", "index": i,
                                                       "content_block": start}),
                    sse.encode("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                        "type": "input_json_delta", "partial_json": json.dumps(b["input"])}})]
        out.append(sse.encode("content_block_stop", {"type": "content_block_stop", "index": i}))
    out += [sse.encode("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop,
                                                                            "stop_sequence": None},
                                         "usage": {"output_tokens": 20}}),
            sse.encode("message_stop", {"type": "message_stop"})]
    return b"".join(out)


@dataclass
class Seen:
    role: str            # main | agent | other
    agent: str | None    # the agent's name (its task's), for role "agent"
    model: str
    headers: dict
    body: dict = field(repr=False)


class AgentFake:
    def __init__(self, agents: list[dict] | None = None):
        self.agents = agents if agents is not None else AGENTS
        self.seen: list[Seen] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def of(self, role: str) -> list[Seen]:
        return [s for s in self.seen if s.role == role]

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model, tools = body.get("model", "?"), {t.get("name") for t in body.get("tools") or []}
        task = TASK.search(first_user_text(body))
        if task is not None:
            role, name = "agent", task.group(1)
            payload = stream(model, [{"type": "text", "text": f"My report: {marker(name)}"}], "end_turn")
        elif "Agent" in tools or "Task" in tools:
            role, name = "main", None
            results = tool_results(body)
            if not results:
                tool = "Agent" if "Agent" in tools else "Task"
                calls = [{"type": "tool_use", "id": f"toolu_agent{i}", "name": tool, "input": a}
                         for i, a in enumerate(self.agents)]
                payload = stream(model, calls, "tool_use")
            else:
                said = sorted(set(MARKER.findall("\n".join(user_texts(body)))))
                text = "Agents said: " + " ".join(said) if said else "Waiting for the agents."
                payload = stream(model, [{"type": "text", "text": text}], "end_turn")
        else:
            role, name = "other", None
            payload = stream(model, [{"type": "text", "text": "fine"}], "end_turn")
        self.seen.append(Seen(role, name, model, request.headers.copy(), body))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(payload)
        await resp.write_eof()
        return resp
