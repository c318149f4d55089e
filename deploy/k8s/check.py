"""`make helm-check`: the chart, checked offline.

1. `helm lint --strict` with the default values and with each value set in ci-values/;
2. `helm template` for each of those value sets;
3. every rendered object validated strictly (unknown fields are errors) against the
   Kubernetes OpenAPI schemas bundled in kubernetes-validate, for each version in
   K8S_VERSIONS; and every container image pinned to a tag other than latest.

Custom resources have no schema there. The ones the chart may render are listed in
CRD_KINDS and skipped by name (and counted); any other unknown kind fails the check.

    python deploy/k8s/check.py [--k8s-versions 1.33,1.35]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import kubernetes_validate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helm  # noqa: E402  (deploy/k8s is not a package)

K8S_VERSIONS = ("1.33", "1.35")
# Prometheus Operator's ServiceMonitor (serviceMonitor.enabled): a CRD, no bundled schema.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def object_name(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pod_spec(obj: dict) -> dict | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return obj["spec"] if obj["kind"] == "Pod" else None


def unpinned_images(obj: dict) -> list[str]:
    spec = pod_spec(obj)
    if spec is None:
        return []
    images = [c["image"] for c in spec.get("containers", []) + spec.get("initContainers", [])]
    return [im for im in images if ":" not in im.rsplit("/", 1)[-1] or im.endswith(":latest")]


def validate(obj: dict, version: str) -> list[str]:
    """Error messages for one object against one Kubernetes version (empty when valid)."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return [f"{object_name(obj)} (k8s {version}) at {path or '<root>'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{object_name(obj)}: {e.message}"]
    return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k8s-versions", default=",".join(K8S_VERSIONS),
                   help="comma-separated Kubernetes versions to validate against")
    args = p.parse_args(argv)
    versions = tuple(v.strip() for v in args.k8s_versions.split(",") if v.strip())

    binary = helm.ensure_helm()
    print(f"helm-check: {helm.helm_version(binary)}, kubernetes-validate {kubernetes_validate.__version__}, "
          f"Kubernetes {', '.join(versions)}")
    num_validated = num_skipped = num_failed = 0
    errors: list[str] = []
    sets = helm.value_sets()
    for name, values in sets.items():
        try:
            helm.lint(binary, values)
            objects = helm.render(binary, values)
        except subprocess.CalledProcessError as e:
            print(f"  {name:16} FAIL {' '.join(e.cmd[1:3])}:\n{e.stdout}{e.stderr}")
            return 1
        skipped = [o for o in objects if (o["apiVersion"], o["kind"]) in CRD_KINDS]
        checked = [o for o in objects if (o["apiVersion"], o["kind"]) not in CRD_KINDS]
        for obj in checked:
            for version in versions:
                found = validate(obj, version)
                num_failed += bool(found)
                errors += [f"[{name}] {e}" for e in found]
            pinned = [f"{object_name(obj)}: image {im} is not pinned to a tag" for im in unpinned_images(obj)]
            num_failed += bool(pinned)
            errors += [f"[{name}] {e}" for e in pinned]
        num_validated += len(checked)
        num_skipped += len(skipped)
        kinds = sorted({o["kind"] for o in checked})
        print(f"  {name:16} lint ok, {len(checked):2} objects validated"
              + (f", {len(skipped)} CRD object(s) skipped" if skipped else "") + f" ({', '.join(kinds)})")
    for e in errors:
        print("  FAIL", e)
    num_checks = num_validated * (len(versions) + 1)  # a schema check per version + the image pin check
    print(f"helm-check: {len(sets)} value sets linted, {num_validated} manifests validated strictly against "
          f"Kubernetes {' and '.join(versions)}, {num_skipped} CRD objects skipped")
    print(f"helm-check: {num_checks - num_failed} passed, {num_failed} failed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
