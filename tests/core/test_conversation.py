"""A conversation's prompt as the gateway reads it: its blocks' places and hashes."""


def test_a_blocks_place_shows_no_client_text_but_names():
    """A content block's type, a role and a tool's name come from the client: in a block's place (the
    log line and /health of a cache miss) only letters, digits and `_.:-` are shown."""
    from orchestrator.conversation import blocks

    body = {"tools": [{"name": "mcp__srv__read\nINFO forged line"}],
            "messages": [{"role": "user\r\n", "content": [{"type": "text\nWARNING x", "text": "hi"}]}]}
    places = [where for where, _ in blocks(body)]
    assert places == ["tools[mcp__srv__read?INFO?forged?line]", "messages[0].user??[0]:text?WARNING?x"], places
