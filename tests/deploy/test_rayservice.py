"""deploy/kuberay/rayservice.yaml: valid against KubeRay's RayService CRD, the same app as deploy/serve.yaml, GPUs,
probes and secrets where they belong. No cluster here: the CRD's own schema is the check."""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from jsonschema.protocols import Validator

from serving.config import load_config
from tests.deploy.crd_schema import crd_version_schema, errors, validator
from tests.paths import REPO

MANIFEST = REPO / "deploy" / "kuberay" / "rayservice.yaml"
# KubeRay's generated CRD is third-party data this repository does not ship: it is read from the steering repo's
# shared/ folder (beside the checkout, as CI lays it out). deploy/kuberay/crd/README.md names its version and hash.
CRD = REPO.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml"
CRD_HINT = (
    f"{CRD} is missing: KubeRay's generated CRD (repository ray-project/kuberay, the tag named in "
    "deploy/kuberay/crd/README.md, file ray-operator/config/crd/bases/ray.io_rayservices.yaml) must be placed in "
    "shared/kuberay/ for the schema check; the manifest's structural checks run without it"
)
Doc = dict[str, Any]


@pytest.fixture(scope="module")
def schema() -> Validator:
    if not CRD.exists():
        pytest.skip(CRD_HINT)
    return validator(crd_version_schema(CRD, "v1"))


def documents() -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def rayservice() -> Doc:
    (service,) = [doc for doc in documents() if doc["kind"] == "RayService"]
    return service


def sessionserve_config() -> Doc:
    (config_map,) = [doc for doc in documents() if doc["kind"] == "ConfigMap"]
    return yaml.safe_load(config_map["data"]["config.yaml"])


def cluster() -> Doc:
    return rayservice()["spec"]["rayClusterConfig"]


def gpu_group() -> Doc:
    (group,) = [g for g in cluster()["workerGroupSpecs"] if "nvidia.com/gpu" in str(g["template"])]
    return group


def containers() -> Iterator[Doc]:
    yield from cluster()["headGroupSpec"]["template"]["spec"]["containers"]
    for group in cluster()["workerGroupSpecs"]:
        yield from group["template"]["spec"]["containers"]


def test_manifest_is_valid_against_the_crd(schema: Validator) -> None:
    service = rayservice()
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    assert errors(schema, service) == []


def _num_gpus_as_int(doc: Doc) -> None:
    doc["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0


def _unknown_container_field(doc: Doc) -> None:
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["gpus"] = 1


def _unknown_spec_field(doc: Doc) -> None:
    doc["spec"]["serveConfig"] = doc["spec"]["serveConfigV2"]  # a typo'd / removed field


def _no_group_name(doc: Doc) -> None:
    del doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]


def _quantity_as_list(doc: Doc) -> None:
    resources = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    resources["resources"]["limits"]["nvidia.com/gpu"] = [1]  # int-or-string: neither


def _replicas_too_big(doc: Doc) -> None:
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = 2**31  # format int32


BREAKAGES = [  # (how, what the error must name)
    (_num_gpus_as_int, "num-gpus: 0 is not of type 'string'"),
    (_unknown_container_field, "'gpus' was unexpected"),
    (_unknown_spec_field, "'serveConfig' was unexpected"),
    (_no_group_name, "'groupName' is a required property"),
    (_quantity_as_list, "nvidia.com/gpu: [1] is not valid"),
    (_replicas_too_big, "replicas: 2147483648 is not a 'int32'"),
]


@pytest.mark.parametrize(("breakage", "expected"), BREAKAGES, ids=[b.__name__ for b, _ in BREAKAGES])
def test_broken_copies_fail_validation(schema: Validator, breakage: Callable[[Doc], None], expected: str) -> None:
    broken = copy.deepcopy(rayservice())
    breakage(broken)
    found = errors(schema, broken)
    assert any(expected in error for error in found), found


def test_int_or_string_accepts_both(schema: Validator) -> None:
    service = copy.deepcopy(rayservice())
    limits = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    for quantity in (1, "1", "500m"):
        limits["resources"]["limits"]["cpu"] = quantity
        assert errors(schema, service) == [], quantity


def test_same_application_as_serve_yaml() -> None:
    shipped = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    embedded = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    keys = ("name", "import_path", "args", "route_prefix")
    apps = [[{k: app.get(k) for k in keys} for app in cfg["applications"]] for cfg in (shipped, embedded)]
    assert apps[0] == apps[1]
    assert apps[0][0]["import_path"] == "serving.server.builder:app_builder"
    assert embedded["http_options"] == shipped["http_options"]
    assert (shipped["http_options"]["host"], shipped["http_options"]["port"]) == ("0.0.0.0", 8000)


def test_head_runs_no_model_and_the_gpu_group_asks_for_gpus() -> None:
    assert cluster()["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert cluster()["rayVersion"] == "2.60.0"
    spec = gpu_group()["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    (container,) = spec["containers"]
    gpus = sessionserve_config()["serving"]["gpus_per_replica"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert gpu_group()["replicas"] == sessionserve_config()["serving"]["replicas"], "one model replica per GPU worker"
    images = {c["image"] for c in containers()}
    assert len(images) == 1 and "sessionserve" in images.pop(), "every node runs the image of Dockerfile.gpu"


def test_gpu_workers_probe_ready_and_health_and_the_head_does_not_wait_for_ready() -> None:
    (worker,) = gpu_group()["template"]["spec"]["containers"]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8000}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert worker["startupProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    # KubeRay submits the application only once the head is ready: a head gated on /ready would never be.
    (head,) = cluster()["headGroupSpec"]["template"]["spec"]["containers"]
    assert "/ready" not in str(head.get("readinessProbe", ""))
    assert rayservice()["spec"]["excludeHeadPodFromServeSvc"] is True


def test_secrets_come_from_a_secret_and_the_config_names_none() -> None:
    for container in containers():
        env = {e["name"]: e for e in container["env"]}
        for name in ("PGPASSWORD", "SESSIONSERVE_API_KEYS"):
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"] == "sessionserve-secrets"
    raw = sessionserve_config()
    config = load_config(None, raw)  # the ConfigMap's file is a valid sessionserve config
    assert config.sessions.store.startswith("postgresql://")
    assert ":" not in config.sessions.store.removeprefix("postgresql://").split("@")[0], "password in the store URL"
    assert raw["serving"].get("api_keys", []) == []


def test_the_config_map_is_configs_gpu_yaml_but_for_the_replica_counts() -> None:
    in_cluster = load_config(None, sessionserve_config()).model_dump()
    in_image = load_config(REPO / "configs" / "gpu.yaml").model_dump()
    assert in_cluster["serving"]["ingress_replicas"] == 2, "one ingress replica would be lost with its node"
    for config in (in_cluster, in_image):
        del config["serving"]["replicas"], config["serving"]["ingress_replicas"]
    assert in_cluster == in_image


def test_config_and_model_are_mounted_where_the_app_reads_them() -> None:
    target = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])["applications"][0]["args"]["config"]
    for container in containers():
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts[target]["subPath"] == "config.yaml"
    (worker,) = gpu_group()["template"]["spec"]["containers"]
    models = {m["mountPath"]: m for m in worker["volumeMounts"]}["/models"]
    assert models["readOnly"] is True
    assert sessionserve_config()["model"]["name"].startswith("/models/")


def test_the_crd_is_the_version_its_readme_names() -> None:
    if not CRD.exists():
        pytest.skip(CRD_HINT)
    readme = (CRD.parent / "README.md").read_text()
    digest = hashlib.sha256(CRD.read_bytes()).hexdigest()
    assert f"sha256: `{digest}`" in readme, "CRD file changed: update its KubeRay version and sha256 in the README"
    assert re.search(r"\*\*KubeRay v\d+\.\d+\.\d+\*\*", readme)
