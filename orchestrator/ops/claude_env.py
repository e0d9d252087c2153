"""The environment that points Claude Code at the gateway, with everything a local setup needs."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from ..config import Config
from .supervise import cache_dir


def claude_environment(config: Config, health: dict[str, Any]) -> dict[str, str]:
    g, c = config.gateway, config.claude
    env = {
        "ANTHROPIC_BASE_URL": g.url,
        # The gateway's key when it has one (sent as Authorization: Bearer), else
        # a dummy; an auth token, unlike an API key, never makes Claude Code ask
        # whether to use it.
        "ANTHROPIC_AUTH_TOKEN": g.api_key or "orchestrator-local",
        "ANTHROPIC_MODEL": c.model,
        "ANTHROPIC_DEFAULT_OPUS_MODEL": c.model,
        "ANTHROPIC_DEFAULT_SONNET_MODEL": c.model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": c.small_model,
        "ANTHROPIC_SMALL_FAST_MODEL": c.small_model,
        # Agents (Explore, general-purpose, ...) on the main model: both 2.1.197 and 2.1.332 read it.
        # An Agent call that names `model: "haiku"` still arrives on the small name (checked with the
        # real CLI: tests/real/test_claude_code_agents.py), and a user with only ANTHROPIC_BASE_URL set has
        # no launcher: the gateway's routing (routing.py) is right without this, which only spares the
        # routing a guess.
        "CLAUDE_CODE_SUBAGENT_MODEL": c.model,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "API_TIMEOUT_MS": str(c.api_timeout_ms),
    }
    primary = next((b for b in health.get("backends", []) if b.get("role") == "main"), None)
    if primary and primary.get("n_ctx"):
        env.update(context_environment(int(primary["n_ctx"])))
    cap = config.main_backends[0].max_output_tokens
    if cap:
        env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] = str(cap)
    return env


# Claude Code (checked in 2.1.197) lets CLAUDE_CODE_AUTO_COMPACT_WINDOW no lower than this.
AUTO_COMPACT_FLOOR = 100_000


def context_environment(n_ctx: int) -> dict[str, str]:
    """What tells Claude Code the backend's real context window, and how it should compact.

    CLAUDE_CODE_MAX_CONTEXT_TOKENS is the model's window for any model name that does not start
    with `claude-` (claude.model's default does not): `/context` shows n_ctx. (Without that name rule Claude Code reads
    it only under DISABLE_COMPACT, which we never set: it turns compaction off altogether.)

    Left at that, Claude Code never compacts ahead of time: it sends, and compacts when the answer
    is `prompt is too long: N > M` (errors.context_overflow), which llama-server gives before any
    prefill, so the reactive path costs one cheap refusal. Ahead-of-time compaction needs
    CLAUDE_CODE_AUTO_COMPACT_WINDOW, and then starts at window - min(output limit, 20000) - 13000:
    below Claude Code's own floor for that variable the threshold is a small part of the window or
    negative (8192: -5064, a compaction before every request), so it is set only from the floor up,
    where it compacts while the whole conversation still fits.
    """
    env = {"CLAUDE_CODE_MAX_CONTEXT_TOKENS": str(n_ctx)}
    if n_ctx >= AUTO_COMPACT_FLOOR:
        env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] = str(n_ctx)
    return env


def find_claude() -> str | None:
    """$CLAUDE_BIN, `claude` on PATH, else the copy deploy/install-claude-code.sh caches
    (the same order as that script)."""
    chosen = os.environ.get("CLAUDE_BIN")
    if chosen and os.access(chosen, os.X_OK):
        return chosen
    on_path = shutil.which("claude")
    if on_path:
        return on_path
    cached = cache_dir() / "claude-code" / "node_modules" / ".bin" / "claude"
    return str(cached) if os.access(cached, os.X_OK) else None


def path_export(binary: str) -> str:
    """A shell line that puts `binary`'s folder first on PATH, so that `claude` typed in
    that shell (or in Claude Code's own hints, `claude --resume ID`) runs it."""
    return f'export PATH={shlex.quote(str(Path(binary).parent))}:"$PATH"'
