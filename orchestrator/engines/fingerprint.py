"""Which server a save may go back into, when its command line is not known: its answer to a probe.

A save restores only into a server that computes the KV cache as the one that wrote it. A supervised
llama-server's KV-changing options are read from its configured command (kv/server_id.py); a server
run by hand (a backend with only `kv_save_dir`) has none, and /props reports neither rope nor cache
types. Issue 28 restored a default server's save into a `--rope-freq-base 5000` one: 631 tokens
came from cache, and the model answered garbage.

So when such a server starts (its slot empty), the gateway sends it one fixed prompt of 31 tokens
with `n_probs` and reads the log-probabilities of its five likeliest next tokens. Measured on
SmolLM2-135M (2 cores): the same server, with 1 thread or with 2, answers the same figures to three
decimals; `--rope-freq-base 90000` instead of its 100000 moves one by 0.08, 5000 by 0.7, a q8_0 K
cache by 0.07. Figures within `TOLERANCE` of each other are the same server; a save is written with
the server's figures and restored only where they match. The probe costs one prefill of 31 tokens
at the start (0.4-1.3 s on that machine, loaded). When the slot was not empty (the gateway restarted,
the server did not) the probe would overwrite it: the server's identity is then a token of this
up-period only, and its saves restore into this process alone, never after a restart.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

PROMPT = "The gateway keeps a conversation's cache on disk. " * 3
TOP = 5
# The largest difference in a log-probability that still counts as the same server.
TOLERANCE = 0.02
UNKNOWN = "unknown:"


def request_body() -> bytes:
    """The probe: one token, greedy, its five likeliest tokens' log-probabilities, no prompt cache."""
    return json.dumps({"prompt": PROMPT, "n_predict": 1, "n_probs": TOP, "temperature": 0,
                       "cache_prompt": False}).encode()


def of_answer(answer: Any) -> str | None:
    """'ID:LOGPROB,...' of llama-server's /completion answer, None when it has no such figures."""
    try:
        top = answer["completion_probabilities"][0]["top_logprobs"]
        pairs = [(int(t["id"]), float(t["logprob"])) for t in top[:TOP]]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return ",".join(f"{i}:{p:.3f}" for i, p in pairs) if len(pairs) == TOP else None


def unknown() -> str:
    """An identity for a server whose figures could not be taken: equal to nothing but itself."""
    return UNKNOWN + secrets.token_hex(8)


def same(saved: Any, server: str) -> bool:
    """Whether a save's probe figures are this server's (an unknown identity: only itself)."""
    if not isinstance(saved, str):
        return False
    if saved == server:
        return True
    if saved.startswith(UNKNOWN) or server.startswith(UNKNOWN) or not saved or not server:
        return False
    try:
        a = [(int(i), float(p)) for i, p in (x.split(":") for x in saved.split(","))]
        b = [(int(i), float(p)) for i, p in (x.split(":") for x in server.split(","))]
    except ValueError:
        return False
    return len(a) == len(b) and all(i == j and abs(p - q) <= TOLERANCE for (i, p), (j, q) in zip(a, b))
