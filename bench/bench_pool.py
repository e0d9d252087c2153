"""A pool of two llama-servers for one model, side by side in one run (issue 13).

    make bench        (or: .venv/bin/python bench/bench_pool.py [--quick])

Two real llama-servers (SmolLM2-135M, --parallel 1, --threads 1 each, so both fit on two cores)
in one pool of the gateway, and two Claude Code conversations, interleaved (c1 turn 1, c2 turn 1,
c1 turn 2, ...). Each turn is Claude Code's real main request (tests/fixtures/main-2.1.332.json,
trimmed so a cold prefill takes seconds: two tools, a shorter system prompt), streamed, with a
new billing line every request as Claude Code sends it; each conversation has its own project
(its own CLAUDE.md in the first user message), so the two prefixes part after the shared system
prompt; a turn appends the model's real answer and a new question.

  1. The sequence with conversation affinity (routing.affinity = true), then with least-busy
     routing (affinity = false, the rule before issue 13) on the same kind of fresh servers, twice:
     with llama-server's host-memory prompt cache off (--cache-ram 0: what a big model's 25k-token
     prefixes of several conversations come to, as the cache holds only a few GiB of them) and on
     (its default, 8 GiB). Per turn: the backend, prompt tokens read from cache (usage.
     cache_read_input_tokens) and wall time at the client.
  2. Failover, affinity on: while conversation 2's turn streams on its server and a second request
     of it waits behind, that server is killed (SIGKILL). The streaming answer ends in an SSE error
     (answer bytes had reached the client: the gateway cannot send it again) and the client retries
     it; the waiting one moves to the survivor and completes there. Then (not with --quick) the
     killed server comes back on its address and takes a new conversation c3 (the survivor is home
     to two), and the survivor is killed idle, between turns, the next turn sent at once: c1 and c2
     move back, one cold prefill each. Per turn as above, and the gateway's
     orchestrator_affinity_decisions_total.

    bench_pool.py --quick      (two turns per conversation in 1., the failover without its return)

tests/real/test_real_pool.py runs the same scenario and asserts on it; this prints it. Figures on a
shared machine are noisy: compare the columns of one run, not runs.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from testkit.bench import machine
from testkit.pool_session import TURNS, Row, comparison_table, failover, failover_table, interleaved, pool_config
from testkit.servers import LlamaServer


# ---- the bench on its own: servers and gateways of its own ----------------------------------------

async def main(quick: bool) -> None:
    from prometheus_client import CollectorRegistry

    from orchestrator.configfile import config_from_dict
    from orchestrator.http.app import create_app, start

    turns = 2 if quick else TURNS
    print(machine())
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-pool-") as tmp:
        servers: list[LlamaServer] = []
        runners = []

        def server(extra: tuple[str, ...], like: LlamaServer | None = None) -> LlamaServer:
            # One thread each: two servers side by side on two cores.
            s = LlamaServer(Path(tempfile.mkdtemp(dir=tmp)), ("--threads", "1", *extra))
            if like is not None:  # back on the address the gateway knows
                s.port, s.url = like.port, like.url
            servers.append(s)
            s.start()
            return s

        def pair(*extra: str) -> dict[str, LlamaServer]:
            return {name: server(extra) for name in ("a", "b")}

        async def gateway(raw: dict):
            raw = {**raw, "gateway": {"health_interval_seconds": 0.2}}
            app = create_app(config_from_dict(raw), CollectorRegistry())
            runner = await start(app, "127.0.0.1", 0)
            runners.append(runner)
            host, port = runner.addresses[0][:2]
            return f"http://{host}:{port}", app

        async def run(affinity: bool, *extra: str) -> list[Row]:
            p = pair(*extra)
            try:
                base, app = await gateway(pool_config({n: s.url for n, s in p.items()}, affinity))
                return await interleaved(http, base, app, turns)
            finally:
                for s in p.values():
                    s.stop()

        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                             timeout=aiohttp.ClientTimeout(total=600)) as http:
                columns = {"affinity": await run(True, "--cache-ram", "0"),
                           "least-busy": await run(False, "--cache-ram", "0"),
                           "least-busy+ram": await run(False)}
                print("\nTwo conversations interleaved on a pool of two llama-servers: prompt tokens read from "
                      "cache per turn\n(affinity and least-busy: --cache-ram 0; least-busy+ram: llama-server's "
                      "host-memory prompt cache on, its default)")
                print("\n".join(comparison_table(columns)))
                p = pair()
                base, app = await gateway(pool_config({n: s.url for n, s in p.items()}, True))

                def restart(name: str) -> int:
                    p[name] = server((), like=p[name])
                    return p[name].proc.pid

                f = await failover(http, base, app, {n: s.proc.pid for n, s in p.items()},
                                   None if quick else restart)
                print()
                print("\n".join(failover_table(f)))
        finally:
            for r in reversed(runners):
                await r.cleanup()
            for s in servers:
                s.stop()
    print(f"\n(bench_pool run: {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    asyncio.run(main("--quick" in sys.argv))
