"""The save folder with many saves, side by side in one run (issue 28).

A gateway in this process, its backend the shared fake engine with llama-server's slot actions, its
save folder holding N saves (20,000 by default, each a 1-byte file and its metadata, as the gateway
writes them). Ten conversations are answered and saved one after the other while another client
asks /health every 5 ms; each /health answer's time is recorded.

  idle   this build, no save: the machine's own noise;
  index  this build: the folder is read once in a thread, a save reads no metadata on the loop;
  scan   the same, plus what 5446c05's bound did after every kept save: read and parse every save's
         metadata on the event loop (`folder.scan`, called there).

Prints each one's /health p50 and worst, and the ratio.

  .venv/bin/python bench/bench_save_folder.py [N]          # (make bench runs it)
  .venv/bin/python bench/bench_save_folder.py --full-disk   # root: a 30 MB tmpfs and the real llama-server
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from orchestrator.backends.gateway import GATEWAY
from orchestrator.configfile import config_from_dict
from orchestrator.http.app import create_app, start
from orchestrator.kv import folder as kv_folder
from orchestrator.kv import store
from testkit.engine import FakeEngine

K_SHA256 = hashlib.sha256(b"k").hexdigest()
PROPS = {"model_path": "/models/m.gguf", "n_ctx": 4096, "build_info": "b1-fake",
         "default_generation_settings": {"n_ctx": 4096}}


def plant(folder: Path, n: int) -> None:
    ids = {"model": PROPS["model_path"], "n_ctx": 4096, "build": PROPS["build_info"], "model_file": "",
           "kv_args": "", "lora": "", "probe": FakeEngine.probe}
    now = time.time() - 86400
    for i in range(n):
        key = f"{i:032x}"
        (folder / f"{key}-1.bin").write_bytes(b"k")
        (folder / f"{key}.json").write_text(json.dumps({
            "key": key, "file": f"{key}-1.bin", "bytes": 1, "n_tokens": 1, "time": now + i,
            "sha256": K_SHA256, "slot": 0, "prefix": [f"{j:016x}" for j in range(24)], **ids}))


async def run(n: int, scan_on_loop: bool, saves: int = 10) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        plant(folder, n)
        engine = FakeEngine(folder=folder, props=dict(PROPS), slot_tokens=0)
        runner = web.AppRunner(engine.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        config = config_from_dict({"backends": [{"name": "primary", "url": url, "kv_save_dir": str(folder),
                                                 "kv_save_idle_seconds": 0, "kv_save_max_files": n + 100}],
                                   "gateway": {"health_interval_seconds": 0.5}})
        app = create_app(config, CollectorRegistry())
        gw_runner = await start(app, "127.0.0.1", 0)
        base = "http://%s:%d" % gw_runner.addresses[0][:2]
        gw = app[GATEWAY]
        real_keep = store.KvPersistence._keep

        async def keep_then_scan(self, b, conversation, tokens, written):
            result = await real_keep(self, b, conversation, tokens, written)
            t = time.monotonic()
            found = kv_folder.scan(b.folder, set(b.pending))  # 5446c05's bound, on the loop
            scans.append((len(found), time.monotonic() - t))
            return result

        if scan_on_loop:
            store.KvPersistence._keep = keep_then_scan
        gaps: list[float] = []
        scans: list[tuple[int, float]] = []
        try:
            async with aiohttp.ClientSession() as http:
                while True:
                    async with http.get(base + "/health") as r:
                        if (await r.json())["backends"][0]["state"] == "ready":
                            break
                    await asyncio.sleep(0.05)
                done = threading.Event()

                def poll() -> None:  # another client, in a thread of its own: it sees the loop stand still
                    while not done.is_set():
                        t = time.monotonic()
                        with urllib.request.urlopen(base + "/health") as r:
                            r.read()
                        gaps.append(time.monotonic() - t)
                        time.sleep(0.005)

                poller = asyncio.ensure_future(asyncio.to_thread(poll))
                if not saves:  # the same polling, nothing saved: what this machine gives idle
                    await asyncio.sleep(1.0)
                for i in range(saves):
                    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": f"conversation {i}"}]}
                    async with http.post(base + "/v1/messages", json=body) as r:
                        await r.read()
                    saved = gw.metrics.registry.get_sample_value
                    while (saved("orchestrator_kv_saves_total", {"backend": "primary", "result": "saved"}) or 0) < i + 1:
                        await asyncio.sleep(0.01)
                done.set()
                await poller
        finally:
            store.KvPersistence._keep = real_keep
            if scans:
                print(f"  scans on the loop: {len(scans)}, {scans[0][0]:,} saves read in "
                      f"{statistics.median(s for _, s in scans) * 1000:.0f} ms (median)")
            await gw_runner.cleanup()
            await runner.cleanup()
    return gaps


async def full_disk(root: Path) -> None:
    """Seven conversations saved by the real llama-server into a 30 MB tmpfs (5446c05: the first two
    filled it, and every later save failed with llama-server's 500 while the old saves stayed)."""
    from testkit.servers import LlamaServer

    mount = root / "kv30"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mount)], check=True)
    server = LlamaServer(root, ("--slot-save-path", str(mount)))
    try:
        await asyncio.to_thread(server.start)
        config = config_from_dict({"backends": [{"name": "primary", "url": server.url, "kv_save_dir": str(mount),
                                                 "kv_save_idle_seconds": 0}]})
        app = create_app(config, CollectorRegistry())
        gw_runner = await start(app, "127.0.0.1", 0)
        base = "http://%s:%d" % gw_runner.addresses[0][:2]
        gw = app[GATEWAY]
        results = ("saved", "failed", "no_room")

        def counts() -> dict[str, float]:
            return {r: gw.metrics.registry.get_sample_value(
                "orchestrator_kv_saves_total", {"backend": "primary", "result": r}) or 0 for r in results}

        async with aiohttp.ClientSession() as http:
            while (await (await http.get(base + "/health")).json())["backends"][0]["state"] != "ready":
                await asyncio.sleep(0.1)
            for i in range(7):
                # About 300 tokens: a save of about 7 MB with SmolLM2, four of them fill the disk.
                body = {"model": "m", "max_tokens": 4, "system": "You are a helpful assistant.",
                        "messages": [{"role": "user", "content": f"Conversation {i}. " + "Tell me about caches. " * 50}]}
                before = sum(counts().values())
                async with http.post(base + "/v1/messages", json=body) as r:
                    status = r.status
                    await r.read()
                while sum(counts().values()) == before:
                    await asyncio.sleep(0.05)
                free = shutil.disk_usage(mount).free
                files = sorted(p.name for p in mount.glob("*.bin"))
                print(f"conversation {i}: HTTP {status}; saves {counts()}; {len(files)} on disk; "
                      f"{free / 1e6:.1f} MB free")
            async with http.get(base + "/health") as r:
                print("kv_folder:", (await r.json())["backends"][0]["kv_folder"])
        await gw_runner.cleanup()
    finally:
        server.stop()
        subprocess.run(["umount", str(mount)], check=False)


def main() -> None:
    if "--full-disk" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(full_disk(Path(tmp)))
        return
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 20_000
    rows = {}
    for name, scan, saves in (("idle", False, 0), ("index", False, 10), ("scan", True, 10)):
        gaps = asyncio.run(run(n, scan, saves))
        rows[name] = (statistics.median(gaps) * 1000, max(gaps) * 1000, len(gaps))
        print(f"{name:6} {n:,} saves: /health p50 {rows[name][0]:.1f} ms, worst {rows[name][1]:.1f} ms "
              f"({rows[name][2]} answers during {saves} saves)")
    print(f"worst /health: index / idle {rows['index'][1] / rows['idle'][1]:.1f}x, "
          f"scan / index {rows['scan'][1] / rows['index'][1]:.1f}x")


if __name__ == "__main__":
    main()
