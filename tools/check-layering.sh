#!/usr/bin/env bash
# Enforces the crates' dependency direction (weft-forwarder depends on no weft crate, weft-ipam
# not on weft-forwarder, OS crates only in the forwarder's driver), and unsafe code only in the
# forwarder's driver. Exits non-zero naming the violation.
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
tree=$(cargo tree -p weft-forwarder -e normal --prefix none 2>/dev/null || true)
if grep -qE '^weft(-ipam)? ' <<<"$tree"; then
  echo "layering: weft-forwarder depends on another weft crate" >&2; fail=1
fi
if [ -d ipam ]; then
  if cargo tree -p weft-ipam -e normal --prefix none 2>/dev/null | grep -q '^weft-forwarder '; then
    echo "layering: weft-ipam depends on weft-forwarder" >&2; fail=1
  fi
fi
core_os=$(grep -rlE '\b(libc|io_uring|socket2|tun_rs|tracing)::' forwarder/src --include=*.rs | grep -v '^forwarder/src/driver/' || true)
if [ -n "$core_os" ]; then
  echo "layering: OS crates used outside forwarder/src/driver: $core_os" >&2; fail=1
fi
# Code lines only: doc comments may mention the word.
unsafe_files=$(grep -rnE '\bunsafe\b' --include=*.rs src forwarder/src ipam 2>/dev/null \
  | grep -vE '^[^:]+:[0-9]+:\s*//' | grep -v '^forwarder/src/driver/' | cut -d: -f1 | sort -u || true)
if [ -n "$unsafe_files" ]; then
  echo "layering: unsafe outside forwarder/src/driver: $unsafe_files" >&2; fail=1
fi
[ "$fail" -eq 0 ] && echo "layering ok"
exit "$fail"
