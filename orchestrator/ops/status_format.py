"""How `orchestrator status` writes its figures: numbers, durations, bucket bounds, times."""

from __future__ import annotations

import math
import time


class Bound:
    """Where a quantile lies in a histogram: at most `le` (and above the bucket bound below it);
    `le` is +Inf when it lies past the largest finite bound, `top`."""

    def __init__(self, le: float, top: float) -> None:
        self.le, self.top = le, top

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bound) and (self.le, self.top) == (other.le, other.top)

    def __repr__(self) -> str:
        return f"Bound(le={self.le!r}, top={self.top!r})"


def num(v: float) -> str:
    return f"{v:g}"


def duration(seconds: float) -> str:
    """An exact duration (a mean) to three significant figures, in ms below a second."""
    v, unit = (seconds * 1000, "ms") if seconds < 1 else (seconds, "s")
    digits = 0 if v >= 100 else 1 if v >= 10 else 2
    return f"{v:.{digits}f} {unit}"


def bound_seconds(b: Bound | None) -> str:
    if b is None:
        return "-"

    def fmt(le: float) -> str:
        return f"{round(le * 1000, 6):g} ms" if le < 1 else f"{le:g} s"
    return f"> {fmt(b.top)}" if math.isinf(b.le) else f"<= {fmt(b.le)}"


def bound_plain(b: Bound | None) -> str:
    if b is None:
        return "-"
    return f"> {b.top:g}" if math.isinf(b.le) else f"<= {b.le:g}"


def span(seconds: float) -> str:
    s = max(round(seconds), 0)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    s = int(now - ts)
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def clock(ts: float, now: float) -> str:
    """HH:MM:SS local time; with the date when not today."""
    t = time.localtime(ts)
    same_day = t[:3] == time.localtime(now)[:3]
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", t)


def counts(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {num(v)}" for k, v in d.items() if v)
