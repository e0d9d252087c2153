"""The operator's tools: the CLI, supervisord for the stack, `status`, the event listener, Grafana,
Claude Code's environment."""
