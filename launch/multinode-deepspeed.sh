#!/usr/bin/env bash
# Multi-node pretraining with the DeepSpeed launcher (pdsh over ssh to every host in the hostfile).
#   HOSTFILE=launch/hostfile MASTER_ADDR=node-001 launch/multinode-deepspeed.sh CONFIG [key=value ...]
# Every host must reach the others by the hostfile's names over passwordless ssh, and see the same
# sslmed install (this interpreter's path), the same working directory, run.dir and data.path.
# Optional: SOCKET_IFNAME (the interface that reaches the other nodes, for gloo and NCCL), PYTHON (the
# interpreter with sslmed installed; default: python on PATH), OMP_NUM_THREADS, SSH_PORT.
# The launcher passes only some variables to the other nodes (PYTHON*, and NCCL_* on GPUs): the ones
# above, and the NAME=value lines of ./.deepspeed_env (put NCCL settings there), travel in the
# environment file this script hands it. Cores are not bound to ranks (that needs numactl).
set -euo pipefail
: "${HOSTFILE:=launch/hostfile}" "${MASTER_PORT:=29500}" "${PYTHON:=python}"
: "${MASTER_ADDR:=$(grep -v '^#' "$HOSTFILE" | awk 'NF {print $1; exit}')}"

env_file=$(mktemp "${TMPDIR:-/tmp}/sslmed-deepspeed-env.XXXXXX")
trap 'rm -f "$env_file"' EXIT
{
  if [[ -f .deepspeed_env ]]; then grep -E '^[A-Za-z_][A-Za-z0-9_]*=' .deepspeed_env || true; fi
  if [[ -n "${SOCKET_IFNAME:-}" ]]; then
    echo "GLOO_SOCKET_IFNAME=$SOCKET_IFNAME"
    echo "NCCL_SOCKET_IFNAME=$SOCKET_IFNAME"
  fi
  if [[ -n "${OMP_NUM_THREADS:-}" ]]; then echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"; fi
} > "$env_file"

# --no_local_rank: ranks read LOCAL_RANK from the environment; sslmed's CLI takes no --local_rank.
DS_ENV_FILE=$env_file "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" ${SSH_PORT:+--ssh_port "$SSH_PORT"} \
  --no_local_rank --module sslmed pretrain "$@"
