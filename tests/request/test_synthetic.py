import json


from orchestrator.request import synthetic
from orchestrator.request.routing import Shape
from orchestrator.sse import events as sse_events
from testkit.client import sample


def _events(raw: bytes):
    return sse_events(raw)


def test_title_is_json_valid_against_schema_and_made_of_users_words():
    body = sample("title-2.1.332.json")["body"]
    msg = synthetic.message(body, Shape.TITLE, 100)
    title = json.loads(msg["content"][0]["text"])
    assert set(title) == {"title"} and isinstance(title["title"], str)
    assert title["title"] == "Python function that reverses"
    assert msg["model"] == "local-model" and msg["usage"]["input_tokens"] == 100


def test_topic_continues_the_prefill_into_valid_json():
    body = sample("topic-2.0.77.json")["body"]
    text, _ = synthetic.answer_text(body, Shape.TOPIC)
    parsed = json.loads("{" + text)
    assert parsed["isNewTopic"] is True and parsed["title"]


def test_stream_is_a_complete_anthropic_sequence():
    body = sample("warmup-2.0.77.json")["body"]
    events = _events(synthetic.stream(body, Shape.WARMUP, 5))
    assert [e.event for e in events] == ["message_start", "content_block_start", "content_block_delta",
                                         "content_block_stop", "message_delta", "message_stop"]
    assert events[0].json()["message"]["model"] == body["model"]
    assert events[4].json()["delta"]["stop_reason"] == "end_turn"
    assert all(e.json()["type"] == e.event for e in events)


def test_instance_of_schema_handles_common_shapes():
    schema = {"type": "object", "properties": {
        "title": {"type": "string"}, "n": {"type": "integer", "minimum": 3}, "ok": {"type": "boolean"},
        "kind": {"enum": ["a", "b"]}, "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "opt": {"type": ["null", "string"]}}, "required": ["title", "n", "ok", "kind", "tags"]}
    v = synthetic.instance_of(schema, "T")
    assert v == {"title": "T", "n": 3, "ok": False, "kind": "a", "tags": ["T"]}


def test_title_of_empty_or_filler_session():
    assert synthetic.make_title({"messages": [{"role": "user", "content": "please help"}]}) == "New session"
    assert synthetic.make_title({"messages": []}) == "New session"


def test_instance_of_follows_local_refs():
    import jsonschema

    schema = {"type": "object", "required": ["kind", "t"], "additionalProperties": False,
              "properties": {"kind": {"$ref": "#/$defs/kind"}, "t": {"$ref": "#/definitions/tree"}},
              "$defs": {"kind": {"enum": ["k1", "k2"]}},
              "definitions": {"tree": {"type": "object", "required": ["kids"], "properties": {
                  "kids": {"type": "array", "items": {"$ref": "#/definitions/tree"}}}}}}
    value = synthetic.instance_of(schema, "A title")
    assert value["kind"] == "k1" and value["t"] == {"kids": []}
    jsonschema.validate(value, schema)
    # A ref that names itself constrains nothing, and ends.
    assert synthetic.instance_of({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "T") is None
