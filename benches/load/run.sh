#!/usr/bin/env bash
# Starts mesh-proxy in the foreground for an external HTTP load harness.
#
#   run.sh inbound PROXY_ADDR BACKEND_ADDR   # one sidecar: plain HTTP in on the inbound
#                                            # listener (PERMISSIVE) -> backend as the app
#   run.sh mtls PROXY_ADDR BACKEND_ADDR      # two sidecars: client outbound -> mTLS (STRICT)
#                                            # -> server inbound -> backend
#   run.sh plain PROXY_ADDR BACKEND_ADDR     # the same two sidecars in plaintext between
#                                            # them (DestinationRule tls DISABLE, PERMISSIVE)
#
# Environment: MESH_PROXY_BIN (default: target/release/mesh-proxy of this repository),
# PROXY_WORKERS (tokio worker threads per proxy, default 1), LOAD_DIR (where the
# settings, Istio YAML and a development CA are written; default a fresh temporary
# directory), SERVER_INBOUND_PORT (mtls and plain: the server sidecar's inbound port,
# default PROXY_ADDR's port + 100).
#
# The script execs the proxy, so its PID is the proxy's. In `mtls` and `plain` modes the server
# sidecar is started first as a child of that PID: a harness that sums CPU and memory
# over the PID and its children, and ends them, measures and stops both sidecars.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mode=${1:?usage: run.sh inbound|mtls|plain PROXY_ADDR BACKEND_ADDR}
proxy_addr=${2:?PROXY_ADDR}
backend_addr=${3:?BACKEND_ADDR}
bin=${MESH_PROXY_BIN:-$here/../../target/release/mesh-proxy}
workers=${PROXY_WORKERS:-1}
dir=${LOAD_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/mesh-proxy-load.XXXXXX")}

[[ -x "$bin" ]] || { echo "run.sh: $bin not found (cargo build --release -p mesh-proxy)" >&2; exit 1; }
mkdir -p "$dir"
[[ -f "$dir/ca/ca-key.pem" ]] || "$bin" ca init --trust-domain cluster.local --out "$dir/ca" >/dev/null

settings() { # settings NAME SA APP CONFIG_DIR INBOUND APP_ADDR OUTBOUND
  sed -e "s#@SERVICE_ACCOUNT@#$2#" -e "s#@APP@#$3#" -e "s#@CONFIG_DIR@#$4#" \
    -e "s#@INBOUND_ADDR@#$5#" -e "s#@APP_ADDR@#$6#" -e "s#@OUTBOUND_ADDR@#$7#" \
    "$here/sidecar.yaml.tmpl" >"$dir/$1.yaml"
}

case "$mode" in
  inbound)
    mkdir -p "$dir/istio-inbound"
    cp "$here/istio-inbound/"*.yaml "$dir/istio-inbound/"
    settings backend backend backend istio-inbound "$proxy_addr" "$backend_addr" 127.0.0.1:0
    exec "$bin" sidecar --settings "$dir/backend.yaml" --worker-threads "$workers"
    ;;
  mtls | plain)
    server_port=${SERVER_INBOUND_PORT:-$(( ${proxy_addr##*:} + 100 ))}
    config="istio-$mode"
    mkdir -p "$dir/$config"
    sed -e "s#@SERVER_INBOUND_PORT@#$server_port#" "$here/$config/mesh.yaml.tmpl" \
      >"$dir/$config/mesh.yaml"
    settings backend backend backend "$config" "127.0.0.1:$server_port" "$backend_addr" 127.0.0.1:0
    settings client client client "$config" 127.0.0.1:0 127.0.0.1:9 "$proxy_addr"
    "$bin" sidecar --settings "$dir/backend.yaml" --worker-threads "$workers" &
    exec "$bin" sidecar --settings "$dir/client.yaml" --worker-threads "$workers"
    ;;
  *)
    echo "run.sh: unknown mode $mode (inbound|mtls|plain)" >&2
    exit 2
    ;;
esac
