#!/usr/bin/env bash
# Prints the path of a `claude` (Claude Code CLI): the one on PATH, else a copy
# installed from npm into the cache (once; reused after). The version is pinned
# so tests that drive its terminal UI see the same screens: 2.1.197 is what npm
# resolves on Node 20, and runs there.
set -euo pipefail
VERSION="${CLAUDE_CODE_VERSION:-2.1.197}"
if [ -n "${CLAUDE_BIN:-}" ]; then echo "$CLAUDE_BIN"; exit 0; fi
if command -v claude >/dev/null 2>&1; then command -v claude; exit 0; fi
CACHE="${ORCHESTRATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orchestrator}/claude-code"
BIN="$CACHE/node_modules/.bin/claude"
if [ ! -x "$BIN" ] || ! "$BIN" --version 2>/dev/null | grep -q "^$VERSION "; then
  command -v npm >/dev/null 2>&1 || { echo "npm not found: install Node.js (Debian: apt-get install nodejs npm)" >&2; exit 1; }
  mkdir -p "$CACHE"
  echo "installing Claude Code from npm into $CACHE..." >&2
  npm install --silent --no-fund --no-audit --prefix "$CACHE" "@anthropic-ai/claude-code@$VERSION" >&2
fi
"$BIN" --version >&2
echo "$BIN"
