#!/usr/bin/env bash
# Checks everything under deploy/: Prometheus rules and their unit tests, the Prometheus
# configurations, the Kubernetes manifests, the Grafana dashboard, the compose file, and that
# they agree with each other and with the metrics banditflow exports. Runs without Docker,
# Kubernetes or Grafana.
#
#   scripts/deploy-check.sh                   install what is missing, run every check
#   scripts/deploy-check.sh --install-only    install what is missing, then exit
#   scripts/deploy-check.sh --print-promtool  install promtool if missing, print its path
#
# Installs, when missing:
#   - promtool and prometheus from Debian's `prometheus` package (apt-get; sudo when not root).
#     On a machine run by systemd the package also enables a prometheus service listening on
#     :9090 (`systemctl disable --now prometheus` if that is not wanted); this script starts its
#     own Prometheus on 127.0.0.1 only and stops it.
#   - pinned Python tools in a virtualenv of their own under
#     ${BANDITFLOW_CACHE:-$HOME/.cache/banditflow}/venv-deploy (reused while the pins hold).
#
# Every check runs even when an earlier one failed; the script prints each step, a summary,
# and exits 1 when any check failed.
set -euo pipefail

# Python tools, pinned. cloudcoil's prometheus-operator models give the ServiceMonitor schema
# (deploy/check/k8s.py says why).
PINS=(
  "kubernetes-validate==1.37.0"
  "check-jsonschema==0.39.0"
  "cloudcoil==0.6.0"
  "cloudcoil-models-prometheus-operator==0.80.1.0"
  "PyYAML==6.0.4"
  "jsonschema==4.26.0"
)

root="$(cd "$(dirname "$0")/.." && pwd)"
deploy="$root/deploy"
cache="${BANDITFLOW_CACHE:-$HOME/.cache/banditflow}"
venv="$cache/venv-deploy"

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}
mode=check
case "${1:-}" in
  "") ;;
  --install-only) mode=install ;;
  --print-promtool) mode=print-promtool ;;
  -h | --help) usage ;;
  *) echo "error: unknown argument '$1'" >&2; usage ;;
esac
[ $# -le 1 ] || usage

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# promtool (the rule checks and unit tests) and prometheus (deploy/check/panels.py) come from
# Debian's package. The package list is refreshed only when the install fails without it.
ensure_prometheus() {
  if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
    return
  fi
  echo "== installing Debian's prometheus package (promtool, prometheus)" >&2
  local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus)
  if ! as_root "${install[@]}" >&2; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update >&2
    as_root "${install[@]}" >&2
  fi
}

ensure_venv() {
  local missing=0 pin name version installed
  for pin in "${PINS[@]}"; do
    name="${pin%%==*}"
    version="${pin##*==}"
    installed="$("$venv/bin/python" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null || true)"
    if [ "$installed" != "$version" ]; then
      missing=1
    fi
  done
  if [ "$missing" -eq 1 ]; then
    echo "== installing ${PINS[*]} into $venv" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2
  fi
}

if [ "$mode" = print-promtool ]; then
  ensure_prometheus
  command -v promtool
  exit 0
fi

ensure_prometheus
ensure_venv
if [ "$mode" = install ]; then
  echo "promtool:   $(command -v promtool) ($(promtool --version 2>&1 | head -n1))"
  echo "prometheus: $(command -v prometheus)"
  echo "venv:       $venv"
  exit 0
fi

py="$venv/bin/python"
# No __pycache__ in the checkout.
export PYTHONDONTWRITEBYTECODE=1
failed=()
passed=0
step() {
  local name="$1"
  shift
  echo
  echo "== $name"
  printf '   $'
  printf ' %q' "$@"
  printf '\n'
  if "$@"; then
    passed=$((passed + 1))
  else
    echo "!! FAILED: $name" >&2
    failed+=("$name")
  fi
}

cd "$root"
echo "deploy checks with $(promtool --version 2>&1 | head -n1), kubernetes-validate $("$venv/bin/kubernetes-validate" --version), $("$venv/bin/check-jsonschema" --version)"

step "Prometheus rules are valid" promtool check rules deploy/prometheus/rules.yml
step "Prometheus rule unit tests pass" promtool test rules deploy/prometheus/rules.test.yml
step "Prometheus configuration is valid" promtool check config deploy/prometheus/prometheus.yml

# docker-compose.yml mounts ../prometheus/rules.yml next to its own prometheus.yml: check the
# pair as the container sees them.
compose_prometheus() {
  local dir
  dir="$(mktemp -d)"
  cp deploy/compose/prometheus.yml deploy/prometheus/rules.yml "$dir/"
  local status=0
  promtool check config "$dir/prometheus.yml" || status=$?
  rm -rf "$dir"
  return "$status"
}
step "compose's Prometheus configuration is valid" compose_prometheus

step "Kubernetes manifests validate (strict; CRDs against their schema)" \
  "$py" deploy/check/k8s.py --kubernetes-validate "$venv/bin/kubernetes-validate"

step "the dashboard is what deploy/grafana/dashboard.py writes" "$py" deploy/grafana/dashboard.py --check
step "the dashboard validates against the Grafana 10 schema" \
  "$venv/bin/check-jsonschema" --schemafile deploy/grafana/schema/grafana-dashboard.v10.1.jsonschema.json \
  deploy/grafana/banditflow.json

step "docker-compose.yml validates against the Compose specification" \
  "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/docker-compose.yml
# `docker compose config` needs no daemon, only the compose plugin, which not every docker
# client has.
if docker compose version >/dev/null 2>&1; then
  step "docker compose config accepts docker-compose.yml" docker compose -f deploy/docker-compose.yml config --quiet
else
  echo
  echo "== docker compose config: skipped (no docker compose plugin here)"
fi

step "alerts, tests, runbooks, metric names, dashboard queries, kustomization, compose, configs agree" \
  "$py" deploy/check/lint.py
step "a real Prometheus with the rules answers every dashboard query" \
  "$py" deploy/check/panels.py --prometheus "$(command -v prometheus)"

echo
if [ "${#failed[@]}" -gt 0 ]; then
  echo "deploy-check: $passed passed, ${#failed[@]} failed" >&2
  printf '  - %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "deploy-check: $passed passed, 0 failed"
