#!/usr/bin/env bash
# Run the whole test suite on this machine (CPU is enough): installs what it needs into .venv.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config -x`.
# Tests run on MTNLG_TEST_WORKERS parallel workers (pytest-xdist; default 3 on this 2-core machine: tests wait on
# their ranks, launchers and timeouts, so 2 workers left the cores partly idle; with 3 they are busy ~100% of the
# run, and a full run took 1459 s against 1640 s with 2, back to back on 2026-12-07); 0 = in the pytest process.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/setup_env.sh"
bash "$ROOT/scripts/setup_system.sh"  # sshd and pdsh for the multi-host tests (root + apt-get), once
cd "$ROOT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORKERS=${MTNLG_TEST_WORKERS:-3}
if [ "$WORKERS" -gt 0 ]; then
  exec python -m pytest -q -n "$WORKERS" "$@"  # a file per worker: tests/conftest.py
fi
exec python -m pytest -q "$@"
