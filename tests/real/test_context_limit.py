"""A conversation that outgrows the backend's context, in Claude Code's words (issue #11).

llama-server refuses a prompt over its n_ctx with `exceed_context_size_error`; the gateway must
answer `400 invalid_request_error` `prompt is too long: N tokens > M maximum`, the one message
Claude Code takes as "compact and try again" rather than as an error to show.
"""

import re

import pytest
from test_claude_code import (
    _metric,
    claude_env_for,
    claude_home,  # noqa: F401 - the fixture, for this module's tests
    run_claude,
    start_for_claude,
)

from orchestrator import sse
from orchestrator.backends.gateway import GATEWAY

pytestmark = pytest.mark.real

# How Claude Code 2.1.197 reads the numbers out of a 400's message (grep -a its binary).
CLAUDE_CODE_PTL = re.compile(r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)", re.IGNORECASE)


def pasted_log(tag: str, lines: int) -> str:
    """Text a user pastes: about 23 of SmolLM2's tokens a line."""
    body = "\n".join(f"{tag} line {i:04d}: the quick brown fox jumps over the lazy dog near the river bank."
                     for i in range(lines))
    return f"Here is log {tag}, just remember it:\n{body}\nReply with one short sentence."


async def test_overflow_is_prompt_too_long_streaming_or_not(llama_short, gateway, http):
    """Both ways llama-server's refusal reaches a client: an HTTP 400 (it refuses before its first event,
    streaming or not), and an SSE `error` event when the gateway had already sent the client's
    headers (a request that waited in the queue with pings)."""
    # Pings at their default 10 s: the refusal of a 9k-token prompt comes well within that even on a
    # busy machine, so no ping goes out first. (At 20 ms a busy machine's refusal came after a ping,
    # and a 400 could no longer be sent: issue 25.)
    base, _ = await gateway({"backends": [{"name": "primary", "url": llama_short.url, "max_output_tokens": 64}]})
    big = {"model": "local-model", "max_tokens": 64, "messages": [{"role": "user", "content": pasted_log("x", 400)}]}
    async with http.post(llama_short.url + "/v1/messages/count_tokens", json=big) as r:
        n = (await r.json())["input_tokens"]
    assert n > 8192

    for stream in (False, True):
        async with http.post(base + "/v1/messages", json={**big, "stream": stream}) as r:
            assert r.status == 400, await r.text()
            assert r.content_type == "application/json"
            error = (await r.json())["error"]
        assert error == {"type": "invalid_request_error", "message": f"prompt is too long: {n} tokens > 8192 maximum"}
        assert CLAUDE_CODE_PTL.search(error["message"]).groups() == (str(n), "8192")
    assert await _metric(http, base, "orchestrator_requests_total", route="main", status="400") == 2

    # The slot taken (held here, as a request in it would hold it, until the waiting stream has had
    # its headers and a ping: no race with how long a request in the slot takes): the overflowing
    # stream waits in the queue, gets its headers and pings, and then llama-server's refusal can
    # only be an SSE error event.
    base, app = await gateway({"gateway": {"ping_interval_seconds": 0.02},
                               "backends": [{"name": "primary", "url": llama_short.url, "max_output_tokens": 64}]})
    queue = app[GATEWAY].backends["primary"].queue
    lease = await queue.acquire()
    try:
        async with http.post(base + "/v1/messages", json={**big, "stream": True}) as r:
            assert r.status == 200 and r.content_type == "text/event-stream"
            raw = await r.content.readuntil(b"\n\n")  # the first event, whenever it comes
            assert raw.startswith(b"event: ping"), raw
            lease.release()
            raw += await r.read()
    finally:
        lease.release()
    events = [(b.event.event, b.event.json()) for b in sse.SSEParser().feed(raw, eof=True) if b.event is not None]
    assert events[0][0] == "ping" and events[-1][0] == "error", events
    assert events[-1][1]["error"] == {"type": "invalid_request_error",
                                      "message": f"prompt is too long: {n} tokens > 8192 maximum"}
    assert await _metric(http, base, "orchestrator_requests_total", route="main", status="400") == 0
    assert await _metric(http, base, "orchestrator_requests_total", route="main", status="stream_error") == 1
    assert queue.busy == 0


async def test_claude_code_compacts_when_the_context_fills(llama_short, gateway, http, claude_home):  # noqa: F811
    """The default stack's 8k window fills in three `claude -p` turns of pasted logs (Claude Code's own
    request is ~2950 of SmolLM2's tokens: its 64 kB of tool definitions are not in the prompt, SmolLM2's
    chat template has no tools). The third turn overflows: the gateway answers `prompt is too long`,
    Claude Code compacts the first two turns (its first try at that overflows too, and it summarises
    less) and answers; a fourth turn in the same session is answered from the compacted conversation."""
    home, project = claude_home
    base, gw, config, health = await start_for_claude(gateway, http, {
        "backends": [{"name": "primary", "url": llama_short.url, "max_output_tokens": 256}]})
    env = claude_env_for(config, health, home)
    assert env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == "8192" and "CLAUDE_CODE_AUTO_COMPACT_WINDOW" not in env

    async def turn(*args: str) -> str:
        code, out, err = await run_claude(["-p", *args], env, project, timeout=900)
        assert code == 0, (out, err)
        assert "API Error" not in out + err and "exceeds the available context" not in out + err, (out, err)
        assert out.strip(), (out, err)
        return out

    # ~1650, ~1650 and ~2350 tokens: the first two fit with the system prompt, the third does not;
    # the compaction of the first two (with Claude Code's ~1300-token summary instructions) fits.
    await turn(pasted_log("alpha", 70))
    await turn("--continue", pasted_log("bravo", 70))
    assert await _metric(http, base, "orchestrator_requests_total", route="main", status="400") == 0
    await turn("--continue", pasted_log("charlie", 100))
    refused = await _metric(http, base, "orchestrator_requests_total", route="main", status="400")
    assert refused >= 1  # the turn itself, and the first compaction attempt
    answered = await _metric(http, base, "orchestrator_requests_total", route="main", status="200")
    assert answered >= 4  # two turns, the summary, the third turn
    await turn("--continue", "What is two plus two")
    assert await _metric(http, base, "orchestrator_requests_total", route="main", status="200") == answered + 1
    assert await _metric(http, base, "orchestrator_requests_total", route="main", status="400") == refused
    # The session's transcript holds Claude Code's compaction summary.
    transcript = "".join(p.read_text() for p in (home / ".claude" / "projects").rglob("*.jsonl"))
    assert '"isCompactSummary":true' in transcript.replace(" ", "")
    assert gw.backends["primary"].queue.busy == 0
