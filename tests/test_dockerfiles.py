"""The Dockerfiles (deploy/docker) cannot be built here (no Docker engine), so their
static facts are checked: pinned base images, every COPY source present in the repository,
the same pins as the Makefile and pyproject.toml, torch installed first, a non-root user."""
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": REPO / "deploy" / "docker" / "Dockerfile.cpu",
               "cuda": REPO / "deploy" / "docker" / "Dockerfile.cuda"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, out, current = path.read_text().splitlines(), [], ""
    for line in lines:
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            current = ""
    return out


def makefile_pin(name: str) -> str:
    (value,) = re.findall(rf"^{name}\s*:=\s*(\S+)$", (REPO / "Makefile").read_text(), re.M)
    return value


def pyproject_pin(package: str) -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith(f"{package}==")]
    return pin


@pytest.fixture(params=sorted(DOCKERFILES))
def dockerfile(request):
    return request.param, instructions(DOCKERFILES[request.param])


def test_base_image_is_pinned_by_tag(dockerfile):
    _, ins = dockerfile
    froms = [args.split()[0] for word, args in ins if word == "FROM"]
    assert froms
    for image in froms:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{image} has no tag"
        assert tag != "latest" and re.match(r"^\d+\.\d+\.\d+", tag), f"{image}: tag is not a full version"


def test_every_copied_path_exists_in_the_repository(dockerfile):
    _, ins = dockerfile
    copies = [args.split() for word, args in ins if word == "COPY"]
    assert copies
    for *sources, _dest in copies:
        for source in sources:
            assert not source.startswith("--"), "COPY --from/--chown is not used here"
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    copied = {s.rstrip("/") for *sources, _ in copies for s in sources}
    # What `pip install .` needs: the project file, its readme, every package it finds.
    assert {"pyproject.toml", "README.md", "proto", "bros", "scheduler_svc", "worker_svc", "kernels"} <= copied


def test_install_order_and_pins_match_the_makefile_and_pyproject(dockerfile):
    variant, ins = dockerfile
    runs = [args for word, args in ins if word == "RUN"]
    pip_runs = [r for r in runs if "pip install" in r]
    torch = makefile_pin("TORCH")
    assert torch in pip_runs[0], "torch goes in first and alone"
    assert (variant == "cpu") == ("download.pytorch.org/whl/cpu" in " ".join(args for _, args in ins))
    assert any(f"--no-deps {makefile_pin('SMOLLM')}" in r for r in pip_runs)
    (stubs,) = [r for r in runs if "grpc_tools.protoc" in r]
    assert pyproject_pin("grpcio-tools") in stubs and pyproject_pin("protobuf") in stubs
    assert "proto/bros/v1/*.proto" in stubs and list((REPO / "proto" / "bros" / "v1").glob("*.proto"))
    install = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert runs.index(stubs) < install, "stubs are generated before `pip install .` so the wheel has them"


def test_runs_as_a_non_root_user(dockerfile):
    _, ins = dockerfile
    users = [args for word, args in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0] == "10001"  # the Helm chart's runAsUser
    chart = (REPO / "deploy" / "k8s" / "bros" / "templates" / "_helpers.tpl").read_text()
    assert "runAsUser: 10001" in chart
