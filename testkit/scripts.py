"""Scripts for the fake engine (and the pass-through proxy): what a model answers Claude Code when a
test needs a particular turn, a tool call or an agent tree. A script takes a request's body and
headers and gives the content blocks to answer with, or None for the default answer."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .sse import text, tool_use

TASK = re.compile(r"AGENT-TASK-([a-z]+)")
MARKER = re.compile(r"MARKER-[a-z]+-7f3a")

# The agents the main conversation launches, all in one answer (Claude Code runs them at once).
AGENTS = [
    {"description": "Explore the project", "prompt": "AGENT-TASK-explore: look around and report.",
     "subagent_type": "Explore"},
    {"description": "General work on haiku", "prompt": "AGENT-TASK-haiku: do the work and report.",
     "subagent_type": "general-purpose", "model": "haiku"},
]


def marker(name: str) -> str:
    return f"MARKER-{name}-7f3a"


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


def replying(answer: str):
    """Every request answered with this text: no tool is asked for."""
    return lambda body, headers: [text(answer)]


def echo_hi(body: dict, headers) -> list[dict]:
    """A tool round trip: a request with tools and no tool result yet gets a Bash call (`echo hi`),
    the follow-up with its result a closing text."""
    if body.get("tools") and not tool_results(body):
        return [tool_use("Bash", {"command": "echo hi", "description": "Print hi"})]
    return [text("The command printed hi. Done.")]


@dataclass
class Seen:
    role: str            # main | agent | other
    agent: str | None    # the agent's name (its task's), for role "agent"
    model: str
    headers: dict
    body: dict = field(repr=False)


class AgentTree:
    """Claude Code's agent tree: the main conversation delegates with `Agent` tool calls, each agent's
    own conversation answers with its marker, and the main conversation's follow-up repeats what its
    agents reported. Every request is kept with its headers."""

    def __init__(self, agents: list[dict] | None = None) -> None:
        self.agents = agents if agents is not None else AGENTS
        self.seen: list[Seen] = []

    def of(self, role: str) -> list[Seen]:
        return [s for s in self.seen if s.role == role]

    def __call__(self, body: dict, headers) -> list[dict]:
        model, tools = body.get("model", "?"), {t.get("name") for t in body.get("tools") or []}
        task = TASK.search(first_user_text(body))
        if task is not None:
            role, name = "agent", task.group(1)
            blocks = [text(f"My report: {marker(name)}")]
        elif "Agent" in tools or "Task" in tools:
            role, name = "main", None
            if not tool_results(body):
                tool = "Agent" if "Agent" in tools else "Task"
                blocks = [tool_use(tool, a, f"toolu_agent{i}") for i, a in enumerate(self.agents)]
            else:
                said = sorted(set(MARKER.findall("\n".join(user_texts(body)))))
                blocks = [text("Agents said: " + " ".join(said) if said else "Waiting for the agents.")]
        else:
            role, name = "other", None
            blocks = [text("fine")]
        self.seen.append(Seen(role, name, model, headers.copy(), body))
        return blocks
