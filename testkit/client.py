"""A client's side: Claude Code's captured requests (tests/fixtures/), and one POST to a gateway or
a server with what came back."""

from __future__ import annotations

import copy

import json
from typing import Any, NamedTuple

from .servers import ROOT

FIXTURES = ROOT / "tests" / "fixtures"


def sample(name: str) -> dict:
    """A real Claude Code request (method, path, query, headers, body) as captured."""
    return json.loads((FIXTURES / name).read_text())


class Posted(NamedTuple):
    status: int
    raw: bytes
    headers: Any


async def post(http, base: str, body: Any, path: str = "/v1/messages", **kw) -> Posted:
    """`body` as JSON to `base + path`: the status, the whole answer's bytes and its headers."""
    async with http.post(base + path, json=body, **kw) as r:
        return Posted(r.status, await r.read(), r.headers)


# The path Claude Code sends its Messages requests to (the SDK adds the query).
CLAUDE_PATH = "/v1/messages?beta=true"


def claude_title(session: str) -> dict:
    """Claude Code 2.1.332's own title request (its capture) for a session whose text is `session`."""
    body = copy.deepcopy(sample("title-2.1.332.json")["body"])
    block = body["messages"][0]["content"][0]
    block["text"] = f"<session>\n{session}\n</session>" + block["text"].split("</session>", 1)[1]
    return body
