#!/usr/bin/env bash
# Property-based API tests of a running ranking node (`banditflow serve`) with Schemathesis,
# against the checked-in OpenAPI document api/openapi.json.
#
#   scripts/schemathesis.sh BASE_URL [SCHEMATHESIS_RUN_ARGS...]   e.g. http://127.0.0.1:8080
#   scripts/schemathesis.sh --check-spec                          only validate api/openapi.json
#
# Installs a pinned Schemathesis from PyPI into a virtualenv of its own under
# ${BANDITFLOW_CACHE:-$HOME/.cache/banditflow}/venv-schemathesis (once; reused while the pinned
# version is there). A run sends requests to BASE_URL only (the document is read from the file),
# checks every response for server errors and for conformance to the documented status codes,
# content types and response schemas, and passes Schemathesis' exit code through (0: no
# failures). It writes nothing into the checkout: it runs in a temporary directory with no
# example database, and writes reports only when asked to (e.g. `--report junit --report-dir
# /abs/path`; a relative --report-dir would land in that temporary directory and be deleted).
#
# The node must be ready before the run (GET /readyz = 200: every model loaded or cold-start on)
# and its Kafka reachable: an answer 503 (model not loaded, impression not written) is a server
# error to Schemathesis. The script waits up to SCHEMATHESIS_READY_TIMEOUT seconds (default 60)
# for /readyz to answer 200, then runs anyway.
#
# Environment:
#   SCHEMATHESIS_MAX_EXAMPLES   generated cases per operation (default 100; the coverage phase adds
#                               its fixed set of boundary and invalid-input cases)
#   SCHEMATHESIS_SEED           default 1
#   SCHEMATHESIS_READY_TIMEOUT  default 60 (seconds)
#   SCHEMATHESIS_CHECKS         default not_a_server_error,status_code_conformance,
#                               content_type_conformance,response_schema_conformance
#                               (e.g. add negative_data_rejection, or `all`)
set -euo pipefail

SCHEMATHESIS_VERSION=4.32.5

root="$(cd "$(dirname "$0")/.." && pwd)"
spec="$root/api/openapi.json"
cache="${BANDITFLOW_CACHE:-$HOME/.cache/banditflow}"
venv="$cache/venv-schemathesis"

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}
[ $# -ge 1 ] || usage
case "$1" in
  -h | --help) usage ;;
  --check-spec) [ $# -eq 1 ] || usage ;;
  http://* | https://*) ;;
  *) echo "error: BASE_URL must start with http:// or https://, got '$1'" >&2; exit 2 ;;
esac

# The virtualenv, with exactly the pinned version (pip's own output only when it installs).
installed="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null || true)"
if [ "$installed" != "$SCHEMATHESIS_VERSION" ]; then
  echo "== installing schemathesis $SCHEMATHESIS_VERSION into $venv" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" >&2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
# A configuration file of its own, so that no schemathesis.toml of the caller's directories applies,
# and with the cache off: it would keep crash files (for `st replay`) and learned state under
# ./.schemathesis, that is in $work, deleted at exit. Each failure prints a curl command instead.
printf '[cache]\nenabled = false\n' >"$work/schemathesis.toml"

if [ "$1" = "--check-spec" ]; then
  # Validates the document against the OpenAPI 3.0 meta-schema (the one Schemathesis ships, via
  # jsonschema_rs), loads every operation as a test run would (resolving every $ref), checks every
  # documented example against its schema, and generates a few requests per operation (no request
  # is sent) to show that each request schema can be satisfied.
  "$venv/bin/python" - "$spec" <<'EOF'
import json
import sys

import jsonschema_rs
import schemathesis
from schemathesis.core.result import Err
from schemathesis.specs.openapi.definitions import OPENAPI_30_VALIDATOR

path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    raw = json.load(f)
if raw.get("openapi") != "3.0.3":
    sys.exit(f"{path}: expected openapi 3.0.3, found {raw.get('openapi')!r}")

errors = list(OPENAPI_30_VALIDATOR.iter_errors(raw))
for error in errors:
    where = "/".join(str(p) for p in error.instance_path) or "(root)"
    print(f"{path}: {where}: {error.message}", file=sys.stderr)
if errors:
    sys.exit(f"{path}: {len(errors)} OpenAPI 3.0 validation error(s)")

schema = schemathesis.openapi.from_path(path)
schema.validate()
count = 0
failed = False
for result in schema.get_all_operations():
    if isinstance(result, Err):  # an operation that cannot be loaded (bad $ref, bad media type …)
        print(f"{path}: {result.err()}", file=sys.stderr)
        failed = True
        continue
    count += 1


def lookup(ref):
    node = raw
    try:
        if not ref.startswith("#/"):
            raise KeyError(ref)
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    except (KeyError, TypeError):
        sys.exit(f"{path}: unresolvable $ref {ref!r}")
    return node


def inline(node):
    """The schema with every local $ref replaced by its target (the document has no cycles)."""
    if isinstance(node, dict):
        if "$ref" in node:
            return inline(lookup(node["$ref"]))
        out = {}
        for key, value in node.items():
            if key == "nullable":
                continue
            out[key] = inline(value)
        if node.get("nullable") is True and "type" in node:
            out["type"] = [node["type"], "null"]
        return out
    if isinstance(node, list):
        return [inline(v) for v in node]
    return node


def check_example(where, media, value):
    global failed
    schema = media.get("schema")
    if schema is None:
        return
    validator = jsonschema_rs.Draft4Validator(inline(schema), validate_formats=True)
    for error in validator.iter_errors(value):
        at = "/".join(str(p) for p in error.instance_path) or "(root)"
        print(f"{path}: example of {where}: {at}: {error.message}", file=sys.stderr)
        failed = True


examples = 0
for route, item in raw["paths"].items():
    for method, op in item.items():
        label = f"{method.upper()} {route}"
        body = op.get("requestBody", {})
        for media_type, media in body.get("content", {}).items():
            if "example" in media:
                check_example(f"{label} request {media_type}", media, media["example"])
                examples += 1
        for status, response in op.get("responses", {}).items():
            response = lookup(response["$ref"]) if "$ref" in response else response
            for media_type, media in response.get("content", {}).items():
                if "example" in media:
                    check_example(f"{label} {status} {media_type}", media, media["example"])
                    examples += 1
if failed:
    sys.exit(1)

from hypothesis import HealthCheck, Phase, given, settings

generated = 0
for result in schema.get_all_operations():
    operation = result.ok()

    @settings(max_examples=25, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy())
    def draw(case):
        global generated
        generated += 1

    try:
        draw()
    except Exception as exc:
        print(f"{path}: {operation.label}: no request can be generated: {exc}", file=sys.stderr)
        failed = True
if failed:
    sys.exit(1)
print(f"{path}: valid OpenAPI {raw['openapi']}: {count} operations, {examples} examples conform, "
      f"{generated} requests generated")
EOF
  exit 0
fi

base_url="${1%/}"
shift

# Wait (bounded) for the node to be ready; only BASE_URL is contacted.
"$venv/bin/python" - "$base_url/readyz" "${SCHEMATHESIS_READY_TIMEOUT:-60}" <<'EOF' || true
import sys, time, urllib.request, urllib.error

url, timeout = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + timeout
last = "no answer"
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
while True:
    try:
        with opener.open(url, timeout=5) as response:
            if response.status == 200:
                sys.exit(0)
            last = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        last = f"HTTP {exc.code}: {exc.read(500).decode('utf-8', 'replace')}"
    except OSError as exc:
        last = str(exc)
    if time.monotonic() >= deadline:
        print(f"warning: {url} not ready after {timeout:g}s ({last}); testing anyway", file=sys.stderr)
        sys.exit(1)
    time.sleep(0.5)
EOF

cmd=(
  "$venv/bin/schemathesis" --config-file "$work/schemathesis.toml" run "$spec"
  --url "$base_url"
  --checks "${SCHEMATHESIS_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance}"
  --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-100}"
  --seed "${SCHEMATHESIS_SEED:-1}"
  --workers 1
  --generation-database none
  --request-timeout 10
  --max-redirects 0
  --output-sanitize false
  "$@"
)
printf '==' >&2
printf ' %q' "${cmd[@]}" >&2
printf '\n' >&2
status=0
# Proxies from the environment would send the requests elsewhere than BASE_URL.
env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u all_proxy \
  "${cmd[@]}" || status=$?
exit "$status"
