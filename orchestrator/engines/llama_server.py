"""What the gateway knows of llama-server: its process under supervisord, where it saves its slots,
and its slot's actions (save, restore) and what the slot holds.

The two calls the KV store makes to the server about slot 0, each with its bound, each turning every
failure into a GatewayError (an action) or "nothing held" (the tokens), never raising past that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import BackendConfig
from ..errors import GatewayError
from .upstream import UpstreamClient, read_whole

# Only slot 0 is saved and restored: a workstation runs --parallel 1.
SLOT = 0
PROPS_TIMEOUT = 5.0
# llama-server answers a slot action with a small JSON object.
MAX_ACTION_ANSWER_BYTES = 64 * 1024


async def slot_action(upstream: UpstreamClient, backend: BackendConfig, action: str, filename: str,
                      timeout: float) -> dict[str, Any]:
    """POST /slots/0?action=...; its JSON answer, or a GatewayError saying why not."""
    data = json.dumps({"filename": filename}).encode()
    async with upstream.post(backend, f"/slots/{SLOT}?action={action}", data,
                             {"Content-Type": "application/json"}, timeout=timeout) as resp:
        raw = await read_whole(resp, MAX_ACTION_ANSWER_BYTES, backend)
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        answer = {}
    if resp.status != 200 or not isinstance(answer, dict):
        message = (answer.get("error") or {}).get("message") if isinstance(answer, dict) else None
        raise GatewayError(f"HTTP {resp.status}: {message or raw[:200]!r}")
    return answer


async def slot_tokens(upstream: UpstreamClient, backend: BackendConfig) -> int:
    """Tokens slot 0's last task had as its prompt (0 when empty or unknown). llama-server shows 0
    after a restore, whatever the restore put back."""
    try:
        status, slots = await upstream.get_json(backend, "/slots", timeout=PROPS_TIMEOUT)
    except GatewayError:
        return 0
    if status != 200 or not isinstance(slots, list):
        return 0
    for s in slots:
        if isinstance(s, dict) and s.get("id") == SLOT and isinstance(s.get("n_prompt_tokens"), int):
            return s["n_prompt_tokens"]
    return 0


# ---- its process and its save folder -------------------------------------------------------------

def program_name(backend: BackendConfig) -> str:
    return f"llama-{backend.name}"


def slot_dir(var: Path, backend: BackendConfig) -> Path:
    """A backend's slot save folder: its kv_save_dir, else var/slots/NAME."""
    return Path(backend.kv_save_dir) if backend.kv_save_dir else var / "slots" / backend.name


def saves_slots(backend: BackendConfig) -> bool:
    """Supervised main backends save by default; a server run by someone else only with its folder
    named. A background model has no conversation worth keeping."""
    return backend.role == "main" and backend.kv_save and bool(backend.command or backend.kv_save_dir)
