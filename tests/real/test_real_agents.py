"""An agent's turn on the Haiku name, against the real llama-server, beside a real background model
(the small-model stack's shape, not declared work_capable): the primary does the work."""

import re

import pytest

from orchestrator.backends.gateway import GATEWAY
from testkit.client import sample

pytestmark = pytest.mark.real


async def _llama_metric(http, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    return float(re.search(rf"^llamacpp:{name} (\S+)$", text, re.M).group(1))


async def test_an_agent_turn_on_the_haiku_name_is_answered_by_the_primary(llama, llama_small, gateway, http):
    base, app = await gateway({
        "backends": [{"name": "primary", "url": llama.url},
                     {"name": "small", "url": llama_small.url, "role": "background"}],
        "routing": {"background": "small"}})
    gw = app[GATEWAY]
    capture = sample("agent-explore-2.1.197.json")
    headers = {k: v for k, v in capture["headers"].items() if k.lower() not in ("host", "content-length")}
    # The capture's identity and name; a short task, so SmolLM2's 8k context holds it.
    body = {"model": capture["body"]["model"], "max_tokens": 24, "stream": True,
            "system": "You are an agent for Claude Code. Do the task and report.",
            "messages": [{"role": "user", "content": "AGENT-TASK-explore: list three colours."}]}
    before = {u: await _llama_metric(http, u, "tokens_predicted_total") for u in (llama.url, llama_small.url)}
    async with http.post(base + "/v1/messages", json=body, headers=headers) as r:
        text = await r.text()
    assert r.status == 200 and "event: message_stop" in text, text
    after = {u: await _llama_metric(http, u, "tokens_predicted_total") for u in (llama.url, llama_small.url)}
    assert after[llama.url] > before[llama.url]          # generated on the primary
    assert after[llama_small.url] == before[llama_small.url]  # not on the 135M title model
    async with http.get(base + "/metrics") as r:
        metrics = await r.text()
    assert re.search(r'^orchestrator_routes_total\{reason="background_name_work",route="main"\} 1\.0$', metrics, re.M)
    assert re.search(r'^orchestrator_output_tokens_total\{backend="primary"\} [1-9]', metrics, re.M)
    assert not re.search(r'^orchestrator_synthetic_responses_total\{kind="\w+"\} [1-9]', metrics, re.M)
    (session,) = gw.agents.snapshot()["sessions"]
    assert session["agents"][0]["backend"] == "primary"
