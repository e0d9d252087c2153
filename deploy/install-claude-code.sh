#!/usr/bin/env bash
# Prints the path of a `claude` (Claude Code CLI): $CLAUDE_BIN, the one on PATH,
# else a copy installed from npm into the cache (once; reused after). The version
# is pinned so tests that drive its terminal UI see the same screens: 2.1.197 is
# what npm resolves on Node 20 (every later release declares engines.node >= 22,
# and npm skips the `latest` tag for the newest release whose engines fit), and
# runs there.
#
# CLAUDE_CODE_VERSION=X.Y.Z asks for another release: the one on PATH is taken
# only if it is that version, and each version is cached in its own folder, so
# switching back and forth never reinstalls. Releases after 2.1.197 install on
# Node 20 with an npm EBADENGINE warning and run: the package is a native binary
# (from an optional dependency); Node runs only its postinstall, which links it.
#
# The cached copy is not on PATH: run it with `make claude`, or
# `eval "$(.venv/bin/orchestrator env)"`, which puts its folder on PATH; another
# version with CLAUDE_BIN="$(CLAUDE_CODE_VERSION=X.Y.Z deploy/install-claude-code.sh)".
# stdout carries only the path, for $(...) callers; what it fetches goes to stderr.
set -euo pipefail
DEFAULT_VERSION=2.1.197
VERSION="${CLAUDE_CODE_VERSION:-$DEFAULT_VERSION}"
# An exact version only: a tag or a range would never match the installed
# copy's `--version`, and would reinstall on every call.
if ! [[ "$VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.-]+)?$ ]]; then
  echo "Claude Code: CLAUDE_CODE_VERSION must be an exact version such as $DEFAULT_VERSION, got '$VERSION'" \
       "(npm view @anthropic-ai/claude-code versions lists them)" >&2
  exit 2
fi
if [ -n "${CLAUDE_BIN:-}" ]; then echo "$CLAUDE_BIN"; exit 0; fi
if ON_PATH="$(command -v claude 2>/dev/null)" && { [ -z "${CLAUDE_CODE_VERSION:-}" ] ||
    "$ON_PATH" --version 2>/dev/null | grep -q "^$VERSION "; }; then
  echo "$ON_PATH"; exit 0
fi
ROOT_CACHE="${ORCHESTRATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orchestrator}"
# The default keeps the folder it always had: `orchestrator claude` and
# `orchestrator env` look for it there.
if [ "$VERSION" = "$DEFAULT_VERSION" ]; then CACHE="$ROOT_CACHE/claude-code"; else CACHE="$ROOT_CACHE/claude-code-$VERSION"; fi
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
  # Without its postinstall (an npm that blocks install scripts), bin/claude is
  # only a placeholder that does not run.
  if ! INSTALLED="$("$BIN" --version 2>&1)" || ! grep -q "^$VERSION " <<<"$INSTALLED"; then
    echo "Claude Code: $BIN does not run as $VERSION after npm install (it said: $INSTALLED); the last 30 lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
  echo "Claude Code: installed $INSTALLED" >&2
fi
echo "$BIN"
