#!/usr/bin/env python3
"""Validates the Kubernetes manifests of deploy/kubernetes/ and deploy/overlays/*/ strictly, CRDs included.

kubernetes-validate --strict checks every built-in kind against the Kubernetes 1.37 OpenAPI
schemas, rejecting unknown fields. It has no schema for custom resources: for those it prints
"WARN … Couldn't find schema" and passes, which would let a misspelt kind or apiVersion of a
built-in resource (the same warning) through unnoticed. So:

  1. kubernetes-validate --strict runs on every manifest (and on the kustomize output, when
     `kubectl` is there to build it); its exit code must be 0, and a schema-not-found warning is
     accepted only for the custom kinds listed in CRD_KINDS below. Any other warning fails.
  2. Those custom resources are validated here against a schema of their own: the JSON schema
     of the prometheus-operator API types (monitoring.coreos.com/v1, as published in the
     `cloudcoil.models.prometheus_operator` package), made strict the way kubernetes-validate
     makes its -strict schemas: additionalProperties false on every object with properties.

    deploy/check/k8s.py [--kubernetes-validate PATH] [--kubectl PATH]
"""

import argparse
import functools
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import jsonschema
import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent.parent
MANIFESTS = DEPLOY / "kubernetes"
# kind -> (apiVersion, how to get its schema)
CRD_KINDS = {"ServiceMonitor": "monitoring.coreos.com/v1"}


def strict(node):
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


@functools.cache
def crd_schema(kind):
    if kind == "ServiceMonitor":
        from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

        return strict(ServiceMonitor.model_json_schema(by_alias=True, mode="validation"))
    raise KeyError(kind)


def run_kubernetes_validate(tool, files):
    result = subprocess.run([tool, "--strict", *map(str, files)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    print(output, end="")
    failures = []
    if result.returncode != 0:
        failures.append(f"kubernetes-validate exited {result.returncode}")
    for line in output.splitlines():
        if line.startswith("INFO"):
            continue
        m = re.search(r"Couldn't find schema for kind (\S+) with api version (\S+)", line)
        if line.startswith("WARN") and m and CRD_KINDS.get(m[1]) == m[2]:
            continue  # validated below
        if line.strip():
            failures.append(f"kubernetes-validate: {line}")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-validate", default=shutil.which("kubernetes-validate") or "kubernetes-validate")
    parser.add_argument("--kubectl", default=shutil.which("kubectl"))
    args = parser.parse_args()

    # The base's manifests and every overlay's (deploy/overlays/*/), and each kustomization built.
    dirs = [MANIFESTS, *sorted(p for p in (MANIFESTS.parent / "overlays").glob("*") if p.is_dir())]
    files = sorted(p for d in dirs for p in d.glob("*.yaml") if p.name != "kustomization.yaml")
    failures = run_kubernetes_validate(args.kubernetes_validate, files)

    documents = [(path.name, doc) for path in files for doc in yaml.safe_load_all(path.read_text()) if doc]
    if args.kubectl:
        for kust in [d / "kustomization.yaml" for d in dirs]:
            built = subprocess.run([args.kubectl, "kustomize", str(kust.parent)], capture_output=True, text=True)
            name = kust.parent.relative_to(MANIFESTS.parent)
            if built.returncode != 0:
                failures.append(f"kubectl kustomize {name} failed: {built.stderr.strip()}")
                continue
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="kustomize-") as f:
                f.write(built.stdout)
                f.flush()
                print(f"kustomize build of {name}/:")
                failures += run_kubernetes_validate(args.kubernetes_validate, [f.name])
            docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
            documents += [(f"kustomize build of {name}", doc) for doc in docs]
            if kust.parent != MANIFESTS:
                # An overlay of the base: the aggregator merges the group merges.
                aggregator = [d for d in docs if d.get("kind") == "Deployment" and d["metadata"]["name"] == "banditflow-aggregator"]
                args_ = aggregator[0]["spec"]["template"]["spec"]["containers"][0]["args"] if aggregator else []
                if "--from-groups" not in args_:
                    failures.append(f"kustomize build of {name}: the aggregator does not run --from-groups: {args_}")
    else:
        print("kubectl not found: the kustomize build is not validated (only the manifests one by one)")

    for where, doc in documents:
        kind = doc.get("kind")
        if kind not in CRD_KINDS:
            continue
        name = f"{kind.lower()}/{doc['metadata']['name']}"
        if doc.get("apiVersion") != CRD_KINDS[kind]:
            failures.append(f"{where}: {name} has apiVersion {doc.get('apiVersion')}, expected {CRD_KINDS[kind]}")
            continue
        errors = list(jsonschema.Draft202012Validator(crd_schema(kind)).iter_errors(doc))
        for error in errors:
            at = ".".join(str(p) for p in error.absolute_path) or "(root)"
            failures.append(f"{where}: {name}: {at}: {error.message}")
        if not errors:
            print(f"INFO {where} passed for resource {name} against the {CRD_KINDS[kind]} schema (strict)")

    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
