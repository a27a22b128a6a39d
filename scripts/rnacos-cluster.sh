#!/usr/bin/env bash
# Starts (and stops) a three-node rnacos cluster on 127.0.0.1, for running a
# benchmark against a replicated Nacos-compatible registry.
#
#   usage: scripts/rnacos-cluster.sh start [BASE_HTTP_PORT]   (default 21848: below the ephemeral port range, so no client connection can hold one of its ports)
#          scripts/rnacos-cluster.sh stop DATA_ROOT
#
# `start` runs the nodes in the background (own session, stdio to log files),
# waits until the raft cluster has formed and an ephemeral instance registered
# on node 1 is listed by every node, prints
#   node=N http=127.0.0.1:PORT grpc=127.0.0.1:PORT+1000 pid=PID   (N = 1..3)
#   dir=DATA_ROOT
# on stdout and exits, leaving the nodes running. Progress and timings go to
# stderr. DATA_ROOT (a mktemp dir) holds nodeN/ (cwd, node.env, data/, rnacos.log
# of node N), pids (one pid a line) and cluster.info. If start fails, the nodes
# it started are killed and DATA_ROOT is kept for its logs.
# `stop` kills the pids recorded in DATA_ROOT/pids (TERM, then KILL after 10 s)
# and removes DATA_ROOT.
#
# Ports: node N (1..3) serves HTTP on BASE+N-1 and gRPC on that + 1000. Raft
# and the registry's distro sync between nodes travel over the gRPC port
# (RNACOS_RAFT_NODE_ADDR is 127.0.0.1:GRPC), so there are no extra raft ports.
# The separate console (HTTP + 2000 by default) is switched off.
#
# Binary: $RNACOS, else `rnacos` on PATH, else ~/.cargo/bin/rnacos
# (cargo install rnacos). Environment knobs:
#   RNACOS_CLUSTER_LOG=warn      RUST_LOG of the nodes (warn or error keeps logs small)
#   RNACOS_CLUSTER_TIMEOUT=30    seconds allowed for each wait step
#   RNACOS_CLUSTER_PROBE=1       0 skips the replication probe at the end of start
# Other RNACOS_* variables in the caller's environment (e.g. RNACOS_HTTP_WORKERS)
# reach the nodes; the ones this script sets below win.
set -euo pipefail

prog=rnacos-cluster
nodes=3
timeout_s=${RNACOS_CLUSTER_TIMEOUT:-30}
log_level=${RNACOS_CLUSTER_LOG:-warn}
probe=${RNACOS_CLUSTER_PROBE:-1}

say() { echo "$prog: $*" >&2; }
die() {
  say "error: $*"
  exit 1
}

usage() {
  echo "usage: $0 start [BASE_HTTP_PORT] | $0 stop DATA_ROOT" >&2
  exit 2
}

now_ms() { date +%s%3N; }

find_binary() {
  local b
  if [[ -n ${RNACOS:-} ]]; then
    if ! b=$(command -v -- "$RNACOS" 2>/dev/null) || [[ ! -x $b ]]; then
      die "RNACOS=$RNACOS is not an executable"
    fi
    [[ $b == /* ]] || b=$PWD/$b
    echo "$b"
  elif command -v rnacos >/dev/null 2>&1; then
    command -v rnacos
  elif [[ -x $HOME/.cargo/bin/rnacos ]]; then
    echo "$HOME/.cargo/bin/rnacos"
  else
    die "no rnacos binary: set RNACOS, put rnacos on PATH, or cargo install rnacos"
  fi
}

# True when something accepts connections on 127.0.0.1:PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# GET a path on node HTTP port, whitespace stripped; fails on a non-2xx reply.
http_get() { curl -fsS --max-time 2 "http://127.0.0.1:$1$2" 2>/dev/null | tr -d ' \t\r\n'; }

# Raft metrics of the node on HTTP port $1, e.g.
# {"id":1,"state":"Leader","current_term":1,...,"current_leader":1,
#  "membership_config":{"members":[1,2,3],"members_after_consensus":null}}
metrics() { http_get "$1" /nacos/v1/raft/metrics; }

leader_of() {
  [[ $1 =~ \"current_leader\":([0-9]+) ]] && echo "${BASH_REMATCH[1]}"
}

# Sorted, comma-joined voting members, and only while no membership change is
# in flight (members_after_consensus null).
members_of() {
  [[ $1 =~ \"members\":\[([0-9,]*)\] ]] || return 1
  local m=${BASH_REMATCH[1]}
  [[ $1 =~ \"members_after_consensus\":null || ! $1 =~ \"members_after_consensus\" ]] || return 1
  tr ',' '\n' <<<"$m" | grep . | sort -n | paste -sd, -
}

http_port() { echo $((base + $1 - 1)); }
grpc_port() { echo $((base + $1 - 1 + 1000)); }

# Polls `$2...` every 0.1 s until it succeeds or $1 seconds pass.
wait_for() {
  local limit=$1
  shift
  local deadline=$(($(now_ms) + limit * 1000))
  until "$@"; do
    (($(now_ms) < deadline)) || return 1
    sleep 0.1
  done
}

node_http_up() { metrics "$(http_port "$1")" >/dev/null; }

node1_leader() {
  local m
  m=$(metrics "$(http_port 1)") || return 1
  [[ $(leader_of "$m") == 1 ]]
}

# Node $1 is a voting member in node 1's view and follows leader 1 itself.
node_joined() {
  local m1 mi
  m1=$(metrics "$(http_port 1)") || return 1
  [[ ,$(members_of "$m1"), == *,$1,* ]] || return 1
  mi=$(metrics "$(http_port "$1")") || return 1
  [[ $(leader_of "$mi") == 1 ]]
}

expected_members() { seq 1 "$nodes" | paste -sd, -; }

# Every node sees the same leader and all nodes as members.
cluster_formed() {
  local i m want
  want=$(expected_members)
  for i in $(seq 1 "$nodes"); do
    m=$(metrics "$(http_port "$i")") || return 1
    [[ $(leader_of "$m") == 1 && $(members_of "$m") == "$want" ]] || return 1
  done
}

grpc_listening() {
  local i
  for i in $(seq 1 "$nodes"); do
    port_open "$(grpc_port "$i")" || return 1
  done
}

probe_service=rnacos-cluster-probe
probe_ip=127.0.0.1
probe_port=9
probe_query="serviceName=$probe_service&ip=$probe_ip&port=$probe_port&ephemeral=true"

probe_listed_on() {
  local body
  body=$(http_get "$(http_port "$1")" "/nacos/v1/ns/instance/list?serviceName=$probe_service") || return 1
  [[ $body == *"\"ip\":\"$probe_ip\",\"port\":$probe_port,"* ]]
}

probe_listed_everywhere() {
  local i
  for i in $(seq 1 "$nodes"); do
    probe_listed_on "$i" || return 1
  done
}

started_pids=()
start_ok=0

on_start_exit() {
  ((start_ok)) && return
  local pid i
  say "start failed; killing the nodes it started; logs kept in $root"
  for pid in "${started_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for i in $(seq 1 "$nodes"); do
    [[ -f $root/node$i/rnacos.log ]] || continue
    say "--- tail of $root/node$i/rnacos.log"
    tail -n 20 "$root/node$i/rnacos.log" >&2 || true
  done
  sleep 1
  for pid in "${started_pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

launch_node() {
  local i=$1
  local ndir=$root/node$i http grpc join auto pid
  http=$(http_port "$i")
  grpc=$(grpc_port "$i")
  if ((i == 1)); then auto=true join=""; else auto=false join=127.0.0.1:$(grpc_port 1); fi
  mkdir -p "$ndir/data"
  # The same settings as a file for `rnacos -e` (so no stray .env is read) and
  # in the environment (dotenv does not override variables already set).
  cat >"$ndir/node.env" <<EOF
RUST_LOG=$log_level
RNACOS_HTTP_PORT=$http
RNACOS_GRPC_PORT=$grpc
RNACOS_HTTP_CONSOLE_PORT=0
RNACOS_SDK_HOST=127.0.0.1
RNACOS_CONSOLE_HOST=127.0.0.1
RNACOS_DATA_DIR=$ndir/data
RNACOS_RAFT_NODE_ID=$i
RNACOS_RAFT_NODE_ADDR=127.0.0.1:$grpc
RNACOS_RAFT_AUTO_INIT=$auto
RNACOS_RAFT_JOIN_ADDR=$join
RNACOS_CLUSTER_TOKEN=$token
RNACOS_ENABLE_OPEN_API_AUTH=false
EOF
  (
    cd "$ndir"
    set -a
    # shellcheck disable=SC1091
    . ./node.env
    set +a
    # Not a process-group leader here, so setsid execs in place: $! is rnacos.
    exec setsid "$bin" -e "$ndir/node.env" </dev/null >>"$ndir/rnacos.log" 2>&1
  ) &
  pid=$!
  started_pids+=("$pid")
  echo "$pid" >>"$root/pids"
  eval "pid_$i=$pid"
  sleep 0.2
  kill -0 "$pid" 2>/dev/null || die "node $i exited at once (see $ndir/rnacos.log)"
}

cmd_start() {
  base=${1:-21848}
  if ! [[ $base =~ ^[0-9]+$ ]] || ((base < 1024 || base + nodes - 1 + 1000 > 65535)); then
    die "BASE_HTTP_PORT must be a number in 1024..$((65535 - 1000 - nodes + 1))"
  fi
  command -v curl >/dev/null || die "curl is needed"
  command -v setsid >/dev/null || die "setsid (util-linux) is needed"
  bin=$(find_binary)

  local i p
  for i in $(seq 1 "$nodes"); do
    for p in "$(http_port "$i")" "$(grpc_port "$i")"; do
      ! port_open "$p" || die "port $p on 127.0.0.1 is already in use"
    done
  done

  root=$(mktemp -d "${TMPDIR:-/tmp}/rnacos-cluster.XXXXXX")
  root=$(cd "$root" && pwd -P)
  touch "$root/.rnacos-cluster" "$root/pids"
  trap on_start_exit EXIT
  token=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
  say "binary $bin ($(timeout 5 "$bin" --version 2>/dev/null </dev/null || echo 'version unknown')), data root $root"

  local t0 t_leader t_formed t_probe
  t0=$(now_ms)

  launch_node 1
  wait_for "$timeout_s" node_http_up 1 || die "node 1 did not answer HTTP within ${timeout_s}s"
  wait_for "$timeout_s" node1_leader ||
    die "node 1 did not become raft leader within ${timeout_s}s (metrics: $(metrics "$(http_port 1)" || true))"
  t_leader=$(now_ms)
  say "node 1 is leader after $((t_leader - t0)) ms"

  # One follower at a time: rnacos sends its join request once, 0.5 s after
  # start, and the leader takes one membership change at a time.
  local fallback=$((timeout_s / 3 > 3 ? timeout_s / 3 : 3))
  for i in $(seq 2 "$nodes"); do
    launch_node "$i"
    wait_for "$timeout_s" node_http_up "$i" || die "node $i did not answer HTTP within ${timeout_s}s"
    if ! wait_for "$fallback" node_joined "$i"; then
      say "node $i has not joined after ${fallback}s; asking node 1 to add it"
      curl -fsS --max-time 10 -X POST -H 'Content-Type: application/json' \
        -d "[$i,\"127.0.0.1:$(grpc_port "$i")\"]" \
        "http://127.0.0.1:$(http_port 1)/nacos/v1/raft/joinnode" >/dev/null 2>&1 || true
      wait_for "$timeout_s" node_joined "$i" ||
        die "node $i did not join within $((fallback + timeout_s))s (node 1: $(metrics "$(http_port 1)" || true); node $i: $(metrics "$(http_port "$i")" || true))"
    fi
    say "node $i joined after $(($(now_ms) - t0)) ms"
  done

  wait_for "$timeout_s" cluster_formed ||
    die "the nodes do not agree on leader 1 and members $(expected_members) within ${timeout_s}s"
  wait_for "$timeout_s" grpc_listening || die "a gRPC port (HTTP + 1000) is not listening"
  t_formed=$(now_ms)
  say "raft cluster formed (leader 1, members $(expected_members)) in $((t_formed - t0)) ms"

  if [[ $probe != 0 ]]; then
    # The registry replicates through its own distro protocol (not raft) over
    # the node list raft hands it; check it end to end once.
    local deadline=$(($(now_ms) + timeout_s * 1000))
    until curl -fsS --max-time 2 -X POST "http://127.0.0.1:$(http_port 1)/nacos/v1/ns/instance?$probe_query" >/dev/null 2>&1; do
      (($(now_ms) < deadline)) || die "registering the probe instance on node 1 failed for ${timeout_s}s"
      sleep 0.2
    done
    local t_reg
    t_reg=$(now_ms)
    wait_for "$timeout_s" probe_listed_everywhere ||
      die "the probe instance registered on node 1 was not listed by every node within ${timeout_s}s"
    t_probe=$(now_ms)
    say "an instance registered on node 1 was listed by all nodes after $((t_probe - t_reg)) ms"
    curl -fsS --max-time 2 -X DELETE "http://127.0.0.1:$(http_port 1)/nacos/v1/ns/instance?$probe_query" >/dev/null 2>&1 ||
      say "warning: deregistering the probe instance failed (it expires by itself within 30 s)"
  fi

  {
    echo "base=$base"
    echo "binary=$bin"
    echo "leader_ms=$((t_leader - t0))"
    echo "formed_ms=$((t_formed - t0))"
    [[ -z ${t_probe:-} ]] || echo "ready_ms=$((t_probe - t0))"
  } >"$root/cluster.info"

  local pid
  for i in $(seq 1 "$nodes"); do
    eval "pid=\$pid_$i"
    echo "node=$i http=127.0.0.1:$(http_port "$i") grpc=127.0.0.1:$(grpc_port "$i") pid=$pid"
  done
  echo "dir=$root"
  start_ok=1
}

# The pid still runs inside DATA_ROOT (a node's cwd), so it is ours, not a reused pid.
ours() {
  local cwd
  cwd=$(readlink "/proc/$1/cwd" 2>/dev/null) || return 1
  [[ $cwd == "$root"/* ]]
}

cmd_stop() {
  [[ -n ${1:-} ]] || usage
  [[ -d $1 ]] || die "$1 is not a directory"
  root=$(cd "$1" && pwd -P)
  [[ -f $root/.rnacos-cluster && -f $root/pids ]] || die "$root was not made by $0 start"

  local pid live=()
  while read -r pid; do
    [[ $pid =~ ^[0-9]+$ ]] || continue
    if ours "$pid"; then
      kill "$pid" 2>/dev/null || true
      live+=("$pid")
    fi
  done <"$root/pids"

  local deadline=$(($(now_ms) + 10000)) left
  while :; do
    left=()
    for pid in ${live[@]+"${live[@]}"}; do ours "$pid" && left+=("$pid"); done
    ((${#left[@]} == 0)) && break
    if (($(now_ms) >= deadline)); then
      say "pids ${left[*]} ignored SIGTERM for 10 s; sending SIGKILL"
      kill -9 "${left[@]}" 2>/dev/null || true
      sleep 0.5
      left=()
      for pid in ${live[@]+"${live[@]}"}; do ours "$pid" && left+=("$pid"); done
      ((${#left[@]} == 0)) || die "pids ${left[*]} still run; $root kept"
      break
    fi
    sleep 0.1
  done
  rm -rf -- "$root"
  say "stopped ${#live[@]} node(s), removed $root"
}

case ${1:-} in
start)
  (($# <= 2)) || usage
  cmd_start "${2:-}"
  ;;
stop)
  (($# == 2)) || usage
  cmd_stop "$2"
  ;;
*) usage ;;
esac
