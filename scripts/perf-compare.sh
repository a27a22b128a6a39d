#!/usr/bin/env bash
# Runs the docs/performance.md comparison: every shape RUNS times against
# a fresh Roster (started by `roster bench` itself) and a fresh rnacos,
# through the same protocol and the same bench client, appending one JSON
# report per run to OUT. Summarise with scripts/perf-summary.py OUT.
#   usage: scripts/perf-compare.sh OUT [RUNS]   (needs target/release/roster,
#          with FLOOR=1 target/release/transport_floor (cargo build
#          --release -p roster-bench --bin transport_floor),
#          and `rnacos` on PATH or in $RNACOS: cargo install rnacos)
#   ONLY=REGEX runs only the shapes whose label matches.
#   FLOOR=1 also runs the Nacos gRPC register, batch and query and the Nacos HTTP
#   query against the transport
#   floor (crates/roster-bench/src/bin/transport_floor.rs: canned
#   replies, no registry), as servers floor-h2, floor-tonic, floor-http.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1
runs=${2:-3}
roster=target/release/roster
rnacos=${RNACOS:-rnacos}
http=28848 # rnacos: gRPC on http+1000

# Waits (at most 10 s) until something listens on 127.0.0.1:PORT.
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.1
  done
}

start_rnacos() {
  data=$(mktemp -d)
  RNACOS_HTTP_PORT=$http RNACOS_DATA_DIR=$data RUST_LOG=error "$rnacos" >/dev/null 2>&1 &
  rnacos_pid=$!
  wait_port $((http + 1000))
  sleep 1
}

stop_rnacos() {
  kill "$rnacos_pid" 2>/dev/null || true
  wait "$rnacos_pid" 2>/dev/null || true
  rm -rf "$data"
}

# `roster bench ARGS`, its JSON report tagged with server and label.
record() {
  local server=$1 label=$2
  shift 2
  "$roster" --json bench "$@" |
    python3 -c "import json,sys; r=json.load(sys.stdin); r['server']='$server'; r['label']='$label'; print(json.dumps(r))" >>"$out"
}

# The transport floor in MODE, measured with the same bench arguments.
floor() {
  local mode=$1 label=$2
  shift 2
  local port=$((http + 1000))
  [[ $mode == http ]] && port=$http
  target/release/transport_floor "$mode" 127.0.0.1:$port &
  local pid=$!
  wait_port $((http + 1000))
  record "floor-$mode" "$label" --server 127.0.0.1:$((http + 1000)) "$@" --pid "$pid" || true
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# One shape against both servers: label, then `roster bench` arguments.
both() {
  local label=$1
  shift
  [[ $label =~ ${ONLY:-.} ]] || return 0
  for run in $(seq "$runs"); do
    record roster "$label" "$@"
    start_rnacos
    record rnacos "$label" --server 127.0.0.1:$((http + 1000)) "$@" --pid "$rnacos_pid" || true
    stop_rnacos
    if [[ -n ${FLOOR:-} ]]; then
      case $label in
      register-grpc* | query-grpc* | batch-grpc*)
        floor h2 "$label" "$@"
        floor tonic "$label" "$@"
        ;;
      query-http) floor http "$label" "$@" ;;
      esac
    fi
    echo "$label run $run done" >&2
  done
}

# Roster alone (the native API has no peer to compare with).
alone() {
  local label=$1
  shift
  [[ $label =~ ${ONLY:-.} ]] || return 0
  for run in $(seq "$runs"); do
    record roster "$label" "$@"
    echo "$label run $run done" >&2
  done
}

# A Nacos gRPC connection holds one registration per service (Java Nacos
# 2.x): each client registers one instance into each of 1,000 services, as
# 20 applications with the real client would.
both register-grpc register --protocol nacos-grpc --instances 20000 --clients 20 --services 1000
# The same 20,000 instances, ten to a BatchInstanceRequest.
both batch-grpc register --protocol nacos-grpc --instances 20000 --clients 20 --services 1000 --batch 10
both register-http register --protocol nacos-http --instances 20000 --clients 8
both query-grpc query --protocol nacos-grpc --readers 8 --size 10 --duration 3s
both query-http query --protocol nacos-http --readers 8 --size 10 --duration 3s
# Callers sharing a connection, as the threads of a Java application share
# its Nacos client: their unary calls are in flight together.
both register-grpc-mux register --protocol nacos-grpc --instances 50000 --clients 64 --connections 4 --services 50000
both query-grpc-mux query --protocol nacos-grpc --readers 64 --connections 4 --size 10 --duration 3s
both push-100-grpc push --protocol nacos-grpc --subscribers 100 --changes 20 --interval 100ms
both storm-grpc storm --protocol nacos-grpc --instances 50000 --clients 16 --services 50000
both churn-grpc churn --protocol nacos-grpc --subscribers 50 --rate 500 --duration 3s

alone register-native register --instances 20000 --clients 8
alone register-native-mux register --instances 50000 --clients 64 --connections 4
alone query-native query --readers 8 --size 10 --duration 3s
alone query-native-mux query --readers 64 --connections 4 --size 10 --duration 3s
alone register-native-unary register --protocol native-unary --instances 20000 --clients 8
alone register-native-unary-mux register --protocol native-unary --instances 50000 --clients 64 --connections 4
alone query-native-unary query --protocol native-unary --readers 8 --size 10 --duration 3s
alone query-native-unary-mux query --protocol native-unary --readers 64 --connections 4 --size 10 --duration 3s
alone push-100 push --subscribers 100 --changes 50
alone push-1000 push --subscribers 1000 --changes 50
# One change's fan-out on its own: 100 ms apart, each change reaches all
# 1,000 before the next (at 20 ms they overlap, which measures throughput).
alone push-1000-spaced push --subscribers 1000 --changes 30 --interval 100ms
alone push-10000 push --subscribers 10000 --changes 20 --interval 200ms
alone storm-100k storm --instances 100000 --clients 64 --connections 4 --services 100
alone churn-native churn --subscribers 50 --rate 500 --duration 3s
