#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs on a fresh Debian machine,
# then format, lints, layering, unit tests and the network-namespace integration tests.
# Needs root (network namespaces, TUN devices). Usage: sudo tools/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for bin in iperf3:iperf3 ping:iputils-ping ip:iproute2 tcpdump:tcpdump tshark:tshark ethtool:ethtool \
  setpriv:util-linux protoc:protobuf-compiler etcd:etcd-server; do
  command -v "${bin%%:*}" >/dev/null 2>&1 || need_pkgs+=("${bin##*:}")
done
# The CNI chain test runs Debian's reference plugins (portmap needs iptables).
[ -x /usr/lib/cni/portmap ] || need_pkgs+=(containernetworking-plugins)
command -v iptables >/dev/null 2>&1 || need_pkgs+=(iptables)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  echo "==> installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
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
