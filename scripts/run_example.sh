#!/usr/bin/env bash
# The main example: installs what it needs into .venv, then builds the default corpus, trains a
# small GPT in a 3D layout on 4 ranks, exports it to Hugging Face, evaluates and generates.
# Options: --iters N (default: examples/main.yaml), --out DIR (default runs/example).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python examples/main_example.py "$@"
