#!/usr/bin/env bash
# A three-host weft lab in network namespaces, the README's first command.
#
# Builds weft, puts three hosts on a bridged underlay, writes the cluster network config into
# an embedded file store (`weft network init`), starts `weft run` on each host in lease mode
# (no subnet, no peers: each node leases a subnet from the store and finds the others there),
# pings every pair over the overlay, runs iperf3 TCP n2 -> n1 for 5 s, prints the leases and
# n1's `weft status`, then tears everything down (also on failure or Ctrl-C).
#
#   weft-lab-u        bridge br0, ports v1 v2 v3
#   weft-lab-n<i>     eth0 198.18.0.<i>/24 (underlay), weft0 <gateway of its leased /24>
#   <labdir>/store    the shared lease store (one directory, like etcd on one machine)
#
# All addresses stay inside the namespaces: underlay 198.18.0.0/15 (RFC 2544 benchmarking
# space), overlay 10.244.0.0/16.
#
# Usage (as root; as another user it re-runs itself through sudo where sudo exists):
#        tools/lab.sh [--keep] [--no-build]   build and run the lab (--keep leaves it up)
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
declare -a gw=()   # gw[i]: host i's overlay gateway, read from `weft status --json`

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

# weft's config for host i, lease mode: no subnet and no peers, both come from the store.
write_config() {
  local i=$1
  {
    echo "node_name = \"n$i\""
    echo "public_ip = \"198.18.0.$i\""
    echo "store = \"file\""
    echo "store_dir = \"$dir/store\""
    echo "subnet_file = \"$dir/n$i.subnet.env\""
    echo "pod_dir = \"$dir/n$i.pods\""
    echo "lease_cache = \"$dir/n$i.lease-cache.json\""
    echo "tun_name = \"weft0\""
    echo "workers = 1"
    echo "api_socket = \"$dir/n$i.sock\""
  } >"$dir/n$i.toml"
}

# The cluster network config every node reads: flannel's net-conf JSON, in the file store.
network_init() {
  log "weft network init --store-dir $dir/store --network 10.244.0.0/16 --backend udp"
  "$weft" network init --store-dir "$dir/store" --network 10.244.0.0/16 --backend udp | sed 's/^/    /'
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

# A field of `weft status --json` on host i ("gateway", "subnet"): the first occurrence, which
# is the node's own (peers come later and have no gateway).
status_field() {
  local i=$1 field=$2
  { status "$i" --json || true; } | tr -d '\n' | { grep -o "\"$field\": *\"[^\"]*\"" || true; } |
    head -n 1 | sed 's/.*"\([^"]*\)"$/\1/'
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
      gw[i]=$(status_field "$i" gateway)
      [ -n "${gw[i]}" ] || die "weft n$i: no gateway in 'weft status --json'"
      log "weft n$i ready (pid $pid), leased $(status_field "$i" subnet), gateway ${gw[i]}"
      return 0
    fi
    sleep 0.1
  done
  tail -n 30 "$dir/n$i.log" >&2
  die "weft on n$i did not answer 'weft status' within 10 s (log above)"
}

# Every node learns the others from the store (the file store is polled every 100 ms).
wait_peers() {
  local i n
  for i in $(seq "$HOSTS"); do
    for _ in $(seq 50); do
      n=$({ status "$i" --json || true; } | { grep -o '"endpoint"' || true; } | wc -l)
      [ "$n" -lt $((HOSTS - 1)) ] || continue 2
      sleep 0.1
    done
    status "$i" >&2 || true
    die "weft n$i lists $n peers after 5 s, expected $((HOSTS - 1)) (status above)"
  done
  log "every node lists the other $((HOSTS - 1)) as peers"
}

ping_pairs() {
  local a b out
  for a in $(seq "$HOSTS"); do
    for b in $(seq "$HOSTS"); do
      [ "$a" != "$b" ] || continue
      if ! out=$(ip netns exec "$PREFIX-n$a" ping -n -c 3 -i 0.2 -W 1 -w 5 "${gw[b]}" 2>&1); then
        printf '%s\n' "$out" >&2
        die "ping n$a -> n$b (${gw[b]}) failed"
      fi
      log "ping n$a -> n$b (${gw[b]}): $(printf '%s\n' "$out" | grep -E 'packets transmitted|rtt' | tr '\n' ' ')"
    done
  done
}

iperf() {
  local out line
  ip netns exec "$PREFIX-n1" iperf3 -s -1 -B "${gw[1]}" >"$dir/iperf3-server.log" 2>&1 &
  for _ in $(seq 50); do
    ip netns exec "$PREFIX-n1" ss -Hltn 'sport = :5201' | grep -qF "${gw[1]}" && break
    sleep 0.1
  done
  if ! out=$(ip netns exec "$PREFIX-n2" timeout 30 iperf3 -c "${gw[1]}" -t 5 -f g \
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
  network_init
  local i
  for i in $(seq "$HOSTS"); do
    write_config "$i"
    start_weft "$i"
  done
  wait_peers
  ping_pairs
  iperf
  log "weft leases --store-dir $dir/store"
  "$weft" leases --store-dir "$dir/store" | sed 's/^/    /'
  log "weft status on n1"
  status 1 || status 1 --json
  if [ "$keep" = 1 ]; then
    log "look inside: ip netns exec $PREFIX-n1 $weft status --socket $dir/n1.sock"
    log "             $weft leases --store-dir $dir/store"
  fi
}

# Network namespaces, veths and TUN devices need root: run as root, or let sudo re-run us.
if [ "$(id -u)" != 0 ] && [ "${1:-}" != -h ] && [ "${1:-}" != --help ] && command -v sudo >/dev/null; then
  exec sudo -E "$0" "$@"
fi
main "$@"
