"""Claude Code's real main request (tests/fixtures/main-2.1.332.json), shaped for a run: a short
tool loop's turns, or padded with tool round trips to a size."""

from __future__ import annotations

import copy
import json
import random

from .client import sample
from .servers import ROOT


def claude_turn(cch: str, turn: int) -> dict:
    """Claude Code's real main request; turn 2 is turn 1 plus an answer and a new question."""
    body = copy.deepcopy(sample("main-2.1.332.json")["body"])
    body["system"][0]["text"] = f"x-anthropic-billing-header: cc_version=2.1.332.{cch}; cc_entrypoint=cli;"
    body["tools"], body["max_tokens"], body["stream"] = body["tools"][:3], 4, False
    if turn == 2:
        body["messages"] += [{"role": "assistant", "content": [{"type": "text", "text": "Done: the tests pass."}]},
                             {"role": "user", "content": [{"type": "text", "text": "Now add a docstring."}]}]
    return body


def main_body() -> dict:
    """Claude Code 2.1.332's real main request, billing line first, as it sends it."""
    body = copy.deepcopy(sample("main-2.1.332.json")["body"])
    body["system"][0]["text"] = "x-anthropic-billing-header: cc_version=2.1.332.7a0; cc_entrypoint=cli; cch=4f2a1;"
    return body


def encode(body: dict) -> bytes:
    # As Claude Code (JSON.stringify) sends it: compact, non-ASCII as UTF-8.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _turn(rng: random.Random, i: int) -> list[dict]:
    """One tool round trip of a coding session: a tool call, a file's text back, a short reply."""
    lines = []
    for n in range(rng.randint(120, 260)):
        indent = " " * rng.choice((0, 4, 8, 12))
        lines.append(f'{indent}value_{n} = compute("{rng.random():.6f}", path=r"C:\\src\\mod_{i}.py")  '
                     f"# état {n}: \"quoted\" — ok ✓")
    call_id = f"toolu_{i:08d}{rng.randrange(16 ** 8):08x}"
    return [
        {"role": "assistant", "content": [
            {"type": "text", "text": f"Let me read module {i} to see how it computes its values."},
            {"type": "tool_use", "id": call_id, "name": "Read", "input": {"file_path": f"/repo/src/mod_{i}.py"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call_id, "content": "\n".join(lines)}]},
    ]


def padded_body(size: int, *, seed: int = 1) -> dict:
    """The real main request with tool round trips inserted before its last message, to about `size` bytes."""
    body = main_body()
    body["stream"] = False
    rng = random.Random(seed)
    base = len(encode(body))
    turns: list[dict] = []
    grown = base
    i = 0
    while grown < size:
        t = _turn(rng, i)
        grown += len(encode(t)) + 1
        turns += t
        i += 1
    body["messages"] = body["messages"][:-1] + turns + body["messages"][-1:]
    return body


class GrowingConversation:
    """A Claude Code conversation that grows by one exchange a turn, as its main loop does; a
    subclass builds its first request into `body`."""

    name: str
    body: dict
    turns: int = 0

    def next(self, answer: str | None = None) -> dict:
        """The next turn's request; `answer` is what the model said to the last one."""
        if self.turns:
            self.body["messages"] += [
                {"role": "assistant", "content": [{"type": "text", "text": (answer or "").strip() or "Done."}]},
                {"role": "user", "content": [{"type": "text", "text": f"Good. Now do step {self.turns + 1}."}]}]
        self.turns += 1
        # A new billing line every request, as Claude Code sends it (the gateway drops it).
        self.body["system"][0]["text"] = (f"x-anthropic-billing-header: cc_version=2.1.332.{self.name}"
                                          f"{self.turns:02d}; cc_entrypoint=cli;")
        return copy.deepcopy(self.body)


def notes(index: int, chars: int = 3000) -> str:
    """A CLAUDE.md of about `chars` characters: a section of this repository's README, a different
    one per index (real prose, not a repeated word the tokenizer folds)."""
    text = (ROOT / "README.md").read_text()
    return text[2000 + index * chars: 2000 + (index + 1) * chars]


def trimmed_turn(tools: tuple[str, ...], system: str, reminder: str, task: str, max_tokens: int) -> dict:
    """Claude Code's real main request trimmed so a cold prefill takes seconds: these tools, this
    long system block, a system-reminder before the user's task (where Claude Code puts CLAUDE.md),
    the environment message cut to 600 characters; streamed."""
    body = copy.deepcopy(sample("main-2.1.332.json")["body"])
    body["tools"] = [t for t in body["tools"] if t["name"] in tools]
    body["system"][2]["text"] = system
    first, env = body["messages"][0], body["messages"][1]
    first["content"].insert(1, {"type": "text", "text": f"<system-reminder>\n{reminder}\n</system-reminder>\n"})
    first["content"][-1]["text"] = task
    env["content"][0]["text"] = env["content"][0]["text"][:600]
    body["max_tokens"], body["stream"] = max_tokens, True
    return body
