import pytest

from orchestrator import sse

STREAM = (sse.encode("message_start", {"type": "message_start"}) + b": comment\n\n"
          + b"event: ping\r\ndata: {}\r\n\r\n" + sse.encode("message_stop", {"type": "message_stop"}))


def _feed(raw: bytes, size: int, parser: sse.SSEParser | None = None) -> list[sse.Block]:
    p = parser or sse.SSEParser()
    blocks = []
    for i in range(0, len(raw), size):
        blocks += p.feed(raw[i:i + size])
    return blocks + p.feed(b"", eof=True)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_blocks_keep_their_bytes_at_any_chunking(size):
    blocks = _feed(STREAM, size)
    assert b"".join(b.raw for b in blocks) == STREAM
    assert [b.event.event if b.event else None for b in blocks] == ["message_start", None, "ping", "message_stop"]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending_the_spec_allows(eol):
    raw = STREAM.replace(b"\r\n", b"\n").replace(b"\n", eol)
    for size in (1, 5, len(raw)):
        blocks = _feed(raw, size)
        assert b"".join(b.raw for b in blocks) == raw
        assert [b.event.event for b in blocks if b.event] == ["message_start", "ping", "message_stop"]


def test_a_cr_at_a_chunk_end_waits_for_a_possible_lf():
    p = sse.SSEParser()
    assert p.feed(b"data: {}\r\n\r") == []
    blocks = p.feed(b"\n")
    assert [b.raw for b in blocks] == [b"data: {}\r\n\r\n"]


def test_multiline_data_default_event_and_comment_only_blocks():
    blocks = _feed(b"data: a\ndata: b\n\n:\n\nevent: x\n\n", 100)
    assert blocks[0].event == sse.Event("message", "a\nb")
    assert blocks[1].event is None and blocks[1].raw == b":\n\n"
    assert blocks[2].event is None  # an event type with no data dispatches nothing


def test_an_event_over_the_limit_is_refused_not_buffered():
    p = sse.SSEParser(max_event_bytes=100)
    p.feed(b"data: " + b"x" * 50)
    with pytest.raises(sse.EventTooLarge):
        p.feed(b"x" * 60)


def test_an_unfinished_block_at_the_end_is_not_an_event():
    assert sse.events(b"data: {}\n\ndata: {\"cut\":") == [sse.Event("message", "{}")]


def test_a_byte_order_mark_opening_the_stream_is_kept_in_the_bytes_but_not_in_the_field():
    raw = b"\xef\xbb\xbf" + STREAM
    blocks = _feed(raw, 2)
    assert b"".join(b.raw for b in blocks) == raw
    assert blocks[0].event.event == "message_start"
