#!/usr/bin/env bash
# Runs the cluster shapes of docs/performance.md RUNS times against a Roster
# cluster that `roster bench --nodes N` starts itself and, for the shapes
# rnacos has, against a fresh three-node rnacos cluster
# (scripts/rnacos-cluster.sh), appending one JSON report per run to OUT.
# Summarise with scripts/perf-cluster-summary.py OUT.
#   usage: scripts/perf-cluster.sh OUT [RUNS]   (needs target/release/roster;
#          for rnacos, `rnacos` on PATH or in $RNACOS: cargo install rnacos)
#   ONLY=REGEX runs only the shapes whose label matches; NO_RNACOS=1 skips it;
#   ROSTER=PATH measures another roster binary (an A/B of two builds);
#   NODE=PATH runs the nodes from that binary, measured by ROSTER's bench
#   (an A/B of two server builds with one bench).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1
runs=${2:-3}
roster=${ROSTER:-target/release/roster}

# `roster bench ARGS`, its JSON report tagged with server and label.
record() {
  local server=$1 label=$2
  shift 2
  "$roster" --json bench ${NODE:+--node-binary "$NODE"} "$@" |
    python3 -c "import json,sys; r=json.load(sys.stdin); r['server']='$server'; r['label']='$label'; print(json.dumps(r))" >>"$out"
}

# The same shape against a fresh rnacos cluster: writers on its first node,
# subscribers and readers on its last.
rnacos() {
  local label=$1
  shift
  [[ -z ${NO_RNACOS:-} ]] || return 0
  local started grpc pid dir
  # Ports below the ephemeral range: the bench's own connections cannot
  # hold them.
  # rnacos' raft join is flaky: a second try, then the run is skipped.
  started=$(scripts/rnacos-cluster.sh start 21848) ||
    started=$(scripts/rnacos-cluster.sh start 21848) || {
    echo "perf-cluster: the rnacos cluster did not form; $label skipped" >&2
    return 0
  }
  grpc=$(echo "$started" | sed -n 's/.* grpc=\([^ ]*\) .*/\1/p' | paste -sd, -)
  pid=$(echo "$started" | sed -n 's/.* pid=\([0-9]*\).*/\1/p' | tail -1)
  dir=$(echo "$started" | sed -n 's/^dir=//p')
  record rnacos "$label" --server "$grpc" --pid "$pid" "$@" || true
  scripts/rnacos-cluster.sh stop "$dir"
}

# One shape: label, whether rnacos runs it too, then `roster bench` arguments
# (without --nodes / --server).
shape() {
  local label=$1 nodes=$2 both=$3
  shift 3
  [[ $label =~ ${ONLY:-.} ]] || return 0
  for _ in $(seq "$runs"); do
    # A run with errors still reports them; the next runs go on.
    record roster "$label" --nodes "$nodes" "$@" || true
    if [[ $both == both ]]; then rnacos "$label" "$@"; fi
  done
}

# A change on node 1 until a subscriber on node 3 has it.
shape push-3n-100subs 3 both push --subscribers 100 --changes 300 --protocol nacos-grpc
shape push-3n-100subs-native 3 roster push --subscribers 100 --changes 300
# Replication lag at 5,000 changes/s (origin's lag histogram), and the push
# to a subscriber on the other node (native: the bench's Nacos gRPC clients
# cannot make 5,000 changes/s on this machine); then side by side with
# rnacos at 2,000 changes/s over Nacos gRPC.
shape churn-2n-5000-native 2 roster churn --rate 5000 --clients 8 --subscribers 1 --duration 5s
shape churn-2n-2000 2 both churn --rate 2000 --clients 8 --subscribers 1 --duration 5s --protocol nacos-grpc
# 100,000 registrations spread over three nodes, listed everywhere.
shape storm-3n-100k-native 3 roster storm --instances 100000 --clients 24 --services 100
# Over Nacos gRPC (rnacos took over 6 minutes for one run of this shape on
# this machine: RNACOS_STORM=1 adds it).
shape storm-3n-100k 3 "${RNACOS_STORM:+both}" storm --instances 100000 --clients 24 --services 100 --protocol nacos-grpc
# A new node loads 1,000,000 instances (Roster only: rnacos has no such
# shape in the bench).
shape snapshot-1m 1 roster snapshot --instances 1000000 --clients 100 --services 1000
