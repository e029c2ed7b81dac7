#!/usr/bin/env bash
# Launch mtnlg on several nodes with the deepspeed launcher.
#
#   bash examples/launch_multinode.sh examples/hostfile examples/llama_1b.yaml [--set key=value ...]
#
# The launcher ssh-es into every host of the hostfile and starts one process per slot; all
# nodes need the same checkout and .venv at the same path, and passwordless ssh between them.
# Variables:
#   MASTER_ADDR  address of the first node that the others can reach (default: first host)
#   MASTER_PORT  a free TCP port on it (default 29500)
#   NCCL_SOCKET_IFNAME / NCCL_IB_HCA   your fabric's interfaces (see NCCL's docs); exported to
#                every rank through the .deepspeed_env file that the launcher reads
#   EXTRA        more launcher flags, e.g. "--no_ssh_check" (needed when testing on localhost)
set -euo pipefail
HOSTFILE=${1:?usage: launch_multinode.sh HOSTFILE CONFIG [--set k=v ...]}
CONFIG=${2:?usage: launch_multinode.sh HOSTFILE CONFIG [--set k=v ...]}
shift 2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FIRST_HOST=$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')
MASTER_ADDR=${MASTER_ADDR:-$FIRST_HOST}
MASTER_PORT=${MASTER_PORT:-29500}
# Variables listed here reach every rank on every node.
: > "$ROOT/.deepspeed_env"
for v in NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_DEBUG OMP_NUM_THREADS HF_HUB_OFFLINE; do
  if [ -n "${!v:-}" ]; then echo "$v=${!v}" >> "$ROOT/.deepspeed_env"; fi
done
cd "$ROOT"
# shellcheck disable=SC2086
exec "$ROOT/.venv/bin/deepspeed" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  ${EXTRA:-} scripts/pretrain_gpt.py --config "$CONFIG" "$@"
