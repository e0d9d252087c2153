#!/usr/bin/env bash
# Usage: ensure-tools.sh CMD[:DEBIAN_PACKAGE] ...
# Installs, with Debian's apt, the package of every command not on PATH.
# Without apt (macOS) or root it names what is missing and exits 1.
# Services are not started during the install (policy-rc.d 101): the stack runs
# its own Prometheus under supervisord, and a system one would take port 9090,
# the gateway's.
# apt's output goes to a log file in the cache; its last lines are shown if it fails.
set -euo pipefail
missing=()
for spec in "$@"; do
  cmd="${spec%%:*}"; pkg="${spec#*:}"
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "missing: ${missing[*]} (no apt-get, or not root): install them yourself (macOS: brew install ${missing[*]})" >&2
  exit 1
fi
CACHE="${ORCHESTRATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orchestrator}"
mkdir -p "$CACHE"
LOG="$CACHE/apt-install.log"
echo "fetching with apt: ${missing[*]} (apt-get update, then apt-get install; log: $LOG)..." >&2
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; made_policy=1
fi
trap '[ "$made_policy" = 1 ] && rm -f "$policy"' EXIT
if ! { apt-get update -qq &&
       DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$LOG" 2>&1; then
  echo "apt-get failed; the last 30 lines of $LOG:" >&2
  tail -n 30 "$LOG" >&2
  exit 1
fi
