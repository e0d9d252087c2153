#!/usr/bin/env bash
# Makes sure `prometheus` and `promtool` are on PATH: Debian's package where apt
# is available, else whatever is installed (macOS: brew install prometheus).
# Without a service start: the stack runs its own Prometheus under supervisord,
# and a system one would take port 9090, the gateway's.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's prometheus package..." >&2
  # policy-rc.d 101: packages may not start services during this install.
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; made_policy=1
  fi
  trap '[ "$made_policy" = 1 ] && rm -f "$policy"' EXIT
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >&2
  exit 0
fi
echo "prometheus not found and apt-get unavailable (or not root): install Prometheus yourself" \
     "(macOS: brew install prometheus); the stack runs without it" >&2
exit 1
