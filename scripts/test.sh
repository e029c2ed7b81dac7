#!/usr/bin/env bash
# Run the whole test suite on this machine (CPU is enough): installs what it needs into .venv.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config -x`.
# Tests run on MTNLG_TEST_WORKERS parallel workers (pytest-xdist; default 2: one test file spends much of its time
# waiting on its ranks, launchers or timeouts, so one worker kept ~40% of this 2-core machine busy; with 3 the cores
# were busy ~100% of a run, but two runs took 1459 and 1635 s against 1640 s with 2: within this machine's
# run-to-run spread, so the lighter load stays); 0 = in the pytest process, as before.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/setup_env.sh"
bash "$ROOT/scripts/setup_system.sh"  # sshd and pdsh for the multi-host tests (root + apt-get), once
cd "$ROOT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORKERS=${MTNLG_TEST_WORKERS:-2}
if [ "$WORKERS" -gt 0 ]; then
  exec python -m pytest -q -n "$WORKERS" "$@"  # a file per worker: tests/conftest.py
fi
exec python -m pytest -q "$@"
