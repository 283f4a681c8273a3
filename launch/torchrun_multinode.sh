#!/usr/bin/env bash
# Multi-node DDP: run this once on every node, with the rendezvous taken from the environment.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#     launch/torchrun_multinode.sh recipes/default.yaml [--key.sub=value ...]
set -euo pipefail
RECIPE=${1:?usage: launch/torchrun_multinode.sh RECIPE [overrides...]}
shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" -m dstlm.cli fit \
  --config "$RECIPE" --trainer.devices="$NPROC_PER_NODE" --trainer.num_nodes="$NNODES" \
  --trainer.strategy="${STRATEGY:-ddp}" "$@"
