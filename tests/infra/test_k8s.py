"""infra/k8s checked offline: no cluster, no network.

Built-in kinds go through kubernetes-validate's strict schemas for one pinned Kubernetes version;
RayCluster and RayJob through the vendored KubeRay v1.7.0 CRD schemas (infra/k8s/schemas/) with
jsonschema, closed: every object of the schema that lists its properties and does not say
``x-kubernetes-preserve-unknown-fields`` rejects unknown ones, as the API server does with
``kubectl apply --validate=strict`` (a CRD's structural schema alone would only prune them,
silently). Then what the schemas cannot say: versions and image tags against requirements.lock,
the head's num-cpus, memory requests == limits, a Secret template without values.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr

import radground
from radground.settings import ENV_NESTED_DELIMITER, ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
SCHEMAS = K8S / "schemas"
#: The Kubernetes minor the built-in kinds are validated against (kubernetes-validate ships 1.25-1.37).
KUBERNETES_VERSION = "1.34"
#: radground:<radground version>-ray<ray version>-py<python major+minor>-<variant>, built from docker/.
RADGROUND_IMAGE = re.compile(
    r"^radground:(?P<version>[^-]+)-ray(?P<ray>[0-9.]+)-py(?P<py>[0-9]+)-(?P<variant>cpu|cuda)$")


# --------------------------------------------------------------------------- loading
def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


DOCS = _documents()


def _is_ray(doc: dict) -> bool:
    return doc["apiVersion"].split("/")[0] == "ray.io"


def _one(kind: str) -> dict:
    found = [doc for _, doc in DOCS if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in infra/k8s, found {len(found)}"
    return found[0]


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _closed(schema: object) -> object:
    """A copy of a CRD schema in which objects with known properties reject unknown ones."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _closed(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _schema(kind: str, closed: bool = True) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{kind}.json").read_text())
    return jsonschema.Draft202012Validator(_closed(schema) if closed else schema)


def _crd_errors(doc: dict, closed: bool = True) -> list[str]:
    validator = _schema(doc["kind"], closed)
    return [f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in validator.iter_errors(doc)]


def _cluster_specs() -> Iterator[tuple[str, dict]]:
    """(where, RayClusterSpec) of the RayCluster and of every RayJob."""
    for name, doc in DOCS:
        if doc["kind"] == "RayCluster":
            yield f"{name} RayCluster", doc["spec"]
        elif doc["kind"] == "RayJob":
            yield f"{name} RayJob", doc["spec"]["rayClusterSpec"]


def _ray_groups(spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"worker group {group['groupName']}", group


def _ray_containers() -> Iterator[tuple[str, dict]]:
    for where, spec in _cluster_specs():
        for group_name, group in _ray_groups(spec):
            for container in group["template"]["spec"]["containers"]:
                yield f"{where} {group_name} container {container['name']}", container


def _validate_builtin(doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _builtin_error(doc: dict) -> str | None:
    """kubernetes-validate's finding as 'path: message' (its exception's repr carries the whole schema)."""
    try:
        _validate_builtin(doc)
    except kubernetes_validate.ValidationError as error:
        return f"{'.'.join(map(str, error.path)) or '<root>'}: {error.message}"
    return None


# --------------------------------------------------------------------------- schema checks
def test_every_manifest_is_a_known_kind() -> None:
    kinds = sorted(doc["kind"] for _, doc in DOCS)
    assert kinds == sorted(["ConfigMap", "Deployment", "Namespace", "RayCluster", "RayJob", "Role",
                            "RoleBinding", "Secret", "Secret", "ServiceAccount"])
    assert all(doc["metadata"].get("namespace") == "radground" for _, doc in DOCS if doc["kind"] != "Namespace")


@pytest.mark.parametrize(("name", "doc"), [(n, d) for n, d in DOCS if not _is_ray(d)],
                         ids=lambda value: value if isinstance(value, str) else value["kind"])
def test_builtin_kinds_validate_strictly(name: str, doc: dict) -> None:
    # SchemaNotFoundError (raised) for a kind or apiVersion that version does not serve; a wrong or
    # unknown field as 'path: message'.
    assert _builtin_error(doc) is None, f"{name} {doc['kind']}"


def test_kubernetes_validate_cli_passes_every_builtin_file() -> None:
    """The tool's own command, as an operator would run it; CRDs only warn there (no schema), so the
    Ray files are checked below instead."""
    import subprocess
    import sys

    files = sorted({name for name, doc in DOCS if not _is_ray(doc)})
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION,
                             *files], cwd=K8S, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("INFO") == sum(1 for _, doc in DOCS if not _is_ray(doc)), result.stdout
    assert "WARN" not in result.stdout and "ERROR" not in result.stdout, result.stdout


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_ray_resources_validate_against_closed_kuberay_schemas(kind: str) -> None:
    doc = _one(kind)
    assert doc["apiVersion"] == "ray.io/v1"
    assert _crd_errors(doc) == []


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_ray_metadata_and_pod_templates_validate_as_builtin_kinds(kind: str) -> None:
    """The CRD schema leaves metadata open; the Kubernetes schema of ObjectMeta and PodTemplate
    checks it and, a second time, every pod template (a Ray group's pod is an ordinary pod)."""
    doc = _one(kind)
    meta = {key: value for key, value in doc["metadata"].items() if key != "generateName"}
    meta.setdefault("name", doc["metadata"].get("generateName", "x").rstrip("-"))
    assert _builtin_error({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}) is None
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    for group_name, group in _ray_groups(spec):
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                    "template": group["template"]}
        assert _builtin_error(template) is None, f"{kind} {group_name} pod template"


def test_closed_schemas_catch_misspelt_fields_the_plain_crd_schema_lets_through() -> None:
    cluster = copy.deepcopy(_one("RayCluster"))
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = cluster["spec"]["headGroupSpec"].pop("rayStartParams")
    errors = _crd_errors(cluster)
    assert any(e.startswith("spec.headGroupSpec:") and "'rayStartParam'" in e for e in errors), errors
    # Why the schemas are closed: as published, the CRD schema accepts the typo (the API server
    # would prune the field and start the head with default resources).
    assert _crd_errors(cluster, closed=False) == []

    job = copy.deepcopy(_one("RayJob"))
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    assert any(e.startswith("spec:") and "'shutdownAfterJobFinish'" in e for e in _crd_errors(job))

    worker = copy.deepcopy(_one("RayJob"))
    container = worker["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["imagePullPolcy"] = container.pop("imagePullPolicy")
    errors = _crd_errors(worker)
    assert any(e.startswith("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0:")
               and "imagePullPolcy" in e for e in errors), errors

    wrong_type = copy.deepcopy(_one("RayCluster"))
    wrong_type["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    assert any(e.startswith("spec.workerGroupSpecs.0.maxReplicas:") for e in _crd_errors(wrong_type))


def test_strict_builtin_validation_catches_misspelt_fields() -> None:
    deployment = copy.deepcopy(_one("Deployment"))
    pod = deployment["spec"]["template"]["spec"]
    pod["serviceAcountName"] = pod.pop("serviceAccountName")
    error = _builtin_error(deployment)
    assert error is not None and error.startswith("spec.template.spec:") and "'serviceAcountName'" in error
    cluster = copy.deepcopy(_one("RayCluster"))
    cluster["metadata"]["lables"] = cluster["metadata"].pop("labels")
    error = _builtin_error({"apiVersion": "v1", "kind": "ConfigMap", "metadata": cluster["metadata"]})
    assert error is not None and error.startswith("metadata:") and "'lables'" in error


def test_vendored_schemas_are_the_v1_kuberay_schemas() -> None:
    readme = (SCHEMAS / "README.md").read_text()
    assert "v1.7.0" in readme and "Apache-2.0" in readme
    for kind in ("RayCluster", "RayJob"):
        schema = json.loads((SCHEMAS / f"{kind}.json").read_text())
        assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    cluster_spec = json.loads((SCHEMAS / "RayCluster.json").read_text())["properties"]["spec"]["properties"]
    assert cluster_spec["authOptions"]["properties"]["mode"]["enum"] == ["disabled", "token"]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_closed_schemas_are_valid_json_schemas(kind: str) -> None:
    """Against the 2020-12 meta-schema (about 10 s each: the schemas are large)."""
    jsonschema.Draft202012Validator.check_schema(_closed(json.loads((SCHEMAS / f"{kind}.json").read_text())))


# --------------------------------------------------------------------------- what the schemas cannot say
def test_ray_version_and_images_match_the_lock() -> None:
    locked = _locked()
    python = re.search(r">=(\d+)\.(\d+)", tomllib.loads((ROOT / "pyproject.toml").read_text())
                       ["project"]["requires-python"])
    assert python is not None
    specs = list(_cluster_specs())
    assert len(specs) == 2
    for where, spec in specs:
        assert spec["rayVersion"] == locked["ray"], f"{where}: rayVersion {spec['rayVersion']!r}, lock {locked['ray']}"
    images = [(where, container["image"]) for where, container in _ray_containers()]
    for where, image in images:
        match = RADGROUND_IMAGE.match(image)
        assert match, f"{where}: image {image!r} is not radground:<version>-ray<ray>-py<python>-<cpu|cuda>"
        assert match["ray"] == locked["ray"], f"{where}: {image} carries ray {match['ray']}, lock {locked['ray']}"
        assert match["version"] == radground.__version__, f"{where}: {image}, radground {radground.__version__}"
        assert match["py"] == "".join(python.groups()), f"{where}: {image}, requires-python {python.group(0)}"
    worker = _one("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert worker == f"prefecthq/prefect:{locked['prefect']}-python{'.'.join(python.groups())}-kubernetes"


def test_ray_clusters_use_token_auth_and_a_head_without_cpus() -> None:
    secrets = {doc["metadata"]["name"]: doc for _, doc in DOCS if doc["kind"] == "Secret"}
    for where, spec in _cluster_specs():
        assert spec["authOptions"]["mode"] == "token", where
        assert "auth_token" in secrets[spec["authOptions"]["secretName"]]["stringData"], where
        head = spec["headGroupSpec"]["rayStartParams"]
        assert head["num-cpus"] == "0", f"{where}: the head must schedule no tasks (rayStartParams num-cpus '0')"


def test_memory_requests_equal_limits_for_every_ray_container() -> None:
    checked = []
    for where, container in _ray_containers():
        resources = container["resources"]
        assert resources["requests"]["memory"] == resources["limits"]["memory"], where
        assert resources["requests"]["cpu"] == resources["limits"]["cpu"], where
        checked.append(where)
    cluster = _one("RayCluster")["spec"]
    autoscaler = cluster["autoscalerOptions"]["resources"]
    assert autoscaler["requests"]["memory"] == autoscaler["limits"]["memory"]
    assert len(checked) == 4  # RayCluster head + cpu group, RayJob head + gpu group


def test_ray_pods_run_as_the_images_user() -> None:
    for where, spec in _cluster_specs():
        for group_name, group in _ray_groups(spec):
            context = group["template"]["spec"]["securityContext"]
            assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, f"{where} {group_name}"


def test_raycluster_has_an_autoscaling_worker_group() -> None:
    spec = _one("RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"  # needed for per-group idleTimeoutSeconds
    (group,) = spec["workerGroupSpecs"]
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["minReplicas"] < group["maxReplicas"]
    assert "num-cpus" not in group["rayStartParams"]  # Ray reads the CPUs from the container limits


def test_rayjob_trains_and_cleans_up() -> None:
    spec = _one("RayJob")["spec"]
    assert spec["entrypoint"].split()[:2] == ["radground", "train"]
    assert "radground" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    from typer.main import get_command

    from radground.cli import app

    assert "train" in get_command(app).commands
    # KubeRay's own rules (ray-operator/controllers/ray/utils/validation.go at v1.7.0): a TTL needs
    # shutdownAfterJobFinishes, the deadline must be positive.
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "RADGROUND_RAY__ADDRESS", "value": "auto"} in head["env"]
    (gpu,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"]  # no autoscaling: fixed DDP ranks


def test_prefect_worker_may_run_jobs_and_nothing_more() -> None:
    role = _one("Role")
    rules = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
             for group in rule["apiGroups"] for resource in rule["resources"]}
    assert {"create", "get", "list", "watch", "delete"} <= rules[("batch", "jobs")]
    assert {"get", "list", "watch"} == rules[("", "pods")] == rules[("", "pods/log")]
    assert all("*" not in verbs for verbs in rules.values())
    assert not any(resource == "secrets" for _, resource in rules)
    binding = _one("RoleBinding")
    account = _one("ServiceAccount")["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "radground"}]
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account
    args = pod["containers"][0]["args"]
    assert args[:3] == ["prefect", "worker", "start"]
    assert args[args.index("--type") + 1] == "kubernetes"
    assert "--base-job-template" not in args  # the pool keeps the template the server has


# --------------------------------------------------------------------------- secrets and settings
def _settings_env_names(secret: bool) -> set[str]:
    """RADGROUND_<GROUP>__<FIELD> of every (Secret)Str setting, or of every setting."""
    names = set()
    for group_name, group_field in Settings.model_fields.items():
        group = group_field.annotation
        fields = group.model_fields.items() if isinstance(group, type) and hasattr(group, "model_fields") else []
        if not fields and (not secret or group_field.annotation is SecretStr):
            names.add(f"{ENV_PREFIX}{group_name}".upper())
        for field_name, field in fields:
            is_secret = SecretStr in (field.annotation, *typing.get_args(field.annotation))
            if is_secret or not secret:
                names.add(f"{ENV_PREFIX}{group_name}{ENV_NESTED_DELIMITER}{field_name}".upper())
    return names


def test_secret_templates_hold_keys_only() -> None:
    secrets = [doc for _, doc in DOCS if doc["kind"] == "Secret"]
    assert secrets
    for doc in secrets:
        assert "data" not in doc, f"{doc['metadata']['name']}: keys go in stringData with empty values"
        values = doc["stringData"]
        assert values and all(value == "" for value in values.values()), (
            f"{doc['metadata']['name']}: a value in the template: {sorted(k for k, v in values.items() if v)}")
    env = next(doc for doc in secrets if doc["metadata"]["name"] == "radground-env")
    assert set(env["stringData"]) == _settings_env_names(secret=True)


def test_configmap_names_real_settings_and_no_secret() -> None:
    data = _one("ConfigMap")["data"]
    known = _settings_env_names(secret=False)
    unknown = {name for name in data if name.startswith(ENV_PREFIX) and name not in known}
    assert not unknown, f"not radground settings (misspelt?): {sorted(unknown)}"
    assert not {name for name in data if name in _settings_env_names(secret=True)}
    assert not [name for name in data if re.search(r"KEY|TOKEN|PASSWORD|SECRET", name)]


def test_closing_reaches_every_object_but_metadata() -> None:
    """How strict the check can be: no object of either schema preserves unknown fields or declares
    additionalProperties, so every object that lists properties is closed; only the root's
    metadata is free-form (checked as ObjectMeta above)."""
    def open_objects(schema: object, path: str = "") -> Iterator[str]:
        if isinstance(schema, dict):
            if schema.get("type") == "object" and "additionalProperties" not in schema:
                yield path
            for key, value in schema.items():
                yield from open_objects(value, f"{path}/{key}")
        elif isinstance(schema, list):
            for index, value in enumerate(schema):
                yield from open_objects(value, f"{path}[{index}]")

    for kind in ("RayCluster", "RayJob"):
        schema = _closed(json.loads((SCHEMAS / f"{kind}.json").read_text()))
        assert list(open_objects(schema)) == ["/properties/metadata"]


def test_base_job_template_patch_names_the_manifests_and_the_image() -> None:
    """infra/k8s/base-job-template.jq (applied with jq to the template the server hands out; that step
    needs prefect-kubernetes and jq, so here only what it names is checked)."""
    text = (K8S / "base-job-template.jq").read_text()
    (image,) = re.findall(r'"(radground:[^"]+)"', text)
    match = RADGROUND_IMAGE.match(image)
    assert match and match["ray"] == _locked()["ray"] and match["version"] == radground.__version__, image
    names = {(doc["kind"], doc["metadata"].get("name")) for _, doc in DOCS}
    for kind, name in re.findall(r'"(configMapRef|secretRef|secretName)":\s*(?:\{"name":\s*)?"([^"]+)"', text):
        assert ({"configMapRef": "ConfigMap"}.get(kind, "Secret"), name) in names, name
    assert '"RAY_AUTH_MODE": "token"' in text
    assert re.search(r'memory_request\.default = "(\w+)"\n.*memory_limit\.default = "\1"\n', text)
