"""orchestrator: run Claude Code against a local llama-server without flooding or crashing it."""

__version__ = "0.1.0"
