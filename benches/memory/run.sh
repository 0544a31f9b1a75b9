#!/usr/bin/env bash
# Builds mesh-proxy once per allocator (system malloc, jemalloc — the default — and mimalloc)
# and the `memory` driver, all release, then measures one sidecar of each
# (benches/memory/main.rs):
#
#   benches/memory/run.sh [--runs R] [--conns N] [--load-secs S] [--settle-secs S] [--workers W]
#
# Extra variants: MEMORY_GLIBC_ARENAS=N adds the system build run with MALLOC_ARENA_MAX=N.
# The binaries are kept in $CARGO_TARGET_DIR/memory/ (default target/memory/).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target=${CARGO_TARGET_DIR:-$root/target}
out="$target/memory"
mkdir -p "$out"
ulimit -n 20000 2>/dev/null || true

cd "$root"
cargo build --release -p benches --bin memory
for alloc in system jemalloc mimalloc; do
  features=(--no-default-features --features proxy)
  [[ $alloc == system ]] || features=(--no-default-features --features "$alloc")
  cargo build --release -p mesh-proxy --bin mesh-proxy "${features[@]}"
  cp "$target/release/mesh-proxy" "$out/mesh-proxy-$alloc"
done

bins=("system=$out/mesh-proxy-system" "jemalloc=$out/mesh-proxy-jemalloc" "mimalloc=$out/mesh-proxy-mimalloc")
if [[ -n ${MEMORY_GLIBC_ARENAS:-} ]]; then
  wrapper="$out/mesh-proxy-glibc-arenas"
  printf '#!/bin/sh\nMALLOC_ARENA_MAX=%s exec "%s" "$@"\n' "$MEMORY_GLIBC_ARENAS" \
    "$out/mesh-proxy-system" >"$wrapper"
  chmod +x "$wrapper"
  bins+=("system-arenas$MEMORY_GLIBC_ARENAS=$wrapper")
fi

exec "$target/release/memory" "$@" "${bins[@]}"
