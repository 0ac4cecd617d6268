#!/usr/bin/env bash
# Single- or multi-node pretraining under torchrun (one process per accelerator).
#   launch/torchrun.sh CONFIG [key=value ...]
# Multi-node: run the same command on every node with NNODES, NODE_RANK, MASTER_ADDR set, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-001 launch/torchrun.sh mae-base run.dir=/shared/runs/mae
# Optional: SOCKET_IFNAME (the interface that reaches the other nodes, for gloo and NCCL), MAX_RESTARTS
# (torchrun restarts the node's workers this many times after one fails; they resume from the last
# checkpoint: see launch/README.md for where that helps), PYTHON (the interpreter that has sslmed installed; default: python on PATH).
set -euo pipefail
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
: "${MAX_RESTARTS:=0}" "${PYTHON:=python}"
if [[ -n "${SOCKET_IFNAME:-}" ]]; then
  export GLOO_SOCKET_IFNAME=$SOCKET_IFNAME NCCL_SOCKET_IFNAME=$SOCKET_IFNAME
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max_restarts "$MAX_RESTARTS" \
  -m sslmed pretrain "$@"
