#!/usr/bin/env bash
# Single-node (or one node of many) launch: launch/torchrun.sh CONFIG [--set key=value ...]
# NPROC (ranks on this node), NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT come from the
# environment. On a CPU each rank gets one thread (more oversubscribes the cores).
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
"$python" - "$config" "$((NPROC * NNODES))" "$@" <<'PY'
import sys
from efficientllm.config import ConfigError, load_config
config_path, world, *rest = sys.argv[1:]
overrides = [rest[i + 1] for i in range(len(rest) - 1) if rest[i] == "--set"]
try:
    c = load_config(config_path, overrides)
    c.validate(int(world))
except ConfigError as err:
    print(f"efficientllm: error: {err}", file=sys.stderr)
    sys.exit(2)
tp, pp = c.parallel.tensor_model_parallel_size, c.parallel.pipeline_model_parallel_size
print(f"layout: world {world} = TP {tp} x PP {pp} x DP {int(world) // (tp * pp)}")
PY

exec "$python" -m torch.distributed.run \
  --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m efficientllm train --config "$config" "$@"
