#!/usr/bin/env bash
# Run any recipe on N local processes with DDP (gloo on CPU, NCCL on GPUs).
#   launch/torchrun.sh NPROC RECIPE [--key.sub=value ...]
#   launch/torchrun.sh 2 recipes/default.yaml --trainer.max_steps=100
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC RECIPE [overrides...]}
RECIPE=${2:?usage: launch/torchrun.sh NPROC RECIPE [overrides...]}
shift 2
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# one BLAS thread per rank unless the caller chose otherwise (2 ranks on 2 cores)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m dstlm.cli fit \
  --config "$RECIPE" --trainer.devices="$NPROC" --trainer.strategy="${STRATEGY:-ddp}" "$@"
