"""The one builder of Anthropic SSE answers the fakes send: content blocks (text or tool calls) in
their events, one bytes object per event, encoded by the gateway's own `sse.encode`."""

from __future__ import annotations

import json

from orchestrator import sse

# What the fakes report unless told otherwise: 10 prompt tokens, 3 of them read from cache.
USAGE = {"input_tokens": 10, "output_tokens": 0, "cache_read_input_tokens": 3}


def text(content: str | list[str]) -> dict:
    """A text block; a list of parts is sent one delta each."""
    return {"type": "text", "text": content}


def tool_use(name: str, arguments: dict, call_id: str = "toolu_01") -> dict:
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def message_events(blocks: list[dict], *, model: str = "fake-model", stop: str | None = None,
                   usage: dict | None = None, output_tokens: int | None = None,
                   message_id: str = "msg_fake") -> list[bytes]:
    """A complete streamed answer: message_start (with `usage`), each block's start, deltas and stop,
    message_delta (its `stop`: tool_use when a block calls a tool, else end_turn) and message_stop."""
    stop = stop or ("tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn")
    msg = {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
           "stop_reason": None, "stop_sequence": None, "usage": dict(usage or USAGE)}
    out = [sse.encode("message_start", {"type": "message_start", "message": msg})]
    deltas = 0
    for i, b in enumerate(blocks):
        if b["type"] == "text":
            start = {"type": "text", "text": ""}
            parts = b["text"] if isinstance(b["text"], list) else [b["text"]]
            ds = [{"type": "text_delta", "text": t} for t in parts]
        else:
            start = {"type": "tool_use", "id": b["id"], "name": b["name"], "input": {}}
            ds = [{"type": "input_json_delta", "partial_json": json.dumps(b["input"])}]
        deltas += len(ds)
        out.append(sse.encode("content_block_start", {"type": "content_block_start", "index": i,
                                                      "content_block": start}))
        out += [sse.encode("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d})
                for d in ds]
        out.append(sse.encode("content_block_stop", {"type": "content_block_stop", "index": i}))
    out += [sse.encode("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop, "stop_sequence": None},
                                         "usage": {"output_tokens": deltas if output_tokens is None
                                                   else output_tokens}}),
            sse.encode("message_stop", {"type": "message_stop"})]
    return out


def sse_message(text_parts: list[str], model: str = "fake-model", stop_reason: str = "end_turn") -> list[bytes]:
    """One text block sent as these parts: the answer most tests relay."""
    return message_events([text(text_parts)], model=model, stop=stop_reason)


def message(blocks: list[dict], *, model: str, stop: str | None = None, usage: dict | None = None) -> dict:
    """The same answer not streamed: one JSON message."""
    stop = stop or ("tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn")
    content = [{"type": "text", "text": "".join(b["text"]) if isinstance(b["text"], list) else b["text"]}
               if b["type"] == "text" else b for b in blocks]
    return {"id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop, "stop_sequence": None, "usage": dict(usage or USAGE)}
