#!/usr/bin/env bash
# Make .venv ready to run mtnlg: create it once, install torch (a CPU build when this machine
# has no NVIDIA GPU, so no multi-GB CUDA download), then mtnlg itself with its dev extras.
# Sourced by scripts/test.sh and scripts/run_example.sh; safe to run again (does nothing new).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MTNLG_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${MTNLG_TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  extra=()
  if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    # No GPU: prefer PyTorch's CPU wheels when their index is reachable (PyPI's Linux wheels bundle CUDA).
    if "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" 2>/dev/null; then
      extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
    fi
  fi
  echo "[setup] installing torch==$TORCH_VERSION ${extra[*]:-}"
  "${PIP[@]}" install -q "torch==$TORCH_VERSION" "${extra[@]}"
fi

stamp="$VENV/.mtnlg-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/setup.cfg" -nt "$stamp" ]; then
  echo "[setup] installing mtnlg and its dependencies into $VENV"
  "${PIP[@]}" install -q -e "$ROOT[dev]"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
# ops DeepSpeed JIT-compiles stay with this venv (torch's cache is per user); CPU runs build none at start
# (mtnlg.deepspeed_compat.skip_shm_comm_op skips the shm all-reduce op, the one DeepSpeed would build there)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}
