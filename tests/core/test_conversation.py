"""A conversation's prompt as the gateway reads it: its blocks' places and hashes."""


def test_a_blocks_place_shows_no_client_text_but_names():
    """A content block's type, a role and a tool's name come from the client: in a block's place (the
    log line and /health of a cache miss) only letters, digits and `_.:-` are shown."""
    from orchestrator.conversation import blocks

    body = {"tools": [{"name": "mcp__srv__read\nINFO forged line"}],
            "messages": [{"role": "user\r\n", "content": [{"type": "text\nWARNING x", "text": "hi"}]}]}
    places = [where for where, _ in blocks(body)]
    assert places == ["tools[mcp__srv__read?INFO?forged?line]", "messages[0].user??[0]:text?WARNING?x"], places


def test_block_hashes_are_those_of_the_standard_librarys_sorted_json():
    """orjson (issue 29: twice as fast) writes what json.dumps(sort_keys=True, ensure_ascii=False,
    compact) writes: a save's prefix hashes from an older gateway still match."""
    import hashlib
    import json

    from orchestrator.conversation import _digest, without_cache_control
    from testkit.client import sample

    body = sample("main-2.1.332.json")["body"]
    values = [body["system"], *body["tools"], *body["messages"], {"é": [1.5, None, True, "\u2028"]}]
    for value in values:
        text = json.dumps(without_cache_control(value), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        assert _digest(value) == hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
