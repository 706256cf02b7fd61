#!/bin/sh
# The container's install steps, in one place: the Dockerfile's build stage runs this script, and
# tests/test_container.py runs it into a fresh virtualenv, so the image and CI cannot drift apart.
#
#   scripts/install-runtime.sh VENV [SRC]     # SRC: the source tree (default: .)
#
# Installs sparsedeploy (not editable) with the exact pins of constraints.txt, plus DeepSparse on x86-64,
# then checks the result. TORCH_INDEX (optional): an extra package index for the CPU-only torch wheel.
set -eu
venv="${1:?usage: scripts/install-runtime.sh VENV [SRC]}"
src="${2:-.}"
python="${PYTHON:-python3}"
extras=""
case "$(uname -m)" in
  x86_64|amd64) extras="[deepsparse]" ;;
esac
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --no-cache-dir --disable-pip-version-check ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} \
  -c "$src/constraints.txt" "$src$extras"
"$venv/bin/python" -m pip check
NM_DISABLE_ANALYTICS=1 "$venv/bin/python" -c "import sparsedeploy.serve.app, sparsedeploy.engine.worker"
