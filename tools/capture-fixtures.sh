#!/usr/bin/env bash
# Records the VXLAN test fixtures in forwarder/tests/corpus/vxlan/ from Linux's own vxlan
# driver: two namespaces, each with a flannel-style VTEP (VNI 1, port 8472), exchange an ICMP
# echo, a TCP SYN and an ARP request; tcpdump captures the underlay and each
# UDP payload (VXLAN header + inner Ethernet frame) into a .bin file.
#
# Addresses and MACs match forwarder/src/testing.rs (Pair::vxlan): node A 198.18.0.1,
# 10.244.1.0, MAC 02:00:00:00:00:01; node B 198.18.0.2, 10.244.2.0, MAC 02:00:00:00:00:02.
# Usage: sudo tools/capture-fixtures.sh   (needs iproute2, ethtool, tcpdump, python3)
set -euo pipefail
cd "$(dirname "$0")/.."
out=forwarder/tests/corpus/vxlan
pre="wfix$$"
tmp=$(mktemp -d)
cleanup() {
  for ns in "$pre-a" "$pre-b"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
ip netns add "$pre-a"
ip netns add "$pre-b"
ip link add eth0 netns "$pre-a" type veth peer name eth0 netns "$pre-b"
vtep() { # ns underlay-ip overlay-ip mac peer-underlay peer-subnet peer-gw peer-mac arp
  local ns=$1
  ip -n "$ns" addr add "$2/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link add flannel.1 type vxlan id 1 dstport 8472 nolearning local "$2" dev eth0
  ip -n "$ns" link set flannel.1 address "$4" mtu 1450 up
  ip netns exec "$ns" ethtool -K flannel.1 tx-checksum-ip-generic off >/dev/null
  ip -n "$ns" addr add "$3/32" dev flannel.1
  ip -n "$ns" route add "$6" via "$7" dev flannel.1 onlink
  bridge -n "$ns" fdb add "$8" dev flannel.1 dst "$5" self permanent
  if [ "$9" = arp ]; then
    bridge -n "$ns" fdb append 00:00:00:00:00:00 dev flannel.1 dst "$5" self
  else
    ip -n "$ns" neigh add "$7" lladdr "$8" dev flannel.1 nud permanent
  fi
}
vtep "$pre-a" 198.18.0.1 10.244.1.0 02:00:00:00:00:01 198.18.0.2 10.244.2.0/24 10.244.2.0 02:00:00:00:00:02 arp
vtep "$pre-b" 198.18.0.2 10.244.2.0 02:00:00:00:00:02 198.18.0.1 10.244.1.0/24 10.244.1.0 02:00:00:00:00:01 perm
ip netns exec "$pre-b" timeout 4 tcpdump -i eth0 -n -U -w "$tmp/cap.pcap" 'udp port 8472 and src host 198.18.0.1' 2>/dev/null &
dump=$!
sleep 1
ip netns exec "$pre-a" ping -c 1 -W 2 10.244.2.0 >/dev/null   # ARP request, then echo request
# A TCP SYN (to a closed port: the SYN is on the wire either way; the RST comes back).
ip netns exec "$pre-a" timeout 2 bash -c 'exec 3<>/dev/tcp/10.244.2.0/5201' 2>/dev/null || true
wait "$dump" || true
# Each UDP payload (VXLAN header + inner frame) of the pcap, named by what it carries.
python3 - "$tmp/cap.pcap" "$out" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read()
endian = "<" if data[:4] == b"\xd4\xc3\xb2\xa1" else ">"
off, seen = 24, set()
while off + 16 <= len(data):
    _, _, incl, _ = struct.unpack(endian + "IIII", data[off:off + 16])
    frame = data[off + 16:off + 16 + incl]
    off += 16 + incl
    ihl = (frame[14] & 0x0F) * 4
    vx = frame[14 + ihl + 8:]
    inner = vx[8:]
    ethertype = inner[12:14]
    if ethertype == b"\x08\x06":
        name = "linux_arp_request"
    elif ethertype == b"\x08\x00" and inner[14 + 9] == 1:
        name = "linux_icmp_echo_request"
    elif ethertype == b"\x08\x00" and inner[14 + 9] == 6 and inner[14 + (inner[14] & 0x0F) * 4 + 13] & 0x02:
        name = "linux_tcp_syn"
    else:
        continue
    if name in seen:
        continue
    seen.add(name)
    open(f"{sys.argv[2]}/{name}.bin", "wb").write(vx)
    print(f"{name}.bin: {len(vx)} bytes")
PY
