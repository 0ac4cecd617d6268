#!/usr/bin/env bash
# Plain hosts: a Ray head on this machine, a Ray node on every host of HOSTFILE (over ssh), then
# `sslmed pack --ray` on that cluster; every Ray node is stopped at the end.
#   HOSTFILE=launch/hostfile launch/ray-pack-hosts.sh /shared/ct --out /shared/shards/ct --modality ct
# Every argument goes to `sslmed pack`. Every host needs passwordless ssh, the same sslmed install at
# the same path, and the inputs and --out at the same paths (shared storage).
set -euo pipefail
: "${HOSTFILE:=launch/hostfile}" "${RAY_PORT:=6379}"
head_ip=${HEAD_IP:-$(hostname --ip-address | awk '{print $1}')}
ray=$(command -v ray)  # the same install on every host
mapfile -t hosts < <(grep -v '^#' "$HOSTFILE" | awk 'NF {print $1}')

stop_all() {
  for host in "${hosts[@]}"; do ssh "$host" "$ray" stop || true; done
  "$ray" stop || true
}
trap stop_all EXIT
"$ray" start --head --node-ip-address="$head_ip" --port="$RAY_PORT" --include-dashboard=false
for host in "${hosts[@]}"; do
  ssh "$host" "$ray" start --address="$head_ip:$RAY_PORT"
done
python -m sslmed pack "$@" --ray "$head_ip:$RAY_PORT"
