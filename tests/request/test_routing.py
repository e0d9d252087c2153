import json

import pytest

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
