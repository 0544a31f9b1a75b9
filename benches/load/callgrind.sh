# Sourced by benches/load/instructions.sh and benches/memory/symbol-order.sh.
#
#   profile_mode MODE N OUT_DIR CONFIG_DIR BINARY PORT [VALGRIND_OPTION...]
#
# Runs `run.sh MODE` (benches/load/) with every sidecar process of BINARY under
# `valgrind --tool=callgrind` (the profiles are OUT_DIR/callgrind.<pid>), the load
# harness's backend on PORT + 1, waits until a request through the sidecars is answered
# 200, sends N keep-alive requests (curl, one connection, GET /api/v1/payments), and stops
# the sidecars. CONFIG_DIR keeps the settings and a development CA between calls. Needs
# valgrind, curl and $target/release/load-backend.

profile_mode() {
  local mode=$1 n=$2 out=$3 config=$4 bin=$5 port=$6
  shift 6
  local lib
  lib="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  mkdir -p "$out" "$config"
  # The CA outside the profiles: run.sh would otherwise make it with the profiled binary.
  [[ -f $config/ca/ca-key.pem ]] ||
    "$bin" ca init --trust-domain cluster.local --out "$config/ca" >/dev/null
  {
    echo '#!/usr/bin/env bash'
    printf 'exec valgrind --tool=callgrind'
    printf ' %q' "$@" "--callgrind-out-file=$out/callgrind.%p" "$bin"
    echo ' "$@"'
  } >"$out/profiled.sh"
  chmod +x "$out/profiled.sh"
  for _ in $(seq "$n"); do
    echo "url = \"http://127.0.0.1:$port/api/v1/payments\""
    echo 'output = "/dev/null"'
  done >"$out/requests.cfg"

  "${target:?}/release/load-backend" --listen "127.0.0.1:$((port + 1))" &
  local backend=$!
  MESH_PROXY_BIN="$out/profiled.sh" LOAD_DIR="$config" \
    "$lib/run.sh" "$mode" "127.0.0.1:$port" "127.0.0.1:$((port + 1))" >"$out/run.log" 2>&1 &
  local proxy=$!
  local ready=
  for _ in $(seq 600); do
    if curl -sf -o /dev/null "http://127.0.0.1:$port/"; then ready=1; break; fi
    sleep 0.2
  done
  if [[ -z $ready ]]; then
    cat "$out/run.log" >&2
    echo "profile_mode: the $mode sidecars never answered 200" >&2
    return 1
  fi
  curl -s -K "$out/requests.cfg"
  # callgrind writes a profile as its process exits. The second sidecar is the first one's
  # child, not this shell's: stop it first and wait for it by polling.
  local children
  children=$(pgrep -P "$proxy" || true)
  # shellcheck disable=SC2086 # one PID a word
  [[ -z $children ]] || kill -TERM $children || true
  kill -TERM "$proxy" || true
  wait "$proxy" || true
  for pid in $children; do
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  done
  kill "$backend" || true
  wait "$backend" || true
}
