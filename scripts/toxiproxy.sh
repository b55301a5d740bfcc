#!/usr/bin/env bash
# Toxiproxy (github.com/Shopify/toxiproxy), the fault proxy of the network tests: installed
# from the Go module proxy into the cache on first use.
#
#   scripts/toxiproxy.sh path      install if missing; print the server binary's path
#
# The tests start their own server on a free 127.0.0.1 port and put it on the broker's fault
# listener (scripts/kafka.sh: port+2, advertised as port+3).
set -euo pipefail
version="v2.5.0"
base="${BANDITFLOW_TOXIPROXY_DIR:-$HOME/.cache/banditflow/toxiproxy-$version}"
bin="$base/bin/toxiproxy-server"
say() { printf 'toxiproxy.sh: %s\n' "$*" >&2; }
case "${1:-}" in
  path)
    if [ ! -x "$bin" ]; then
      command -v go >/dev/null || { say "go is required to install Toxiproxy"; exit 1; }
      say "installing Toxiproxy $version from the Go module proxy into $base"
      mkdir -p "$base/bin"
      GOBIN="$base/bin" GOPATH="$base/gopath" GOFLAGS=-modcacherw \
        go install "github.com/Shopify/toxiproxy/v2/cmd/server@$version" >&2
      mv "$base/bin/server" "$bin"
    fi
    echo "$bin" ;;
  *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
