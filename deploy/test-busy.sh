#!/usr/bin/env bash
# The whole suite on a busy machine: `make test` RUNS times in a row (default 3) beside BURNERS
# processes (default 2) that each keep a core busy, as CI's machine may be. A test that passes only
# when the machine beats a clock fails here. Prints each run's pytest summary and wall time, and
# exits non-zero if any run failed.
#   deploy/test-busy.sh            # or: make test-busy RUNS=1 BURNERS=2 PYTEST_ARGS='-m real'
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
BURNERS="${BURNERS:-2}"
LOGS="${LOGS:-var/test-busy}"
mkdir -p "$LOGS"
burners=()
stop_burners() { [ ${#burners[@]} -gt 0 ] && kill "${burners[@]}" 2>/dev/null; wait 2>/dev/null; }
trap stop_burners EXIT
for _ in $(seq "$BURNERS"); do
  # A busy loop in its own process: one core's worth of other work, at the default priority.
  sh -c 'while :; do :; done' &
  burners+=($!)
done
failed=0
for run in $(seq "$RUNS"); do
  start=$(date +%s)
  if make test >"$LOGS/run-$run.log" 2>&1; then rc=0; else rc=$?; failed=1; fi
  took=$(( $(date +%s) - start ))
  summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$LOGS/run-$run.log" | tail -n 1)
  echo "run $run/$RUNS beside $BURNERS burners: exit $rc in ${took}s: ${summary:-no pytest summary} (log: $LOGS/run-$run.log)"
done
exit "$failed"
