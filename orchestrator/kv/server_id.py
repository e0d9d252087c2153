"""What a KV save must match before it is restored: the server that wrote it, and its own bytes.

llama-server restores any file of the right shape: a save written with another
`--rope-freq-base` (same model path, context size and build) or with bytes
overwritten in place is `restored` and the model then answers garbage, which
is saved again under the same key. So a save records everything that changes
what the KV cache means, and a checksum of the file; both are checked first.

What changes the KV: the model file (its path, size and modification time:
a file replaced under the same name), the context size, the build, LoRA
adapters, and the command-line settings /props does not report (rope and
YaRN scaling, cache types, flash attention, SWA, control vectors, overridden
GGUF keys), taken from the backend's configured command. A server run by hand
(no command) is identified by what /props and /lora-adapters say. The engine
says which server it is (`Engine.server_id`, engines/llama_server.py); the
save records it, and here is what checks the file's bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# Read in chunks: a save is gigabytes on a big model and must not sit in memory whole.
_CHUNK = 4 * 1024 * 1024


def checksum(path: Path) -> str:
    """SHA-256 of the file (hashlib releases the interpreter while it hashes: run it in a thread)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
