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

for tool in valgrind curl; do
  command -v "$tool" >/dev/null || { echo "instructions.sh: $tool is not installed" >&2; exit 1; }
done
[[ -x $bin ]] || { echo "instructions.sh: $bin not found" >&2; exit 1; }
[[ -x $target/release/load-backend ]] || (cd "$root" && cargo build --release -p benches --bin load-backend)

work="${INSTRUCTIONS_KEEP:-$(mktemp -d "${TMPDIR:-/tmp}/instructions.XXXXXX")}"
mkdir -p "$work"
[[ -n ${INSTRUCTIONS_KEEP:-} ]] || trap 'rm -rf "$work"' EXIT

# shellcheck source=benches/load/callgrind.sh
source "$here/callgrind.sh"
run() { profile_mode "$mode" "$1" "$work/$1" "$work/config" "$bin" "$port"; }

total() { sed -n 's/^summary: //p' "$1"; }
# The profiles of one run by process id: the client sidecar (the process run.sh became,
# started before the server sidecar it forks) first.
profiles() { ls "$work/$1"/callgrind.* | awk -F. '{print $NF, $0}' | sort -n | cut -d' ' -f2-; }

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
