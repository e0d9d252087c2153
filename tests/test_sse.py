from orchestrator import sse


def test_parser_handles_arbitrary_chunking():
    raw = (sse.encode("message_start", {"type": "message_start"}) + b": comment\n\n"
           + b"event: ping\r\ndata: {}\r\n\r\n" + sse.encode("message_stop", {"type": "message_stop"}))
    for size in (1, 2, 3, 7, 1000):
        p = sse.SSEParser()
        events = []
        for i in range(0, len(raw), size):
            events += p.feed(raw[i:i + size])
        assert [e.event for e in events] == ["message_start", "ping", "message_stop"]


def test_multiline_data_and_overflow():
    p = sse.SSEParser()
    assert p.feed(b"data: a\ndata: b\n\n")[0].data == "a\nb"
    p = sse.SSEParser()
    p.MAX_EVENT_BYTES = 10
    assert p.feed(b"data: " + b"x" * 20) == [] and p.overflowed
