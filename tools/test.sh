#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs on a fresh Debian machine,
# then format, lints, layering, unit tests and the network-namespace integration tests.
# Needs root (network namespaces, TUN devices). Usage, as root: tools/test.sh
# (run as another user, it re-runs itself through sudo where sudo exists).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "tools/test.sh: run as root (network namespaces, TUN)" >&2; exit 1; }
  exec sudo -E "$0" "$@"
fi

# Every program the build and the tests run, as command:Debian-package. The check after the
# install step fails loudly if one is still missing, so a machine that happens to have a tool
# cannot hide a missing install line (etcdctl is Debian's etcd-client, not etcd-server).
required=(iperf3:iperf3 ping:iputils-ping ip:iproute2 ss:iproute2 tc:iproute2 bridge:iproute2 nstat:iproute2
  tcpdump:tcpdump tshark:tshark ethtool:ethtool setpriv:util-linux nsenter:util-linux unshare:util-linux useradd:passwd userdel:passwd protoc:protobuf-compiler
  etcd:etcd-server etcdctl:etcd-client iptables:iptables nft:nftables timeout:coreutils getconf:libc-bin
  wg:wireguard-tools wireguard-go:wireguard-go)
need_pkgs=()
for bin in "${required[@]}"; do
  command -v "${bin%%:*}" >/dev/null 2>&1 || need_pkgs+=("${bin##*:}")
done
# The CNI chain test runs Debian's reference plugins (portmap needs iptables).
[ -x /usr/lib/cni/portmap ] || need_pkgs+=(containernetworking-plugins)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  mapfile -t need_pkgs < <(printf '%s\n' "${need_pkgs[@]}" | sort -u)
  echo "==> installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
missing=()
for bin in "${required[@]}"; do
  command -v "${bin%%:*}" >/dev/null 2>&1 || missing+=("${bin%%:*} (Debian package ${bin##*:})")
done
for plugin in portmap bandwidth; do
  [ -x "/usr/lib/cni/$plugin" ] || missing+=("/usr/lib/cni/$plugin (Debian package containernetworking-plugins)")
done
if [ "${#missing[@]}" -gt 0 ]; then
  printf 'tools/test.sh: still missing after the install step:\n' >&2
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi
echo "==> every program the tests run is present"
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt >/dev/null 2>&1 || true

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy (deny warnings)"
cargo clippy --workspace --all-targets --release -- -D warnings
echo "==> the forwarder core builds without any OS code; ipam builds without etcd"
cargo check -p weft-forwarder --no-default-features --release
cargo check -p weft-ipam --no-default-features --release
echo "==> layering"
tools/check-layering.sh
echo "==> build"
cargo build --workspace --bins --release
echo "==> unit tests"
cargo test --workspace --release --exclude weft-netns-tests
echo "==> network-namespace integration tests"
CI="${CI:-}" cargo test --release -p weft-netns-tests -- --test-threads=1
echo "==> network-namespace offload tests on the epoll/recvmmsg backend (where io_uring is refused)"
WEFT_TEST_IO=mmsg cargo test --release -p weft-netns-tests --test offload -- --test-threads=1
echo "==> benchmark harness smoke run (figures are reported, never asserted)"
cargo run --release -q -p weft-bench --bin lease-scale -- --quick --out "${TMPDIR:-/tmp}/lease-scale-quick.json"
cargo run --release -q -p weft-bench --bin vs-kernel -- --quick --out "${TMPDIR:-/tmp}/vs-kernel-quick.json"
