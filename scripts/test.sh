#!/usr/bin/env bash
# Run the whole test suite on this machine (CPU is enough): installs what it needs into .venv.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config -x`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/setup_env.sh"
bash "$ROOT/scripts/setup_system.sh"  # sshd and pdsh for the multi-host tests (root + apt-get), once
cd "$ROOT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q "$@"
