import copy
import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.config import ConfigError
from orchestrator.configfile import config_from_dict, load_config
from orchestrator.request.routing import (
    Reason,
    RouteKind,
    Shape,
    choose_route,
    classify_shape,
    strip_billing_header,
)
from orchestrator.slots import Priority
from testkit.client import FIXTURES, sample
from testkit.servers import ROOT

# The shared capture folder where it exists (this machine); tests/fixtures holds copies on a fresh clone.
SHARED_SAMPLES = ROOT.parent / "shared" / "claude-code-samples"
SYNTH = config_from_dict({})
WITH_SMALL = config_from_dict({
    "backends": [{"name": "primary", "url": "http://127.0.0.1:8080"},
                 {"name": "glm", "url": "http://127.0.0.1:8082", "models": ["glm-*"]},
                 {"name": "glm2", "url": "http://127.0.0.1:8083", "models": ["glm-*"]},
                 {"name": "small", "url": "http://127.0.0.1:8081", "role": "background"}],
    "routing": {"background": "small", "background_models": ["*haiku*", "tiny-*"]},
})


@pytest.mark.parametrize("name,shape", [
    ("title-2.1.332.json", Shape.TITLE),
    ("topic-2.0.77.json", Shape.TOPIC),
    ("warmup-2.0.77.json", Shape.WARMUP),
    ("count-probe-2.1.197.json", Shape.COUNT_PROBE),
    ("main-2.1.332.json", Shape.OTHER),
    ("agent-explore-2.1.197.json", Shape.OTHER),
])
def test_real_claude_code_requests_are_recognised(name, shape):
    assert classify_shape(sample(name)["body"]) is shape


def test_main_request_goes_to_primary_with_main_priority():
    r = choose_route(sample("main-2.1.332.json")["body"], SYNTH, background_up=False)
    assert r.kind is RouteKind.MAIN and r.backends == ("primary",) and r.priority is Priority.MAIN


def test_title_on_main_model_name_never_takes_main_slot():
    body = sample("title-2.1.332.json")["body"]
    assert body["model"] == "local-model"
    assert choose_route(body, SYNTH, background_up=False).kind is RouteKind.SYNTHETIC
    r = choose_route(body, WITH_SMALL, background_up=True)
    assert r.kind is RouteKind.BACKGROUND and r.backends == ("small",) and r.priority is Priority.BACKGROUND


def test_background_falls_back_to_synthetic_when_small_model_down():
    body = sample("topic-2.0.77.json")["body"]
    assert choose_route(body, WITH_SMALL, background_up=False).kind is RouteKind.SYNTHETIC


def test_work_on_a_background_name_goes_to_the_main_backends_as_main_work():
    """The name alone never makes a request housekeeping: whatever matches routing.background_models
    and is no recognised shape is work, at main priority, on the main group."""
    body = {"model": "Claude-HAIKU-9", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    for config, up in ((SYNTH, False), (WITH_SMALL, True), (WITH_SMALL, False)):
        r = choose_route(body, config, background_up=up)
        assert (r.kind, r.priority, r.reason) == (RouteKind.MAIN, Priority.MAIN, Reason.BACKGROUND_NAME_WORK)
    assert choose_route(body, SYNTH, background_up=False).backends == ("primary",)
    body["model"] = "tiny-1"  # by pattern, case-insensitive
    assert choose_route(body, WITH_SMALL, background_up=True).reason is Reason.BACKGROUND_NAME_WORK
    body["model"] = "local-model"
    assert choose_route(body, WITH_SMALL, background_up=True).reason is Reason.WORK


def capable(work_capable: bool, background_work: bool = True):
    raw = {"backends": [{"name": "primary", "url": "http://127.0.0.1:8080"},
                        {"name": "small", "url": "http://127.0.0.1:8081", "role": "background",
                         "work_capable": work_capable}],
           "routing": {"background": "small", "background_work": background_work}}
    return config_from_dict(raw)


def test_background_work_only_on_a_capable_background_backend_that_is_up():
    body = sample("agent-explore-2.1.197.json")["body"]
    r = choose_route(body, capable(True), background_up=True)
    # Still main work: above the housekeeping that shares that backend's queue.
    assert (r.kind, r.backends, r.priority, r.reason) == (RouteKind.BACKGROUND, ("small",), Priority.MAIN,
                                                          Reason.BACKGROUND_NAME_WORK)
    for config, up in ((capable(True), False), (capable(True, False), True), (capable(False, False), True)):
        assert choose_route(body, config, background_up=up).kind is RouteKind.MAIN
    # Housekeeping is unchanged by the switch.
    r = choose_route(sample("topic-2.0.77.json")["body"], capable(True), background_up=True)
    assert (r.kind, r.priority, r.reason) == (RouteKind.BACKGROUND, Priority.BACKGROUND, Reason.TOPIC)


def test_the_default_small_model_stack_is_not_capable_of_work():
    config = load_config(ROOT / "deploy" / "orchestrator.small.toml")
    assert config.background_backend is not None and not config.background_backend.work_capable
    r = choose_route(sample("agent-explore-2.1.197.json")["body"], config, background_up=True)
    assert r.kind is RouteKind.MAIN and r.backends == (config.main_backends[0].name,)


# Every Haiku-named request captured from the real CLI, and what the gateway does with it (and why).
HAIKU_NAMED = {
    "topic-2.0.77.json": (RouteKind.SYNTHETIC, Reason.TOPIC),
    "warmup-2.0.77.json": (RouteKind.SYNTHETIC, Reason.WARMUP),
    "agent-explore-2.1.197.json": (RouteKind.MAIN, Reason.BACKGROUND_NAME_WORK),
}


def _captures():
    for folder in (FIXTURES, SHARED_SAMPLES):
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
            yield path


def test_every_captured_haiku_named_request_is_classified_with_its_reason():
    seen = set()
    for path in _captures():
        capture = json.loads(path.read_text())
        body = capture["body"]
        if capture["path"] != "/v1/messages" or "haiku" not in str(body.get("model", "")).lower():
            continue
        kind, reason = HAIKU_NAMED[path.name]  # a new capture must be classified here on purpose
        r = choose_route(body, SYNTH, background_up=False)
        assert (r.kind, r.reason) == (kind, reason), path
        # With the small model up, housekeeping goes there (below main work); work never does.
        r = choose_route(body, WITH_SMALL, background_up=True)
        assert r.kind is (RouteKind.BACKGROUND if kind is RouteKind.SYNTHETIC else RouteKind.MAIN), path
        seen.add(path.name)
    assert seen == set(HAIKU_NAMED)


def test_model_patterns_pick_group_and_unknown_goes_to_default_primary():
    body = {"model": "glm-5", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    assert choose_route(body, WITH_SMALL, background_up=True).backends == ("primary", "glm", "glm2")
    one = config_from_dict({"backends": [{"name": "a", "url": "http://h:1", "models": ["qwen*"]},
                                         {"name": "b", "url": "http://h:2", "models": ["glm*"]}]})
    assert choose_route(body, one, background_up=False).backends == ("b",)
    body["model"] = "mystery"
    assert choose_route(body, one, background_up=False).backends == ("a",)


def test_count_probe_can_be_forwarded_by_config():
    body = sample("count-probe-2.1.197.json")["body"]
    assert choose_route(body, SYNTH, background_up=False).kind is RouteKind.SYNTHETIC
    fwd = config_from_dict({"routing": {"count_probes": "forward"}})
    assert choose_route(body, fwd, background_up=False).kind is RouteKind.MAIN


def test_streaming_max_tokens_1_is_not_a_probe():
    body = {"model": "m", "max_tokens": 1, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    assert classify_shape(body) is Shape.OTHER


def test_strip_billing_header_drops_only_that_block():
    body = sample("main-2.1.332.json")["body"]
    stripped = strip_billing_header(body)
    assert stripped["system"] == body["system"][1:]
    assert stripped["messages"] is body["messages"]
    assert strip_billing_header(stripped) is None
    s = strip_billing_header({"system": "x-anthropic-billing-header: cch=1;\nYou are helpful"})
    assert s["system"] == "You are helpful"


def test_background_work_needs_a_capable_background_backend_named():
    with pytest.raises(ConfigError, match="not declared work_capable"):
        capable(False)
    with pytest.raises(ConfigError, match="routing.background_work"):
        config_from_dict({"routing": {"background_work": True}})


# ---- Claude Code's own housekeeping, and nothing else (issue 28) ----------------------------------

CAPTURES = FIXTURES / "captures"
HOUSEKEEPING_KINDS = {"title": Shape.TITLE, "topic": Shape.TOPIC, "warmup": Shape.WARMUP,
                      "count_probe": Shape.COUNT_PROBE}


def _captured(kind: str | None = None) -> list[tuple[str, dict]]:
    """Every captured /v1/messages body of 2.0.77, 2.1.197 and 2.1.332 (of that kind), with its name."""
    out = []
    for path in sorted(CAPTURES.glob("*/*.json")):
        capture = json.loads(path.read_text())
        label = path.stem.split("-", 1)[1]
        if capture["path"] == "/v1/messages" and (kind is None or label == kind):
            out.append((f"{path.parent.name}/{path.name}", capture["body"]))
    return out


def test_every_captured_request_of_three_releases_is_recognised_as_what_it_is():
    seen = set()
    for name, body in _captured():
        label = name.split("-", 1)[1].removesuffix(".json")
        assert classify_shape(body) is HOUSEKEEPING_KINDS.get(label, Shape.OTHER), name
        seen.add((name.split("/")[0], label))
    # What each release sends (none sends everything: 2.1 dropped warm-ups and topic checks, 2.1.332
    # the count probe), so a capture set that lost a kind fails here.
    assert {(v, k) for v, k in seen if k in HOUSEKEEPING_KINDS} == {
        ("2.0.77", "warmup"), ("2.0.77", "topic"), ("2.0.77", "count_probe"),
        ("2.1.197", "title"), ("2.1.197", "count_probe"), ("2.1.332", "title")}


def _blog_post(schema_props: dict) -> dict:
    return {"model": "claude-haiku-4-5", "max_tokens": 2000, "messages": [
        {"role": "user", "content": "Write a 500-word blog post about Rust's borrow checker."}],
        "output_config": {"format": {"type": "json_schema", "schema": {
            "type": "object", "properties": schema_props, "required": list(schema_props),
            "additionalProperties": False}}}}


@pytest.mark.parametrize("body", [
    _blog_post({"title": {"type": "string"}, "body": {"type": "string"}, "tags": {"type": "array"}}),
    _blog_post({"title": {"type": "string"}, "severity": {"enum": ["low", "high"]}, "line": {"type": "integer"}}),
    _blog_post({"title": {"type": "string", "maxLength": 10}}),
    {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "Spam or not? Answer Y or N."}]},
    {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "text", "text": "Warmup"}]}]},
    {"model": "m", "max_tokens": 100, "system": "Reply with JSON. Fields: isNewTopic, title.",
     "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "{"}]},
], ids=["blog-post", "diff-review", "title-maxLength", "one-token-classification", "warmup-beside-an-image",
        "isNewTopic-prefill"])
def test_other_clients_requests_that_look_like_housekeeping_are_work(body):
    """Each was answered by the gateway itself on 5446c05 (issue 28), the backend never seeing it."""
    assert classify_shape(body) is Shape.OTHER
    r = choose_route(body, SYNTH, background_up=False)
    assert r.kind is RouteKind.MAIN and r.reason in (Reason.WORK, Reason.BACKGROUND_NAME_WORK)


def _mutations() -> dict[str, Callable[[dict], None]]:
    """One feature of a housekeeping request changed, as another client's request would differ."""
    def first_text(b: dict) -> dict:
        content = b["messages"][0]["content"]
        return content[0] if isinstance(content, list) else b["messages"][0]

    def set_first_text(b: dict, text: str) -> None:
        if isinstance(b["messages"][0]["content"], list):
            b["messages"][0]["content"][0]["text"] = text
        else:
            b["messages"][0]["content"] = text

    def schema(b: dict) -> dict:
        return b.setdefault("output_config", {}).setdefault("format", {"type": "json_schema", "schema": {}})["schema"]

    return {
        "a tool": lambda b: b.__setitem__("tools", [*(b.get("tools") or []), {
            "name": "get_weather", "description": "w", "input_schema": {"type": "object"}}]),
        "a second user turn": lambda b: b["messages"].append({"role": "user", "content": "and another thing"}),
        "an image": lambda b: b["messages"][0].__setitem__("content", [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            *(b["messages"][0]["content"] if isinstance(b["messages"][0]["content"], list)
              else [{"type": "text", "text": b["messages"][0]["content"]}])]),
        "no Claude Code system prompt": lambda b: b.__setitem__("system", "You are a helpful assistant."),
        "another schema": lambda b: schema(b).setdefault("properties", {}).__setitem__("body", {"type": "string"}),
        "a title constraint": lambda b: schema(b).setdefault("properties", {}).__setitem__(
            "title", {"type": "string", "maxLength": 5}),
        "other text": lambda b: set_first_text(b, "Please: " + (first_text(b).get("text") or "")),
        "streamed": lambda b: b.__setitem__("stream", True) if b.get("max_tokens") == 1 else
        b["messages"].append({"role": "user", "content": "more"}),
        "max_tokens 2": lambda b: b.__setitem__("max_tokens", 2) if b.get("max_tokens") == 1 else
        b["messages"].append({"role": "user", "content": "more"}),
        "temperature": lambda b: b.__setitem__("temperature", 0) if b.get("max_tokens") == 1 else
        b["messages"].append({"role": "user", "content": "more"}),
    }


MUTATIONS = _mutations()
# A probe counts whatever Claude Code counts (one section, or a whole conversation with its tools and
# images), and carries its extra body params: its tells are max_tokens 1, no stream, no system, its metadata.
NOT_A_TELL = {(Shape.TOPIC, "other text"), (Shape.TOPIC, "an image"), (Shape.WARMUP, "a tool"),
              *((Shape.COUNT_PROBE, c) for c in ("other text", "a tool", "an image", "a second user turn",
                                                "temperature"))}
HOUSEKEEPING_CAPTURES = [c for kind in HOUSEKEEPING_KINDS for c in _captured(kind)]


@settings(max_examples=300, deadline=None)
@given(capture=st.sampled_from(HOUSEKEEPING_CAPTURES), change=st.sampled_from(sorted(MUTATIONS)))
def test_a_captured_housekeeping_request_with_one_feature_changed_is_work(capture, change):
    name, body = capture
    body = copy.deepcopy(body)
    shape = classify_shape(body)
    # Where a change is no tell, another is made: the user's own text (a topic check's prompt, what a
    # probe counts) and an image in it vary; 2.0.77's warm-ups carry tools and probes count them; a
    # schema is the title's alone.
    if (shape, change) in NOT_A_TELL or (change in ("another schema", "a title constraint") and shape is not Shape.TITLE):
        change = "no Claude Code system prompt" if shape is Shape.COUNT_PROBE else "a second user turn"
    MUTATIONS[change](body)
    assert classify_shape(body) is Shape.OTHER, (name, change)


def test_a_count_probe_of_a_whole_conversation_is_still_a_count_probe():
    """/context counts the conversation too (2.0.77's count_tokens capture 19: four messages of blocks,
    ending on the assistant's); when count_tokens is missing, that goes as a one-token generation."""
    counted = json.loads((CAPTURES / "2.0.77" / "19-count_tokens.json").read_text())["body"]
    probe = json.loads((CAPTURES / "2.0.77" / "29-count_probe.json").read_text())["body"]
    body = {**counted, "max_tokens": 1, "metadata": probe["metadata"]}
    assert len(body["messages"]) > 1 and classify_shape(body) is Shape.COUNT_PROBE
    assert classify_shape({**body, "stream": True}) is Shape.OTHER
    assert classify_shape({k: v for k, v in body.items() if k != "metadata"}) is Shape.OTHER
