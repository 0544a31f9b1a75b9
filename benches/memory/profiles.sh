#!/usr/bin/env bash
# Builds the default `mesh-proxy` (jemalloc) once per release-profile candidate, each from
# scratch in a target directory of its own (the build time is a clean build's), prints the
# size of each binary's sections, then measures one sidecar of each with the `memory` driver
# (benches/memory/main.rs), runs interleaved:
#
#   benches/memory/profiles.sh [driver options, e.g. --runs 3 --conns 0 --settle-secs 2]
#
# A candidate is NAME or NAME:VAR=VALUE,VAR=VALUE with Cargo's profile variables
# (CARGO_PROFILE_RELEASE_LTO, CARGO_PROFILE_RELEASE_CODEGEN_UNITS, ...) overriding the
# workspace's [profile.release]; the list is MEMORY_PROFILES (default below; `current` is the
# workspace's profile as it is). Binaries, build logs and times are kept in
# $CARGO_TARGET_DIR/memory-profiles/ (default target/memory-profiles/); an existing binary is
# reused (delete it to rebuild).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target=${CARGO_TARGET_DIR:-$root/target}
out="$target/memory-profiles"
mkdir -p "$out"
ulimit -n 20000 2>/dev/null || true

default_profiles="current
lto-off:CARGO_PROFILE_RELEASE_LTO=false,CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
thin:CARGO_PROFILE_RELEASE_LTO=thin,CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
fat-cgu1:CARGO_PROFILE_RELEASE_LTO=fat,CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1"
profiles=${MEMORY_PROFILES:-$default_profiles}

cd "$root"
cargo build --release -p benches --bin memory
bins=()
for spec in $profiles; do
  name=${spec%%:*}
  vars=()
  [[ $spec == *:* ]] && IFS=, read -r -a vars <<<"${spec#*:}"
  bin="$out/mesh-proxy-$name"
  if [[ ! -x $bin ]]; then
    dir="$out/target-$name"
    start=$(date +%s)
    env "${vars[@]}" CARGO_TARGET_DIR="$dir" \
      cargo build --release -p mesh-proxy --bin mesh-proxy >"$out/build-$name.log" 2>&1
    secs=$(($(date +%s) - start))
    cp "$dir/release/mesh-proxy" "$bin"
    echo "$name: clean build ${secs} s (load average at the end $(cut -d' ' -f1-3 /proc/loadavg)) ${vars[*]}" \
      >>"$out/build-times.txt"
  fi
  text=$(size -A "$bin" | awk '$1 == ".text" {print $2}')
  relro=$(size -A "$bin" | awk '$1 == ".data.rel.ro" {print $2}')
  echo "$name: file $(stat -c %s "$bin") bytes, .text $text, .data.rel.ro $relro"
  bins+=("$name=$bin")
done
cat "$out/build-times.txt" 2>/dev/null || true

exec "$target/release/memory" "$@" "${bins[@]}"
