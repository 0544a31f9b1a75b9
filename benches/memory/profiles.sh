#!/usr/bin/env bash
# Builds the default `mesh-proxy` (jemalloc) once per release-profile candidate, each from
# scratch in a target directory of its own (the build time is a clean build's), prints the
# size of each binary's sections, then measures one sidecar of each with the `memory` driver
# (benches/memory/main.rs), runs interleaved:
#
#   benches/memory/profiles.sh [driver options, e.g. --runs 3 --conns 0 --settle-secs 2]
#
# A candidate is NAME, or NAME|KEY=VALUE|KEY=VALUE... with Cargo `--config` settings applied
# over the workspace's [profile.release] (e.g. profile.release.lto="thin"); the list, one
# candidate a line, is MEMORY_PROFILES (default below: `release` is the workspace's release
# profile as it is, `fat` the settings of its [profile.dist], the binary to ship). Binaries, build logs and times are kept in $CARGO_TARGET_DIR/memory-profiles/
# (default target/memory-profiles/); an existing binary is reused (delete it to rebuild).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target=${CARGO_TARGET_DIR:-$root/target}
out="$target/memory-profiles"
mkdir -p "$out"
ulimit -n 20000 2>/dev/null || true

default_profiles="release
fat|profile.release.lto=\"fat\"|profile.release.codegen-units=1
thin|profile.release.lto=\"thin\"|profile.release.codegen-units=16"
profiles=${MEMORY_PROFILES:-$default_profiles}

cd "$root"
cargo build --release -p benches --bin memory
bins=()
while IFS= read -r spec; do
  [[ -n $spec ]] || continue
  IFS='|' read -r -a parts <<<"$spec"
  name=${parts[0]}
  config=()
  for kv in "${parts[@]:1}"; do config+=(--config "$kv"); done
  bin="$out/mesh-proxy-$name"
  if [[ ! -x $bin ]]; then
    dir="$out/target-$name"
    start=$(date +%s)
    CARGO_TARGET_DIR="$dir" cargo "${config[@]}" build --release -p mesh-proxy --bin mesh-proxy \
      >"$out/build-$name.log" 2>&1
    secs=$(($(date +%s) - start))
    cp "$dir/release/mesh-proxy" "$bin"
    echo "$name: clean build ${secs} s (load average at the end $(cut -d' ' -f1-3 /proc/loadavg))" \
      >>"$out/build-times.txt"
  fi
  text=$(size -A "$bin" | awk '$1 == ".text" {print $2}')
  relro=$(size -A "$bin" | awk '$1 == ".data.rel.ro" {print $2}')
  echo "$name: file $(stat -c %s "$bin") bytes, .text $text, .data.rel.ro $relro"
  bins+=("$name=$bin")
done <<<"$profiles"
cat "$out/build-times.txt" 2>/dev/null || true

exec "$target/release/memory" "$@" "${bins[@]}"
