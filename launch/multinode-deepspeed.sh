#!/usr/bin/env bash
# Multi-node pretraining with the DeepSpeed launcher (ssh to every host in the hostfile).
#   HOSTFILE=launch/hostfile MASTER_ADDR=node-001 launch/multinode-deepspeed.sh CONFIG [key=value ...]
# Environment variables listed in ./.deepspeed_env (NAME=value lines) are exported on every node;
# put the NCCL settings there (see launch/README.md).
set -euo pipefail
: "${HOSTFILE:=launch/hostfile}" "${MASTER_PORT:=29500}"
: "${MASTER_ADDR:=$(grep -v '^#' "$HOSTFILE" | awk 'NF {print $1; exit}')}"
# --no_local_rank: ranks read LOCAL_RANK from the environment; sslmed's CLI takes no --local_rank.
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --no_local_rank --module sslmed pretrain "$@"
