#!/usr/bin/env bash
# Prints the path of a `claude` (Claude Code CLI): $CLAUDE_BIN, the one on PATH,
# else a copy installed from npm into the cache (once; reused after). The version
# is pinned so tests that drive its terminal UI see the same screens: 2.1.197 is
# what npm resolves on Node 20, and runs there.
#
# The cached copy is not on PATH: run it with `make claude`, or
# `eval "$(.venv/bin/orchestrator env)"`, which puts its folder on PATH.
# stdout carries only the path, for $(...) callers; what it fetches goes to stderr.
set -euo pipefail
VERSION="${CLAUDE_CODE_VERSION:-2.1.197}"
if [ -n "${CLAUDE_BIN:-}" ]; then echo "$CLAUDE_BIN"; exit 0; fi
if command -v claude >/dev/null 2>&1; then command -v claude; exit 0; fi
CACHE="${ORCHESTRATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orchestrator}/claude-code"
BIN="$CACHE/node_modules/.bin/claude"
if [ ! -x "$BIN" ] || ! "$BIN" --version 2>/dev/null | grep -q "^$VERSION "; then
  # npm (and Node.js) with apt where it can, else it says what is missing.
  "$(dirname "$0")/ensure-tools.sh" node:nodejs npm
  mkdir -p "$CACHE"
  LOG="$CACHE/npm-install.log"
  echo "Claude Code: fetching @anthropic-ai/claude-code@$VERSION from npm into $CACHE (npm install; log: $LOG)..." >&2
  if ! npm install --no-fund --no-audit --no-progress --prefix "$CACHE" \
      "@anthropic-ai/claude-code@$VERSION" >"$LOG" 2>&1; then
    echo "Claude Code: npm install failed; the last 30 lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
  echo "Claude Code: installed $("$BIN" --version)" >&2
fi
echo "$BIN"
