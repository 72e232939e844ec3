#!/usr/bin/env bash
# Single-node (or one node of many) launch: launch/torchrun.sh CONFIG [--set key=value ...]
# NPROC (ranks on this node), NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT come from the
# environment. On a CPU each rank gets one thread (more oversubscribes the cores).
# Exit status: the training's; 75 means every rank wrote a checkpoint on a preemption signal
# and stopped (launch/elastic_run.py keeps that code, plain torchrun would turn it into 1).
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: launch/torchrun.sh CONFIG [--set key=value ...] (config file '${1:-}' not found)" >&2
  exit 2
fi
config=$1; shift
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
NPROC=${NPROC:-$(python3 -c 'import os; print(min(os.cpu_count() or 1, 4))')}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# Resolve and print the layout before any rank starts; a bad config stops here.
"$python" "$here/launch/resolve_config.py" "$config" "$((NPROC * NNODES))" "$@"

exec "$python" "$here/launch/elastic_run.py" \
  --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m efficientllm train --config "$config" "$@"
