"""A conversation: its key (what every turn of it shares), and its prompt as a list of content
blocks, each hashed: where two turns of a conversation first differ, and which saved conversation
shares the longest prefix with a request.

A conversation is known by a key of its prefix (system prompt, tools, first user message as
forwarded), bound to Claude Code's session and agent ids when it sent them.

The blocks come in the order the chat template renders them (system blocks, tools, then each
message's content blocks), so the first block that differs is where the prompt cache stops
matching. Pure; a hash is 8 bytes, and a turn keeps at most MAX_BLOCKS of them.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterator
from urllib.parse import urlsplit

import orjson

from .config import BackendConfig, is_loopback_host
from .errors import GatewayError
from .jsonvalues import utf8_json

# A conversation of 4,096 content blocks is far past any context; the rest are not hashed.
MAX_BLOCKS = 4096


def without_cache_control(value: Any) -> Any:
    """`value` with the `cache_control` marks of its blocks (of [role, block] pairs, of a message's
    or a tool_result's content) dropped.
    Claude Code marks the last block of the last message, so a turn's mark moves on with the next
    turn; the prompt a server computes is the same either way (llama-server ignores the mark)."""
    if isinstance(value, dict):
        if "cache_control" not in value and not isinstance(value.get("content"), list):
            return value
        out = {k: v for k, v in value.items() if k != "cache_control"}
        if isinstance(out.get("content"), list):  # a message's blocks, a tool_result's own blocks
            out["content"] = without_cache_control(out["content"])
        return out
    if isinstance(value, list):
        return [without_cache_control(v) for v in value]
    return value


def _digest(value: Any) -> str:
    value = without_cache_control(value)
    try:
        # orjson writes the same compact, key-sorted UTF-8 as json.dumps(sort_keys=True, ensure_ascii=False,
        # separators=(",", ":")), the same hashes, in half the time (issue 29: 8 against 18 ms a MB, loaded).
        text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (TypeError, ValueError, RecursionError):  # a lone surrogate, an integer past 64 bits
        text = repr(value).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=8).hexdigest()


def as_blocks(content: Any) -> Any:
    """A message's content as the model reads it: a string is the one text block it is. Claude Code
    sends the last message as a list (to carry the cache mark) and as a string once it is not, so
    left as sent, every turn would seem to change its prefix where the previous turn ended."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _walk(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    system = body.get("system")
    if isinstance(system, list):
        for i, block in enumerate(system):
            yield f"system[{i}]", block
    elif system is not None:
        yield "system", system
    tools = body.get("tools")
    if isinstance(tools, list):
        for i, tool in enumerate(tools):
            name = tool.get("name") if isinstance(tool, dict) else None
            yield f"tools[{shown(name) if isinstance(name, str) else i}]"[:80], tool
    messages = body.get("messages")
    if isinstance(messages, list):
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                yield f"messages[{i}]", m
                continue
            role, content = m.get("role"), as_blocks(m.get("content"))
            if isinstance(content, list):
                for j, block in enumerate(content):
                    kind = block.get("type") if isinstance(block, dict) else None
                    yield f"messages[{i}].{shown(role)}[{j}]:{shown(kind)}"[:80], [role, block]
            else:
                yield f"messages[{i}].{shown(role)}"[:80], [role, content]


_UNSHOWN = re.compile(r"[^A-Za-z0-9_.:-]")


def shown(value: Any) -> str:
    """A client's name (a tool's, a role, a block's type) as a block's place shows it in the log and on
    /health: letters, digits and `_.:-` only, the rest `?`, so no client writes a log line of its own."""
    return _UNSHOWN.sub("?", str(value)[:40])


def blocks(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, hash) of each content block of the prompt, in rendering order, at most MAX_BLOCKS."""
    out = []
    for where, value in _walk(body):
        if len(out) >= MAX_BLOCKS:
            break
        out.append((where, _digest(value)))
    return out


def shared(a: list[str], b: list[str]) -> int:
    """How many leading block hashes `a` and `b` have in common."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def kind(where: str) -> str:
    """The bounded label for a block's place: system, tools or messages."""
    return where.split("[", 1)[0].split(".", 1)[0] or "other"


def longest_shared(saves: list[dict[str, Any]], wanted: list[str]) -> dict[str, Any] | None:
    """The save (metadata with a `prefix` list of block hashes) sharing the most leading blocks
    with `wanted`, or None when none shares even its first block: an unrelated conversation."""
    best, best_n = None, 0
    for meta in saves:
        prefix = meta.get("prefix")
        if not isinstance(prefix, list):
            continue
        n = shared(prefix, wanted)
        if n > best_n or (n == best_n and best is not None and n and meta.get("time", 0) > best.get("time", 0)):
            best, best_n = meta, n
    return best if best_n > 0 else None


def for_waiter(saves: list[dict[str, Any]], key: str, prefix: list[str]) -> dict[str, Any] | None:
    """The save to restore for a waiting request: its conversation's own, else the one sharing its
    longest prefix (the same system prompt and tools), else None: never an unrelated conversation."""
    return next((m for m in saves if m.get("key") == key), None) or longest_shared(saves, prefix)


# ---- the conversation and its key -------------------------------------------------------------

BILLING_PREFIX = "x-anthropic-billing-header:"


def strip_billing_header(body: dict[str, Any]) -> dict[str, Any] | None:
    """The body without Claude Code's per-request billing line, or None if it has none.

    The line (`cc_version=...; cch=...`) differs on every request and comes
    first, so leaving it in makes the backend's prompt cache miss from token 0.
    """
    system = body.get("system")
    if isinstance(system, list) and system and isinstance(system[0], dict) \
            and str(system[0].get("text", "")).startswith(BILLING_PREFIX):
        return {**body, "system": system[1:]}
    if isinstance(system, str) and system.startswith(BILLING_PREFIX):
        _, _, rest = system.partition("\n")
        return {**body, "system": rest}
    return None


def fold_system_messages(body: dict[str, Any]) -> dict[str, Any] | None:
    """The body with each `role: "system"` message inside `messages` appended, as its blocks, to the user
    message before it (put before the first one's when none is; a user message of its own after tool
    results or an assistant turn), or None if it has none.

    Claude Code 2.1.332 sends its environment so (tests/fixtures/main-2.1.332.json). Chat templates take
    a system message first or not at all: Qwen3.5's raises "System message must be at the beginning",
    so llama-server answers 500 on every turn. Appended where it stood, the prompt keeps its order, and
    every turn folds it the same way: the prefix the prompt cache reads stays the same.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not any(isinstance(m, dict) and m.get("role") == "system"
                                                 for m in messages):
        return None
    out: list[Any] = []
    pending: list[Any] = []  # system blocks before any user message
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "system":
            blocks = as_blocks(m.get("content"))
            blocks = blocks if isinstance(blocks, list) else []
            last = out[-1] if out else None
            if isinstance(last, dict) and last.get("role") == "user" and not _has_tool_result(last):
                out[-1] = {**last, "content": [*as_blocks(last.get("content")), *blocks]}
            elif isinstance(last, dict) and last.get("role") == "user":
                # Not into tool results: llama-server puts a message's text before its tool results,
                # which would part the assistant's tool calls from them. A user message after them.
                out.append({"role": "user", "content": blocks})
            else:
                pending += blocks
        elif pending and isinstance(m, dict) and m.get("role") == "user":
            out.append({**m, "content": [*pending, *as_blocks(m.get("content"))]})
            pending = []
        else:
            out.append(m)
    if pending:  # nothing to fold into: a user message of its own
        out.append({"role": "user", "content": pending})
    return {**body, "messages": out}


def _has_tool_result(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)


def folds_system(backend: BackendConfig) -> bool:
    """Whether `backend` gets system messages folded (its `system_messages`; "auto": a server on this
    machine, whose chat template renders the prompt)."""
    if backend.system_messages != "auto":
        return backend.system_messages == "fold"
    return bool(backend.command) or is_loopback_host(urlsplit(backend.url).hostname or "")


def conversation_key(body: dict[str, Any], strip_billing: bool = True) -> str:
    """A conversation's identity: system prompt, tools and first user message as forwarded
    (the per-request billing line dropped, and the cache marks Claude Code moves every turn, and
    the first message's content as blocks: above), so every turn of it has the same key."""
    if strip_billing:
        body = strip_billing_header(body) or body
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    first = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
    if first is not None:
        first = {**first, "content": as_blocks(first.get("content"))}
    system, tools, first = without_cache_control([body.get("system"), body.get("tools"), first])
    try:
        text = utf8_json([system, tools, first])
    except GatewayError:
        text = repr([system, tools, first]).encode()
    return hashlib.sha256(text).hexdigest()[:32]


class Conversation:
    """The conversation a request belongs to. Its key is computed when first asked for (a pool's
    pick, a KV save or restore), then kept: serialising a big request's tools costs milliseconds,
    and most requests never need it."""

    def __init__(self, body: dict[str, Any], strip_billing: bool = True, session: str | None = None,
                 agent: str | None = None) -> None:
        self._body = body
        self._strip_billing = strip_billing
        self._session, self._agent = session, agent
        # Kept once computed. Not functools.cached_property: on Python 3.11 it holds one lock for
        # every instance while it computes, so a big body's hashing in a thread would stall the
        # event loop asking for another request's key. Computed twice at worst, never wrong.
        self._key: str | None = None
        self._blocks: list[tuple[str, str]] | None = None

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = bound_key(conversation_key(self._body, self._strip_billing), self._session, self._agent)
        return self._key

    @property
    def blocks(self) -> list[tuple[str, str]]:
        """(where, hash) of each content block as forwarded (above): where two turns part."""
        if self._blocks is None:
            body = (strip_billing_header(self._body) or self._body) if self._strip_billing else self._body
            self._blocks = blocks(body)
        return self._blocks

    @property
    def prefix(self) -> list[str]:
        return [h for _, h in self.blocks]


def bound_key(prefix: str, session: str | None, agent: str | None) -> str:
    """A conversation's key with Claude Code's session and agent ids (identity.py) when it sent them:
    bound to its prefix key, never the header alone, so a forged id names a conversation of the
    sender's own prefix and reaches no other client's save."""
    if session is None:
        return prefix
    return hashlib.sha256("\0".join((session, agent or "", prefix)).encode()).hexdigest()[:32]
