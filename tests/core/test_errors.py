import json
import re

from orchestrator.errors import Overloaded, from_upstream
from orchestrator.request.relay import _as_anthropic_error


def test_llama_server_openai_error_becomes_anthropic_shape():
    e = from_upstream(500, json.dumps({"error": {"code": 500, "message": "'messages' is required",
                                                 "type": "server_error"}}).encode())
    assert e.status == 500
    assert e.body() == {"type": "error", "error": {"type": "api_error",
                                                   "message": "backend: 'messages' is required"}}


def test_status_mapping_and_non_json():
    assert from_upstream(400, b"{}").error_type == "invalid_request_error"
    assert from_upstream(503, b"busy").error_type == "overloaded_error"
    assert from_upstream(429, b"").error_type == "rate_limit_error"
    e = from_upstream(502, b"<html>bad gateway</html>")
    assert e.status == 502 and "bad gateway" in e.message


def test_anthropic_shaped_upstream_error_keeps_its_type():
    raw = json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "x"}}).encode()
    assert from_upstream(529, raw).error_type == "overloaded_error"


def test_overloaded_has_retry_after():
    e = Overloaded("full", retry_after=3)
    assert e.status == 529 and e.headers == {"retry-after": "3"}


# llama-server's answer to a prompt over its context, byte for byte (HTTP 400, streaming or not).
OVERFLOW = (b'{"error":{"code":400,"message":"request (9031 tokens) exceeds the available context size (8192 tokens), '
            b'try increasing it","type":"exceed_context_size_error","n_prompt_tokens":9031,"n_ctx":8192}}')
# The pattern Claude Code 2.1.197 reads a 400's message with, to know it must compact.
CLAUDE_CODE_PTL = re.compile(r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)", re.IGNORECASE)


def test_context_overflow_in_claude_codes_words():
    e = from_upstream(400, OVERFLOW)
    assert e.status == 400
    assert e.body() == {"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": "prompt is too long: 9031 tokens > 8192 maximum"}}
    assert CLAUDE_CODE_PTL.search(e.message).groups() == ("9031", "8192")


def test_context_overflow_as_a_stream_error_event():
    """What relay.py does with an `error` event whose data is llama-server's error object."""
    data = json.loads(OVERFLOW)["error"]
    body = _as_anthropic_error(data)
    assert body["error"] == {"type": "invalid_request_error",
                             "message": "prompt is too long: 9031 tokens > 8192 maximum"}


def test_context_overflow_numbers_from_the_message_alone():
    """An older llama-server without n_prompt_tokens/n_ctx; and the batch-bound variant of the message."""
    raw = json.dumps({"error": {"code": 400, "type": "exceed_context_size_error",
                                "message": "input (9000 tokens) is larger than the max context size (4096 tokens). "
                                           "skipping"}}).encode()
    assert from_upstream(400, raw).message == "prompt is too long: 9000 tokens > 4096 maximum"
    # Numbers nowhere: no made-up ones, the backend's message as any other 400.
    raw = json.dumps({"error": {"code": 400, "type": "exceed_context_size_error", "message": "too big"}}).encode()
    e = from_upstream(400, raw)
    assert e.status == 400 and e.error_type == "invalid_request_error" and e.message == "backend: too big"


def test_context_overflow_at_exactly_n_ctx_still_reads_too_long():
    """llama-server refuses a prompt of exactly n_ctx tokens too: the maximum it takes is n_ctx - 1."""
    raw = OVERFLOW.replace(b'"n_prompt_tokens":9031', b'"n_prompt_tokens":8192')
    n, m = map(int, CLAUDE_CODE_PTL.search(from_upstream(400, raw).message).groups())
    assert (n, m) == (8192, 8191) and n > m


def test_vllms_overflow_reads_as_anthropics_prompt_too_long():
    """vLLM 0.32's 400 for a prompt over --max-model-len (its exception name as the type)."""
    raw = json.dumps({"type": "error", "error": {"type": "BadRequestError", "message": (
        "This model's maximum context length is 8192 tokens. However, your prompt contains at least 8193 "
        "input tokens, which exceeds this limit even without any output tokens. Please reduce the length of "
        "the input prompt. (parameter=input_tokens, value=8193)")}}).encode()
    err = from_upstream(400, raw)
    assert err.status == 400 and err.error_type == "invalid_request_error"
    assert err.message == "prompt is too long: 8193 tokens > 8192 maximum"
    other = from_upstream(404, b'{"type":"error","error":{"type":"NotFoundError","message":"The model x does not exist."}}')
    assert other.error_type == "not_found_error" and other.message == "backend: [NotFoundError] The model x does not exist."
