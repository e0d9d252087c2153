from multidict import CIMultiDict

from orchestrator.backends import identity
from orchestrator.backends.identity import Identity, from_headers, short
from orchestrator.backends.inflight import Entry, InFlight
from orchestrator.conversation import conversation_key as prefix_key
from testkit.client import sample

SID = "295830f4-f4d5-4433-a1a6-583a30d4e917"


def test_headers_as_claude_code_sends_them():
    h = sample("agent-explore-2.1.197.json")["headers"]

    ident = from_headers(CIMultiDict(h))
    assert ident.kind == "agent" and ident.session == h["X-Claude-Code-Session-Id"]
    assert ident.agent == h["x-claude-code-agent-id"] and ident.parent is None
    assert from_headers(CIMultiDict(sample("main-2.1.332.json")["headers"])).kind == "main"
    assert from_headers(CIMultiDict()).kind == "anonymous"


def test_a_header_too_long_or_not_plain_counts_as_absent():
    for bad in ("x" * 129, "", "a b", "a/b", "é", "a\tb", "../../etc"):
        assert from_headers({identity.SESSION: bad}) == Identity()
        assert from_headers({identity.SESSION: SID, identity.AGENT: bad}) == Identity(SID)
    # An agent id without a session names nothing: anonymous.
    assert from_headers({identity.AGENT: "a1"}) == Identity()
    assert from_headers({identity.SESSION: SID, identity.PARENT: "p"}).parent is None  # parent needs an agent
    assert from_headers({identity.SESSION: "x" * 128}).session == "x" * 128


def test_the_key_binds_the_header_identity_to_the_prefix():
    body = sample("main-2.1.332.json")["body"]
    other = {**body, "messages": [{"role": "user", "content": "something else"}]}
    assert identity.conversation(body, True, Identity()).key == prefix_key(body, True)
    mine = identity.conversation(body, True, Identity(SID)).key
    assert mine != prefix_key(body, True) and len(mine) == 32
    # Same prefix, other session or agent: another conversation (no shared save, no shared home).
    assert identity.conversation(body, True, Identity("other")).key != mine
    assert identity.conversation(body, True, Identity(SID, "a1")).key != mine
    # A forged session id never names another prefix's conversation.
    assert identity.conversation(other, True, Identity(SID)).key != mine
    # Later turns of the conversation keep their key.
    later = {**body, "messages": body["messages"] + [{"role": "assistant", "content": "ok"},
                                                     {"role": "user", "content": "more"}]}
    assert identity.conversation(later, True, Identity(SID)).key == mine


def _forwarded(tracker: InFlight, ident: Identity) -> Entry:
    entry = tracker.begin(ident, None)
    tracker.forwarded(entry, None, "main", "main")
    return entry


def test_tree_tracks_queued_then_running_and_lets_go():
    tracker = InFlight()
    tree = tracker.agents
    main = _forwarded(tracker, Identity(SID))
    t = _forwarded(tracker, Identity(SID, "a1", None))
    assert tree.in_flight() == {("main", "queued"): 1, ("main", "running"): 0,
                                ("agent", "queued"): 1, ("agent", "running"): 0}
    tracker.granted(t, "primary")
    tracker.granted(t, "primary2")  # a retry elsewhere: still one running, on the new backend
    snap = tree.snapshot()["sessions"][0]
    assert snap["agents"][0]["running"] == 1 and snap["agents"][0]["backend"] == "primary2"
    assert snap["main"]["queued"] == 1 and snap["id"] == SID[:8]
    tracker.end(t, "200")
    tracker.granted(main, "primary")
    tracker.end(main, "200")
    assert set(tree.in_flight().values()) == {0}
    anon = _forwarded(tracker, Identity())  # anonymous requests are not in the tree
    tracker.granted(anon, "primary")
    tracker.end(anon, "200")
    assert len(tree) == 1


def test_tree_is_bounded_whatever_ids_clients_send():
    tracker = InFlight(max_sessions=3, max_agents=2)
    tree = tracker.agents
    for i in range(1000):
        tracker.end(_forwarded(tracker, Identity(f"s{i % 50}", f"a{i}")), "200")
    snap = tree.snapshot()
    assert len(tree) == 3 and snap["sessions_known"] == 3
    assert all(len(s["agents"]) <= 2 for s in snap["sessions"]) and snap["forgotten"] > 0


def test_a_session_with_a_request_in_flight_stays_in_the_tree_however_many_new_ids_come():
    tracker = InFlight(max_sessions=3, max_agents=2)
    tree = tracker.agents
    running = _forwarded(tracker, Identity("busy-session"))
    tracker.granted(running, "primary")
    agent = _forwarded(tracker, Identity("busy-session", "agent-1"))
    for i in range(300):  # new sessions and new agents of the busy one, each ending at once
        tracker.end(_forwarded(tracker, Identity(f"new-{i}")), "200")
        tracker.end(_forwarded(tracker, Identity("busy-session", f"agent-x{i}")), "200")
    assert len(tree) == 3
    busy = next(s for s in tree.snapshot()["sessions"] if s["id"] == short("busy-session"))
    queued = {a["id"]: a["queued"] for a in busy["agents"]}
    assert busy["main"]["running"] == 1 and queued[short("agent-1")] == 1 and len(queued) <= 2
    assert tree.in_flight()[("main", "running")] == 1 and tree.in_flight()[("agent", "queued")] == 1
    tracker.end(running, "200")
    tracker.end(agent, "200")
    for i in range(3):
        tracker.end(_forwarded(tracker, Identity(f"later-{i}")), "200")
    assert short("busy-session") not in [s["id"] for s in tree.snapshot()["sessions"]]  # idle now: it may go
