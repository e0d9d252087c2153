"""What tests/ and bench/ share: one fake engine, one pass-through proxy, one SSE builder, one
supervisord `Stack`, one `post`, real llama-servers on free ports, Claude Code's request bodies, and
the scenarios a benchmark and a real-part test both run; and, so that no test file is over 420 lines,
the fuzzing's shared checks (`fuzz`) and the soak's traffic (`soak`). Not part of `orchestrator`:
installed beside it (pyproject.toml) so both folders import it without touching sys.path."""
