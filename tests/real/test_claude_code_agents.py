"""Claude Code's agents through the gateway, with the real CLI: every agent's work reaches a model
(a scripted one here, testkit.scripts.AgentTree), and its marker reaches the main conversation; nothing the user
asked for is answered by the gateway itself."""

import pytest
from test_claude_code import (  # noqa: F401
    NEWER,
    _metric,
    claude_env_for,
    claude_home,
    run_claude,
    start_for_claude,
)

from orchestrator.backends import identity
from testkit.engine import FakeEngine
from testkit.scripts import AGENTS, AgentTree, marker, user_texts

pytestmark = pytest.mark.real

NAMES = [a["prompt"].split(":")[0].removeprefix("AGENT-TASK-") for a in AGENTS]


def base_url_only(config, home) -> dict:
    """What a user who set nothing but the base URL (and a key, which Claude Code needs) runs with."""
    env = claude_env_for(config, {}, home)
    keep = ("PATH", "HOME", "TERM", "DISABLE_TELEMETRY", "CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL",
            "ANTHROPIC_BASE_URL")
    return {**{k: env[k] for k in keep}, "ANTHROPIC_API_KEY": "sk-ant-none"}


@pytest.mark.parametrize("launcher,version", [("orchestrator", None), ("base_url_only", None),
                                              ("orchestrator", NEWER), ("base_url_only", NEWER)])
async def test_agents_get_real_answers(gateway, serve_app, http, claude_home, launcher, version):
    home, project = claude_home
    fake = AgentTree()
    url = await serve_app(FakeEngine(script=fake, die_on_overlap=False).app())
    base, gw, config, health = await start_for_claude(gateway, http, {"backends": [{"name": "primary", "url": url}]})
    env = claude_env_for(config, health, home) if launcher == "orchestrator" else base_url_only(config, home)
    code, out, err = await run_claude(["-p", "Delegate the work to your agents, then report what they said.",
                                       "--allowedTools", "Agent,Task"], env, project, timeout=300, version=version)
    assert code == 0, (out, err)
    # Every agent's conversation reached the model, and its report reached the main conversation.
    assert sorted({s.agent for s in fake.of("agent")}) == sorted(NAMES), [(s.role, s.model) for s in fake.seen]
    follow_up = fake.of("main")[-1].body
    for name in NAMES:
        assert marker(name) in out, out
        assert any(marker(name) in t for t in user_texts(follow_up))
    # The haiku-named agents were forwarded as work, never answered by the gateway.
    for reason in ("work", "background_name_work"):
        assert await _metric(http, base, "orchestrator_routes_total", route="synthetic", reason=reason) == 0
    haiku_named = [s for s in fake.of("agent") if "haiku" in s.model.lower()]
    # What each version does (README, "Claude Code's agents"), as seen here. Without the launcher,
    # 2.1.197 runs Explore and the `model: "haiku"` agent on the Haiku name, 2.1.332 only the latter
    # (Explore inherits the main model). With it, 2.1.197 puts every agent on CLAUDE_CODE_SUBAGENT_MODEL,
    # while 2.1.332 lets the agent's own `model: "haiku"` win over it.
    expected = {("base_url_only", None): ["explore", "haiku"], ("base_url_only", NEWER): ["haiku"],
                ("orchestrator", None): [], ("orchestrator", NEWER): ["haiku"]}[(launcher, version)]
    assert sorted(s.agent for s in haiku_named) == expected, [(s.agent, s.model) for s in fake.of("agent")]
    assert await _metric(http, base, "orchestrator_routes_total", route="main",
                         reason="background_name_work") >= len(haiku_named)
    # Who asked: Claude Code's identity headers stay at the gateway (a backend needs none of them) and
    # build its tree: one session, its main conversation and one node per agent id.
    for s in fake.seen:
        assert not {identity.SESSION, identity.AGENT, identity.PARENT} & {k.title() for k in s.headers}, s.headers
    tree = gw.agents.snapshot()
    (session,) = tree["sessions"]
    assert session["main"]["requests"] >= 2 and len(session["agents"]) == len(NAMES), tree
    assert all(a["backend"] == "primary" and a["queued"] == a["running"] == 0 for a in session["agents"])
    assert await _metric(http, base, "orchestrator_requester_requests_total", kind="agent") >= len(NAMES)
