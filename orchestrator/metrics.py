"""Every Prometheus metric the gateway exports, declared once, on an injected registry.

Labels are initialised up front so a series exists (at zero) before its first
event: `increase()` then sees the first crash or rejection, and dashboards are
never empty on a quiet system.
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ROUTES = ("main", "background", "synthetic", "count_tokens")
PRIORITIES = ("main", "background")
SYNTHETIC_KINDS = ("title", "topic", "warmup", "count_probe", "other")
# queued: waiting for a slot; in_slot: after its grant (prefill, generation, streaming).
DISCONNECT_STAGES = ("queued", "in_slot")
# backend_failed: its backend will not come back by itself (FATAL, or down past the grace);
# backend_down: the request failed on its backend as many times as it may be sent.
REJECTION_REASONS = ("queue_full", "queue_bytes", "queue_timeout", "bad_request", "too_large", "backend_down",
                     "backend_failed", "not_found", "unauthorized", "forbidden", "timeout", "too_many_connections")
RELEASE_RESULTS = ("idle", "gone", "unknown")
BACKGROUND_RESULTS = ("model", "invalid", "timeout", "failed", "busy")
AFFINITY_DECISIONS = ("hit", "new", "moved_down", "moved_busy", "moved_gone")  # backends/pool.Decision
# routing.Reason by the routes each can take; identity.KINDS.
_HOUSEKEEPING = ("title", "topic", "warmup")
ROUTE_REASONS = {"synthetic": (*_HOUSEKEEPING, "count_probe"),
                 "background": (*_HOUSEKEEPING, "background_name_work"),
                 "main": ("work", "background_name_work", "count_probe")}
REQUESTER_KINDS = ("main", "agent", "anonymous")
KV_SAVE_RESULTS = ("saved", "unchanged", "busy", "failed")
KV_RESTORE_RESULTS = ("restored", "none", "refused", "failed", "warm")
PARK_ACTIONS = ("park", "checkpoint", "unpark")  # parking.py
PARK_RESULTS = ("ok", "failed", "too_slow")
# Why a main or agent turn computed prompt tokens (cachemiss.py); prefix_changed also by block kind.
CACHE_REASONS = ("hit", "new", "switched", "unparked", "evicted", "prefix_changed", "restore_ineffective")
BLOCK_KINDS = ("system", "tools", "messages", "other")

# A synthetic answer takes a millisecond; a first-turn prefill of 25k tokens on
# a 225 GB model, or a wait behind one, takes minutes.
LATENCY_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
TOKENS_PER_SECOND_BUCKETS = (0.5, 1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500)


class Metrics:
    def __init__(self, registry: CollectorRegistry, backends: Iterable[str] = ()) -> None:
        self.registry = registry
        r = registry
        self.requests = Counter("orchestrator_requests", "Requests answered, by route, backend and HTTP status",
                                ["route", "backend", "status"], registry=r)
        self.queue_wait = Histogram("orchestrator_queue_wait_seconds", "Arrival to slot grant",
                                    ["backend", "priority"], buckets=LATENCY_BUCKETS, registry=r)
        self.cache_preferred = Counter("orchestrator_cache_preferred_grants", "Slots given to a waiter of the "
                                       "conversation the slot holds ahead of an earlier waiter (slots.py)",
                                       ["backend"], registry=r)
        self.ttft = Histogram("orchestrator_ttft_seconds",
                              "Arrival at the gateway to the first content event sent to the client",
                              ["backend", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_ttft = Histogram("orchestrator_upstream_ttft_seconds",
                                       "Slot grant to the first content event (prefill time)",
                                       ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("orchestrator_request_duration_seconds", "Arrival to the last byte sent",
                                  ["backend", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("orchestrator_prompt_tokens",
                                     'Prompt tokens; cache="hit" were read from the prompt cache',
                                     ["backend", "cache"], registry=r)
        self.output_tokens = Counter("orchestrator_output_tokens", "Generated tokens", ["backend"], registry=r)
        self.tokens_per_second = Histogram("orchestrator_generation_tokens_per_second",
                                           "Output tokens over first-token-to-end time, per request",
                                           ["backend"], buckets=TOKENS_PER_SECOND_BUCKETS, registry=r)
        self.queue_depth = Gauge("orchestrator_queue_depth", "Requests waiting for a slot", ["backend"], registry=r)
        self.slots_busy = Gauge("orchestrator_slots_busy", "Slots in use", ["backend"], registry=r)
        self.slots = Gauge("orchestrator_slots", "Slots configured", ["backend"], registry=r)
        self.backend_up = Gauge("orchestrator_backend_up", "1 when the backend answers its health check",
                                ["backend"], registry=r)
        self.backend_restarts = Counter("orchestrator_backend_restarts", "Backend process restarts seen",
                                        ["backend"], registry=r)
        self.synthetic = Counter("orchestrator_synthetic_responses", "Answers made by the gateway itself",
                                 ["kind"], registry=r)
        self.disconnects = Counter("orchestrator_client_disconnects", "Clients gone before their answer ended",
                                   ["stage"], registry=r)
        self.rejections = Counter("orchestrator_rejections", "Requests refused by the gateway", ["reason"],
                                  registry=r)
        self.release_wait = Histogram("orchestrator_slot_release_wait_seconds",
                                      "A request's client left: seconds until the backend let go of it and "
                                      "its slot was free again, by how that was known",
                                      ["backend", "result"], buckets=LATENCY_BUCKETS, registry=r)
        self.kv_saves = Counter("orchestrator_kv_saves", "KV cache saves of a backend's slot, by result "
                                "(saved, unchanged, busy, failed)", ["backend", "result"], registry=r)
        self.kv_save_seconds = Histogram("orchestrator_kv_save_seconds", "Duration of a KV save, slot held",
                                         ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.kv_saved_bytes = Counter("orchestrator_kv_saved_bytes", "Bytes written by KV saves", ["backend"],
                                      registry=r)
        self.kv_disk_bytes = Gauge("orchestrator_kv_disk_bytes", "Bytes of KV saves kept on disk", ["backend"],
                                   registry=r)
        self.kv_restores = Counter("orchestrator_kv_restores", "KV restores when a backend came back, by result "
                                   "(restored, none, refused, failed, warm)", ["backend", "result"], registry=r)
        self.kv_restore_seconds = Histogram("orchestrator_kv_restore_seconds", "Duration of a KV restore, "
                                            "queue held", ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.kv_restored_tokens = Counter("orchestrator_kv_restored_tokens", "Prompt tokens a restore put back "
                                          "in the cache (saved from prefill)", ["backend"], registry=r)
        self.kv_restores_short = Counter("orchestrator_kv_restores_short", "Restores whose first turn read from "
                                         "cache under half of what they held (kv/restorable.py)", ["backend"],
                                         registry=r)
        self.kv_parks = Counter("orchestrator_kv_parks", "Saves and restores before a granted request's send, "
                                "by action (park, checkpoint, unpark) and result (ok, failed, too_slow: skipped)",
                                ["backend", "action", "result"], registry=r)
        self.kv_park_seconds = Histogram("orchestrator_kv_park_seconds", "Delay a park, checkpoint or unpark "
                                         "added to the granted request", ["backend", "action"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.cache_turns = Counter("orchestrator_cache_turns", "Main and agent turns by why prompt tokens were "
                                   "computed: " + ", ".join(CACHE_REASONS), ["backend", "reason"], registry=r)
        self.cache_computed = Counter("orchestrator_cache_computed_tokens", "Prompt tokens computed (not read "
                                      "from cache), by the turn's reason", ["backend", "reason"], registry=r)
        self.cache_prefix_changes = Counter("orchestrator_cache_prefix_changes", "Turns whose prompt differed "
                                            "from the conversation's previous turn before its end, by the kind "
                                            "of content found there", ["backend", "kind"], registry=r)
        self.background_answers = Counter("orchestrator_background_answers",
                                          "Title and topic requests sent to the background model, by result: "
                                          "model (its answer, valid, sent), invalid, timeout, failed, busy "
                                          "(each answered synthetically)", ["backend", "shape", "result"],
                                          registry=r)
        self.affinity = Counter("orchestrator_affinity_decisions", "How a pooled request's backend was "
                                "chosen: hit (the conversation's own), new, moved_down, moved_busy, moved_gone",
                                ["backend", "decision"], registry=r)
        self.count_tokens_source = Counter("orchestrator_count_tokens", "count_tokens answers by source",
                                           ["source"], registry=r)
        # Why each /v1/messages request went where it went (routing.Reason; issue 18).
        self.routes = Counter("orchestrator_routes", "Messages requests by route (main, background, "
                              "synthetic) and reason: a housekeeping shape (title, topic, warmup, count_probe), "
                              "work, or background_name_work (work carried under a background model name)",
                              ["route", "reason"], registry=r)
        # Who asked (identity.KINDS): Claude Code's main conversations, its agents, or no session header.
        self.requesters = Counter("orchestrator_requester_requests", "Messages requests by requester kind: "
                                  "main (a session's own conversation), agent, anonymous (no valid session "
                                  "header)", ["kind"], registry=r)
        self.requesters_in_flight = Gauge("orchestrator_requesters_in_flight", "Requests of Claude Code "
                                          "sessions in flight, by requester kind (main, agent) and state "
                                          "(queued, running)", ["kind", "state"], registry=r)

        for kind in SYNTHETIC_KINDS:
            self.synthetic.labels(kind)
        for stage in DISCONNECT_STAGES:
            self.disconnects.labels(stage)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        for source in ("backend", "cache", "estimate"):
            self.count_tokens_source.labels(source)
        for route, reasons in ROUTE_REASONS.items():
            for reason in reasons:
                self.routes.labels(route, reason)
        for kind in REQUESTER_KINDS:
            self.requesters.labels(kind)
        for name in backends:
            self.add_backend(name)
        # Synthetic answers are made by the gateway itself.
        self.ttft.labels("gateway", "synthetic")
        self.duration.labels("gateway", "synthetic")
        self.requests.labels("synthetic", "gateway", "200")

    def add_backend(self, name: str) -> None:
        for cache in ("hit", "miss"):
            self.prompt_tokens.labels(name, cache)
        self.output_tokens.labels(name)
        self.backend_restarts.labels(name)
        self.backend_up.labels(name)
        for prio in PRIORITIES:
            self.queue_wait.labels(name, prio)
        self.cache_preferred.labels(name)
        self.upstream_ttft.labels(name)
        for result in RELEASE_RESULTS:
            self.release_wait.labels(name, result)
        self.tokens_per_second.labels(name)
        for route in ("main", "background"):
            self.ttft.labels(name, route)
            self.duration.labels(name, route)
        for route in ("main", "background", "count_tokens"):
            self.requests.labels(route, name, "200")

    def add_background_backend(self, name: str) -> None:
        """Series of the background backend's structured answers, at zero before the first."""
        for shape in ("title", "topic"):
            for result in BACKGROUND_RESULTS:
                self.background_answers.labels(name, shape, result)

    def add_pool_backend(self, name: str) -> None:
        """Series of a backend in a pool (several backends for one model), at zero before the first."""
        for decision in AFFINITY_DECISIONS:
            self.affinity.labels(name, decision)
        for reason in CACHE_REASONS:
            self.cache_turns.labels(name, reason)
            self.cache_computed.labels(name, reason)
        for kind in BLOCK_KINDS:
            self.cache_prefix_changes.labels(name, kind)

    def add_kv_backend(self, name: str) -> None:
        """Series of a backend that saves its KV cache, at zero before its first save."""
        for result in KV_SAVE_RESULTS:
            self.kv_saves.labels(name, result)
        for result in KV_RESTORE_RESULTS:
            self.kv_restores.labels(name, result)
        self.kv_save_seconds.labels(name)
        self.kv_restore_seconds.labels(name)
        self.kv_saved_bytes.labels(name)
        self.kv_disk_bytes.labels(name)
        self.kv_restored_tokens.labels(name)
        self.kv_restores_short.labels(name)
        for action in PARK_ACTIONS:
            self.kv_park_seconds.labels(name, action)
            for result in PARK_RESULTS:
                self.kv_parks.labels(name, action, result)

    def watch_queue(self, name: str, slots: Callable[[], float], depth: Callable[[], float],
                    busy: Callable[[], float]) -> None:
        """Gauges read at scrape time, so they can never drift from the queue."""
        self.slots.labels(name).set_function(slots)
        self.queue_depth.labels(name).set_function(depth)
        self.slots_busy.labels(name).set_function(busy)
