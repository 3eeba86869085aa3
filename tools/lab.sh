#!/usr/bin/env bash
# A three-host weft lab in network namespaces, the README's first command.
#
# Builds weft, puts three hosts on a bridged underlay, starts `weft run` on each with a full
# static peer mesh, pings every pair over the overlay, runs iperf3 TCP n2 -> n1 for 5 s,
# prints n1's `weft status`, then tears everything down (also on failure or Ctrl-C).
#
#   weft-lab-u        bridge br0, ports v1 v2 v3
#   weft-lab-n<i>     eth0 198.18.0.<i>/24 (underlay), weft0 10.244.<i>.1/24 (overlay)
#
# All addresses stay inside the namespaces: underlay 198.18.0.0/15 (RFC 2544 benchmarking
# space), overlay 10.244.0.0/16.
#
# Usage: tools/lab.sh [--keep] [--no-build]   build and run the lab (--keep leaves it up)
#        tools/lab.sh down                    remove a kept lab
# Env:   WEFT_BIN=/path/to/weft               use this binary (implies --no-build)
set -euo pipefail

readonly HOSTS=3
readonly PREFIX=weft-lab
readonly NS_U=$PREFIX-u
readonly STATE_FILE=/run/$PREFIX.dir   # where the lab's scratch dir is recorded
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT

keep=0
build=1
dir=""

log() { printf '==> %s\n' "$*"; }
die() { printf 'lab.sh: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

lab_namespaces() { ip netns list | awk '{print $1}' | grep "^$PREFIX-" || true; }

# Kill everything in the lab's namespaces (TERM, so weft removes its TUN, then KILL), delete
# them, and remove the scratch dir.
teardown() {
  local namespaces ns
  local -a pids=()
  namespaces=$(lab_namespaces)
  if [ -n "$namespaces" ]; then
    for ns in $namespaces; do
      mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null || true)
    done
    [ "${#pids[@]}" = 0 ] || kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 30); do
      pids=()
      for ns in $namespaces; do
        mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null || true)
      done
      [ "${#pids[@]}" != 0 ] || break
      sleep 0.1
    done
    [ "${#pids[@]}" = 0 ] || kill -KILL "${pids[@]}" 2>/dev/null || true
    for ns in $namespaces; do ip netns del "$ns" 2>/dev/null || true; done
  fi
  if [ -f "$STATE_FILE" ]; then
    local old
    old=$(cat "$STATE_FILE")
    case $old in /tmp/weft-lab.*) rm -rf -- "$old" ;; esac
    rm -f "$STATE_FILE"
  fi
  if [ -n "$dir" ]; then rm -rf -- "$dir"; fi
}

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$keep" = 1 ] && [ -n "$dir" ]; then
    log "lab kept (configs and logs in $dir); remove it with: tools/lab.sh down"
  else
    teardown
    [ "$rc" = 0 ] || log "lab torn down after a failure (exit $rc)"
  fi
  exit "$rc"
}

# Install what the lab runs, if missing (Debian package names).
ensure_tools() {
  local missing=()
  command -v ip >/dev/null || missing+=(iproute2)
  command -v ping >/dev/null || missing+=(iputils-ping)
  command -v iperf3 >/dev/null || missing+=(iperf3)
  command -v protoc >/dev/null || missing+=(protobuf-compiler) # etcd-client builds its gRPC code with it
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
  fi
}

# weft's config for host i: peers are every other host.
write_config() {
  local i=$1 j
  {
    echo "node_name = \"n$i\""
    echo "public_ip = \"198.18.0.$i\""
    echo "port = 8285"
    echo "network = \"10.244.0.0/16\""
    echo "subnet = \"10.244.$i.0/24\""
    echo "tun_name = \"weft0\""
    echo "workers = 1"
    echo "api_socket = \"$dir/n$i.sock\""
    for j in $(seq "$HOSTS"); do
      [ "$j" != "$i" ] || continue
      echo
      echo "[[peers]]"
      echo "name = \"n$j\""
      echo "subnet = \"10.244.$j.0/24\""
      echo "endpoint = \"198.18.0.$j:8285\""
    done
  } >"$dir/n$i.toml"
}

build_topology() {
  local i ns
  ip netns add "$NS_U"
  ip -n "$NS_U" link set lo up
  ip -n "$NS_U" link add br0 type bridge
  ip -n "$NS_U" link set br0 up
  for i in $(seq "$HOSTS"); do
    ns=$PREFIX-n$i
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # Both ends are created in their namespaces: nothing lands in the root namespace.
    ip link add eth0 netns "$ns" type veth peer name "v$i" netns "$NS_U"
    ip -n "$NS_U" link set "v$i" master br0 up
    ip -n "$ns" addr add "198.18.0.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
  done
}

status() {
  local i=$1
  shift
  ip netns exec "$PREFIX-n$i" timeout 3 "$weft" status --socket "$dir/n$i.sock" "$@"
}

start_weft() {
  local i=$1 pid
  ip netns exec "$PREFIX-n$i" "$weft" run --config "$dir/n$i.toml" >"$dir/n$i.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$dir/n$i.log" >&2
      die "weft on n$i exited during startup (log above)"
    fi
    if status "$i" --json >/dev/null 2>&1; then
      log "weft n$i ready (pid $pid)"
      return 0
    fi
    sleep 0.1
  done
  tail -n 30 "$dir/n$i.log" >&2
  die "weft on n$i did not answer 'weft status' within 10 s (log above)"
}

ping_pairs() {
  local a b out
  for a in $(seq "$HOSTS"); do
    for b in $(seq "$HOSTS"); do
      [ "$a" != "$b" ] || continue
      if ! out=$(ip netns exec "$PREFIX-n$a" ping -n -c 3 -i 0.2 -W 1 -w 5 "10.244.$b.1" 2>&1); then
        printf '%s\n' "$out" >&2
        die "ping n$a -> 10.244.$b.1 failed"
      fi
      log "ping n$a -> 10.244.$b.1: $(printf '%s\n' "$out" | grep -E 'packets transmitted|rtt' | tr '\n' ' ')"
    done
  done
}

iperf() {
  local out line
  ip netns exec "$PREFIX-n1" iperf3 -s -1 -B 10.244.1.1 >"$dir/iperf3-server.log" 2>&1 &
  for _ in $(seq 50); do
    ip netns exec "$PREFIX-n1" ss -Hltn 'sport = :5201' | grep -q 10.244.1.1 && break
    sleep 0.1
  done
  if ! out=$(ip netns exec "$PREFIX-n2" timeout 30 iperf3 -c 10.244.1.1 -t 5 -f g \
      --connect-timeout 3000 2>&1); then
    printf '%s\n' "$out" >&2
    die "iperf3 n2 -> n1 failed"
  fi
  line=$(printf '%s\n' "$out" | grep receiver | tail -n 1)
  log "iperf3 TCP n2 -> n1 over weft, 5 s: $(awk '{print $(NF-2), $(NF-1)}' <<<"$line")"
  echo "    $line"
}

main() {
  while [ $# -gt 0 ]; do
    case $1 in
      --keep) keep=1 ;;
      --no-build) build=0 ;;
      down)
        [ "$(id -u)" = 0 ] || die "must run as root"
        teardown
        log "lab removed"
        return 0
        ;;
      -h | --help) usage; return 0 ;;
      *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
  done
  [ "$(id -u)" = 0 ] || die "must run as root (network namespaces, veths, TUN)"

  ensure_tools
  if [ -n "${WEFT_BIN:-}" ]; then
    weft=$WEFT_BIN
  else
    if [ "$build" = 1 ]; then
      command -v cargo >/dev/null || die "cargo not found; install Rust (https://rustup.rs)"
      log "cargo build --release --bins"
      (cd "$ROOT" && cargo build --release --bins)
    fi
    local target=${CARGO_TARGET_DIR:-target}
    case $target in /*) ;; *) target=$ROOT/$target ;; esac
    weft=$target/release/weft
  fi
  [ -x "$weft" ] || die "no weft binary at $weft (run: cargo build --release --bins)"

  if [ -n "$(lab_namespaces)" ]; then
    log "removing a previous lab"
    teardown
  fi
  trap on_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  dir=$(mktemp -d /tmp/weft-lab.XXXXXX)
  # Recorded at once, so `down` or the next run can remove it even after a kill -9.
  echo "$dir" >"$STATE_FILE"

  log "building $HOSTS hosts on a bridged underlay (198.18.0.0/24)"
  build_topology
  local i
  for i in $(seq "$HOSTS"); do
    write_config "$i"
    start_weft "$i"
  done
  ping_pairs
  iperf
  log "weft status on n1"
  status 1 || status 1 --json
}

main "$@"
