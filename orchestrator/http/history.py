"""The last hour of the gateway's own figures, in memory: what the dashboard's charts draw.

Finished requests are added to fixed time buckets (`step` seconds each, `span` seconds kept), so
memory stays bounded whatever the traffic: 360 buckets of a few numbers for an hour at 10 s.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Bucket:
    start: float             # wall-clock seconds, a multiple of step
    requests: int = 0
    wait_sum: float = 0.0    # arrival to slot grant, over requests that got a slot
    waited: int = 0
    ttft_sum: float = 0.0
    ttfts: int = 0
    cached: int = 0          # prompt tokens read from the cache
    computed: int = 0        # prompt tokens computed
    output: int = 0
    gen_seconds: float = 0.0  # first token to end, over requests with output

    def view(self) -> dict[str, Any]:
        prompt = self.cached + self.computed
        return {"t": self.start, "requests": self.requests,
                "wait": round(self.wait_sum / self.waited, 3) if self.waited else None,
                "ttft": round(self.ttft_sum / self.ttfts, 3) if self.ttfts else None,
                "hit": round(self.cached / prompt, 3) if prompt else None,
                "tps": round(self.output / self.gen_seconds, 1) if self.gen_seconds > 0 else None}


class History:
    def __init__(self, span: float = 3600.0, step: float = 10.0, clock: Callable[[], float] = time.time):
        self.step, self.clock = step, clock
        self.buckets: deque[Bucket] = deque(maxlen=int(span // step))

    def _bucket(self) -> Bucket:
        start = self.clock() // self.step * self.step
        if not self.buckets or self.buckets[-1].start < start:
            self.buckets.append(Bucket(start))
        return self.buckets[-1]

    def add(self, view: dict[str, Any]) -> None:
        """One finished request, as `inflight.Entry.view` shows it."""
        b = self._bucket()
        b.requests += 1
        if view.get("backend") and view.get("state") == "done" and view.get("in_state") is not None:
            b.wait_sum += view["wait"]
            b.waited += 1
        if view.get("ttft") is not None:
            b.ttft_sum += view["ttft"]
            b.ttfts += 1
        b.cached += view.get("cached") or 0
        b.computed += view.get("computed") or 0
        if view.get("tps"):
            b.output += view["output"]
            b.gen_seconds += view["output"] / view["tps"]

    def snapshot(self) -> dict[str, Any]:
        horizon = self.clock() - self.step * self.buckets.maxlen
        return {"step": self.step, "points": [b.view() for b in self.buckets if b.start >= horizon]}
