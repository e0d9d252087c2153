import pytest
from conftest import sample

from orchestrator.configfile import config_from_dict
from orchestrator.routing import (
    RouteKind,
    Shape,
    choose_route,
    classify_shape,
    strip_billing_header,
)
from orchestrator.slots import Priority

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


def test_background_model_names_by_pattern_case_insensitive():
    body = {"model": "Claude-HAIKU-9", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    assert choose_route(body, SYNTH, background_up=False).kind is RouteKind.SYNTHETIC
    body["model"] = "tiny-1"
    assert choose_route(body, WITH_SMALL, background_up=True).backends == ("small",)


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
