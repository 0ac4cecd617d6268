#!/usr/bin/env bash
# Two simulated nodes on one Linux machine, to try a multi-node launch without a cluster (needs root).
# Each node is a network namespace with its own address and hostname, joined to the other by a veth
# pair; each resolves both node names (NAME-0, NAME-1); the file system is shared, as a cluster's
# shared storage would be.
#
#   launch/simnodes.sh up NAME              nodes NAME-0 (10.77.0.1) and NAME-1 (10.77.0.2)
#   launch/simnodes.sh exec NAME N CMD...   run CMD on node N (interface `simnet`, hostname NAME-N)
#   launch/simnodes.sh cut NAME N           take node N's link down (what a crashed host looks like)
#   launch/simnodes.sh heal NAME N          bring node N's link back up
#   launch/simnodes.sh kill NAME N          SIGKILL every process of node N
#   launch/simnodes.sh down NAME            kill every process on both nodes, delete both namespaces
#   launch/simnodes.sh check NAME           exit 1 (naming it) if a namespace or process of NAME is left
#
# Example, two nodes × one rank under torchrun (launch/torchrun.sh), as on a cluster:
#   launch/simnodes.sh up demo
#   for n in 0 1; do
#     launch/simnodes.sh exec demo $n env NNODES=2 NODE_RANK=$n MASTER_ADDR=10.77.0.1 NPROC_PER_NODE=1 \
#       SOCKET_IFNAME=simnet launch/torchrun.sh mae-tiny data.path=DIR run.dir=/tmp/demo-run &
#   done; wait
#   launch/simnodes.sh down demo
set -euo pipefail

SUBNET=${SIMNODES_SUBNET:-10.77.0}  # private to the namespaces: nothing outside them is contacted
IFNAME=simnet

usage() { sed -n '2,14p' "$0" >&2; exit 2; }
die() { echo "simnodes: $*" >&2; exit 2; }

node_ns() {  # NAME N → the namespace of node N
  [[ "$2" == 0 || "$2" == 1 ]] || die "node must be 0 or 1, got '$2'"
  echo "$1-$2"
}

up() {
  local name=$1 n
  [[ "$name" =~ ^[A-Za-z0-9_.-]{1,40}$ ]] || die "name must be letters, digits, '_', '.', '-'"
  if ip netns list | grep -q "^$name-[01]\b"; then die "nodes '$name' exist already (down first)"; fi
  trap 'down "$name"' ERR  # never leave half a setup behind
  ip netns add "$name-0"
  ip netns add "$name-1"
  ip link add "$IFNAME" netns "$name-0" type veth peer name "$IFNAME" netns "$name-1"
  for n in 0 1; do
    # `ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts: each node resolves both node names
    mkdir -p "/etc/netns/$name-$n"
    printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "$SUBNET.1" "$name-0" "$SUBNET.2" "$name-1" \
      > "/etc/netns/$name-$n/hosts"
    ip -n "$name-$n" addr add "$SUBNET.$((n + 1))/24" dev "$IFNAME"
    ip -n "$name-$n" link set "$IFNAME" up
    ip -n "$name-$n" link set lo up
  done
  trap - ERR
}

exec_on() {
  local ns
  ns=$(node_ns "$1" "$2")
  shift 2
  [[ $# -gt 0 ]] || die "exec: no command"
  # own UTS namespace: the node's hostname is its own (launchers and logs name hosts by it)
  exec ip netns exec "$ns" unshare --uts -- sh -c 'hostname "$0" && exec "$@"' "$ns" "$@"
}

kill_node() {
  local ns pids
  ns=$(node_ns "$1" "$2")
  pids=$(ip netns pids "$ns" 2>/dev/null || true)
  [[ -z "$pids" ]] || kill -9 $pids 2>/dev/null || true
}

down() {
  local name=$1 n pids status=0
  for n in 0 1; do
    ip netns list | grep -q "^$name-$n\b" || continue
    # processes keep a namespace alive; kill until none is left (children may be mid-fork)
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      pids=$(ip netns pids "$name-$n" 2>/dev/null || true)
      [[ -n "$pids" ]] || break
      kill -9 $pids 2>/dev/null || true
      sleep 0.2
    done
    if [[ -n "$pids" ]]; then  # keep the name, so that `check` reports what survived
      echo "simnodes: processes $pids on $name-$n survive SIGKILL" >&2; status=1; continue
    fi
    ip netns del "$name-$n"  # the veth pair goes with its namespaces
  done
  rm -rf "/etc/netns/$name-0" "/etc/netns/$name-1"
  return $status
}

check() {
  local name=$1 n left=0
  for n in 0 1; do
    if ip netns list | grep -q "^$name-$n\b"; then
      echo "simnodes: namespace $name-$n is left (processes: $(ip netns pids "$name-$n" | xargs))" >&2
      left=1
    fi
    if [[ -e "/etc/netns/$name-$n" ]]; then echo "simnodes: /etc/netns/$name-$n is left" >&2; left=1; fi
  done
  return $left
}

[[ $# -ge 2 ]] || usage
command=$1; shift
case "$command" in
  up) up "$1" ;;
  exec) [[ $# -ge 2 ]] || usage; exec_on "$@" ;;
  cut) ip -n "$(node_ns "$1" "$2")" link set "$IFNAME" down ;;
  heal) ip -n "$(node_ns "$1" "$2")" link set "$IFNAME" up ;;
  kill) [[ $# -eq 2 ]] || usage; kill_node "$1" "$2" ;;
  down) down "$1" ;;
  check) check "$1" ;;
  *) usage ;;
esac
