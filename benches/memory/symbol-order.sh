#!/usr/bin/env bash
# Writes mesh-proxy/symbol-order.txt: the functions a sidecar runs, hottest first, for the
# linker to lay out together at the start of the text (`cargo dist`, see .cargo/config.toml).
#
#   benches/memory/symbol-order.sh [BINARY]    # default: target/dist/mesh-proxy
#
# The profile is `valgrind --tool=callgrind` over whole processes: start-up, then
# SYMBOL_ORDER_REQUESTS (default 1000) keep-alive requests through one sidecar's inbound
# listener and through two sidecars with STRICT mTLS between them (benches/load/run.sh),
# to the load harness's backend. Every function of the binary that ran is listed, by
# instructions spent in it over all the processes.
#
# Symbol names carry hashes of the crates' versions and build settings: regenerate the list
# from the shipped build (`cargo dist`) after updating the compiler or dependencies. Names
# the linker no longer finds are skipped, so a stale list costs resident memory, never a
# failed build. Needs valgrind (callgrind_annotate) and curl; listens on 127.0.0.1 ports
# SYMBOL_ORDER_PORT (default 18301), that port + 100 and that port + 1.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target=${CARGO_TARGET_DIR:-$root/target}
bin="$(realpath "${1:-$target/dist/mesh-proxy}")"
requests=${SYMBOL_ORDER_REQUESTS:-1000}
port=${SYMBOL_ORDER_PORT:-18301}
out="$root/mesh-proxy/symbol-order.txt"

for tool in valgrind callgrind_annotate curl; do
  command -v "$tool" >/dev/null || { echo "symbol-order.sh: $tool is not installed" >&2; exit 1; }
done
[[ -x $bin ]] || { echo "symbol-order.sh: $bin not found (cargo dist)" >&2; exit 1; }
(cd "$root" && cargo build --release -p benches --bin load-backend)

work="$(mktemp -d "${TMPDIR:-/tmp}/symbol-order.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# shellcheck source=benches/load/callgrind.sh
source "$root/benches/load/callgrind.sh"
for mode in inbound mtls; do
  profile_mode "$mode" "$requests" "$work/$mode" "$work/config" "$bin" "$port" --demangle=no
done

# Self cost of every function of the binary, summed over the processes, hottest first.
for f in "$work"/*/callgrind.*; do
  callgrind_annotate --threshold=100 --inclusive=no "$f"
done | awk -v bin="[$bin]" '
  $NF == bin {
    name = $(NF - 1); sub(/^[^:]*:/, "", name)
    cost = $1; gsub(",", "", cost)
    total[name] += cost
  }
  END { for (n in total) print total[n], n }' | sort -k1,1nr -k2 | awk '{print $2}' >"$out"
echo "symbol-order.sh: $(wc -l <"$out") functions in $out"
