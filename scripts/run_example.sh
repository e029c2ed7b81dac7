#!/usr/bin/env bash
# The main example: installs what it needs into .venv, then trains a small GPT on CPU (or GPU).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python examples/quickstart.py "$@"
