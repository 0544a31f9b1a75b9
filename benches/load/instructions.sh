#!/usr/bin/env bash
# Instructions per request of whole sidecar processes, under `valgrind --tool=callgrind`:
# the processes of `run.sh MODE` are profiled twice, once serving 200 keep-alive requests
# and once 1200 (curl on one connection, `GET /api/v1/payments`, answered by the load
# harness's backend), and the difference of the totals is divided by 1000, so start-up,
# warm-up and shutdown cancel out. The numbers do not depend on the machine's load.
#
#   benches/load/instructions.sh inbound|mtls|plain [BINARY]   # default: target/release/mesh-proxy
#   INSTRUCTIONS_KEEP=DIR ...                                    # keep the callgrind files in DIR
#
# Prints one line per process (`inbound` or `mtls`: the sidecar(s) of that mode, the client
# sidecar first). For one function's share: callgrind_annotate on the kept files.
# Needs valgrind and curl; listens on 127.0.0.1 ports INSTRUCTIONS_PORT (default 18501),
# that port + 1 (the backend) and that port + 100 (the second sidecar).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target=${CARGO_TARGET_DIR:-$root/target}
mode=${1:?usage: instructions.sh inbound|mtls|plain [BINARY]}
bin="$(realpath "${2:-$target/release/mesh-proxy}")"
port=${INSTRUCTIONS_PORT:-18501}
backend_port=$((port + 1))

for tool in valgrind curl; do
  command -v "$tool" >/dev/null || { echo "instructions.sh: $tool is not installed" >&2; exit 1; }
done
[[ -x $bin ]] || { echo "instructions.sh: $bin not found" >&2; exit 1; }
[[ -x $target/release/load-backend ]] || (cd "$root" && cargo build --release -p benches --bin load-backend)

work="${INSTRUCTIONS_KEEP:-$(mktemp -d "${TMPDIR:-/tmp}/instructions.XXXXXX")}"
mkdir -p "$work"
[[ -n ${INSTRUCTIONS_KEEP:-} ]] || trap 'rm -rf "$work"' EXIT

run() { # run N: the mode's processes under callgrind, N requests, profiles in $work/N/
  local n=$1
  mkdir -p "$work/$n"
  cat >"$work/profiled.sh" <<EOF
#!/usr/bin/env bash
exec valgrind --tool=callgrind --callgrind-out-file="$work/$n/callgrind.%p" "$bin" "\$@"
EOF
  chmod +x "$work/profiled.sh"
  for _ in $(seq "$n"); do
    echo "url = \"http://127.0.0.1:$port/api/v1/payments\""
    echo 'output = "/dev/null"'
  done >"$work/requests.cfg"
  "$target/release/load-backend" --listen "127.0.0.1:$backend_port" &
  local backend=$!
  MESH_PROXY_BIN="$work/profiled.sh" LOAD_DIR="$work/config" \
    "$here/run.sh" "$mode" "127.0.0.1:$port" "127.0.0.1:$backend_port" >"$work/$n.log" 2>&1 &
  local proxy=$!
  local ready=
  for _ in $(seq 600); do
    if curl -sf -o /dev/null "http://127.0.0.1:$port/"; then ready=1; break; fi
    sleep 0.2
  done
  [[ -n $ready ]] || { cat "$work/$n.log" >&2; echo "instructions.sh: no answer" >&2; exit 1; }
  curl -s -K "$work/requests.cfg"
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

total() { sed -n 's/^summary: //p' "$1"; }
# The profiles of one run by process id: the client sidecar (the process run.sh became,
# started before the server sidecar it forks) first.
# (The first run also profiles `mesh-proxy ca init`, which run.sh calls: left out.)
profiles() {
  grep -l '^cmd: .* sidecar ' "$work/$1"/callgrind.* | awk -F. '{print $NF, $0}' | sort -n | cut -d' ' -f2-
}

run 200
run 1200
mapfile -t small < <(profiles 200)
mapfile -t large < <(profiles 1200)
for i in "${!large[@]}"; do
  role=sidecar
  if [[ ${#large[@]} -gt 1 ]]; then
    if [[ $i -eq 0 ]]; then role=client; else role=server; fi
  fi
  echo "$mode $role: $(( ($(total "${large[$i]}") - $(total "${small[$i]}")) / 1000 )) instructions per request"
done
