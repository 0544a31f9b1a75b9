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
backend_port=$((port + 1))
out="$root/mesh-proxy/symbol-order.txt"

for tool in valgrind callgrind_annotate curl; do
  command -v "$tool" >/dev/null || { echo "symbol-order.sh: $tool is not installed" >&2; exit 1; }
done
[[ -x $bin ]] || { echo "symbol-order.sh: $bin not found (cargo dist)" >&2; exit 1; }
(cd "$root" && cargo build --release -p benches --bin load-backend)

work="$(mktemp -d "${TMPDIR:-/tmp}/symbol-order.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cat >"$work/profiled.sh" <<EOF
#!/usr/bin/env bash
exec valgrind --tool=callgrind --demangle=no --callgrind-out-file="$work/callgrind.%p" "$bin" "\$@"
EOF
chmod +x "$work/profiled.sh"

for i in $(seq "$requests"); do
  echo "url = \"http://127.0.0.1:$port/api/v1/payments\""
  echo 'output = "/dev/null"'
done >"$work/requests.cfg"

profile() { # profile MODE: start-up and the requests through benches/load/run.sh MODE
  "$target/release/load-backend" --listen "127.0.0.1:$backend_port" &
  local backend=$!
  MESH_PROXY_BIN="$work/profiled.sh" LOAD_DIR="$work/$1" \
    "$root/benches/load/run.sh" "$1" "127.0.0.1:$port" "127.0.0.1:$backend_port" \
    >"$work/$1.log" 2>&1 &
  local proxy=$!
  local ready=
  for _ in $(seq 600); do
    if curl -sf -o /dev/null "http://127.0.0.1:$port/"; then ready=1; break; fi
    sleep 0.2
  done
  [[ -n $ready ]] || { cat "$work/$1.log" >&2; echo "symbol-order.sh: $1 never answered" >&2; exit 1; }
  curl -s -K "$work/requests.cfg"
  # The proxy's children (the second sidecar) first, then the proxy; callgrind writes its
  # profile as each process exits.
  local children
  children=$(pgrep -P "$proxy" || true)
  # shellcheck disable=SC2086 # one PID a word
  [[ -z $children ]] || kill -TERM $children || true
  kill -TERM "$proxy" || true
  wait "$proxy" || true
  # The second sidecar is the first one's child, not this shell's: wait for it by polling.
  for pid in $children; do
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  done
  kill "$backend" || true
  wait "$backend" || true
}
profile inbound
profile mtls

# Self cost of every function of the binary, summed over the processes, hottest first.
for f in "$work"/callgrind.*; do
  callgrind_annotate --threshold=100 --inclusive=no "$f"
done | awk -v bin="[$bin]" '
  $NF == bin {
    name = $(NF - 1); sub(/^[^:]*:/, "", name)
    cost = $1; gsub(",", "", cost)
    total[name] += cost
  }
  END { for (n in total) print total[n], n }' | sort -k1,1nr -k2 | awk '{print $2}' >"$out"
echo "symbol-order.sh: $(wc -l <"$out") functions in $out"
