import json

from orchestrator.errors import Overloaded, from_upstream


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
