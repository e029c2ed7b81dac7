#!/usr/bin/env bash
# Launch mtnlg on several nodes with the deepspeed launcher (pdsh over ssh).
#
#   bash examples/launch_multinode.sh examples/hostfile examples/llama_1b.yaml [--set key=value ...]
#
# Run it on the first node of the hostfile. The launcher ssh-es into every host (the first one too)
# and starts one process per slot; all nodes need the same checkout and .venv at the same path, and
# passwordless ssh between them.
# Variables:
#   MASTER_ADDR  address of the first node that the others can reach (default: first host)
#   MASTER_PORT  a free TCP port on it (default 29500)
#   GLOO_SOCKET_IFNAME  (CPU/gloo) and NCCL_SOCKET_IFNAME / NCCL_IB_HCA (GPUs): your cluster network's
#                interfaces. mtnlg picks gloo's itself (the interface routing to MASTER_ADDR) when unset.
#   These, OMP_NUM_THREADS, TORCH_EXTENSIONS_DIR and HF_HUB_OFFLINE reach every rank on every node
#   through the environment file the launcher reads: DS_ENV_FILE (default: .deepspeed_env in the checkout).
#   EXTRA        more launcher flags, e.g. "--no_ssh_check" (needed when testing on localhost)
#   MTNLG_VENV   the virtual environment (default: .venv in the checkout)
set -euo pipefail
HOSTFILE=${1:?usage: launch_multinode.sh HOSTFILE CONFIG [--set k=v ...]}
CONFIG=${2:?usage: launch_multinode.sh HOSTFILE CONFIG [--set k=v ...]}
shift 2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FIRST_HOST=$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')
MASTER_ADDR=${MASTER_ADDR:-$FIRST_HOST}
MASTER_PORT=${MASTER_PORT:-29500}
ENV_FILE=${DS_ENV_FILE:-$ROOT/.deepspeed_env}
export DS_ENV_FILE=$ENV_FILE
# DeepSpeed's runner forwards only PYTHON*, UCX*, MV2* and MLFLOW* by itself; variables listed here reach every rank.
: > "$ENV_FILE"
for v in GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_DEBUG OMP_NUM_THREADS TORCH_EXTENSIONS_DIR \
         HF_HUB_OFFLINE; do
  if [ -n "${!v:-}" ]; then echo "$v=${!v}" >> "$ENV_FILE"; fi
done
cd "$ROOT"
# shellcheck disable=SC2086
exec "${MTNLG_VENV:-$ROOT/.venv}/bin/deepspeed" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" ${EXTRA:-} scripts/pretrain_gpt.py --config "$CONFIG" "$@"
