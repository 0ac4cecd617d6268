#!/usr/bin/env bash
# Single- or multi-node pretraining under torchrun (one process per accelerator).
#   launch/torchrun.sh CONFIG [key=value ...]
# Multi-node: run the same command on every node with NNODES, NODE_RANK, MASTER_ADDR set, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-001 launch/torchrun.sh mae-base run.dir=/shared/runs/mae
set -euo pipefail
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m sslmed pretrain "$@"
