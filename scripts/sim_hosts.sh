#!/usr/bin/env bash
# Simulated cluster nodes on this machine (root; tests/hosts.py): network namespaces on a private bridge
# (198.18.0.0/24), each with its own hostname, PID namespace and sshd, for trying multi-node launches by hand.
#   bash scripts/sim_hosts.sh up --hosts 2 --dir /tmp/sim [--private /tmp/sim/local]
#   bash scripts/sim_hosts.sh run --dir /tmp/sim host1 -- deepspeed --hostfile HOSTFILE --master_addr 198.18.0.11 ...
#   bash scripts/sim_hosts.sh down --dir /tmp/sim
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "${MTNLG_VENV:-$ROOT/.venv}/bin/python" -m tests.hosts "$@"
