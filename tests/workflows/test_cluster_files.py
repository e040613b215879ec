"""The cluster files users deploy with: the Ray cluster launcher YAML against Ray's own schema, the
KubeRay RayJob against KubeRay's RayJob CRD (unknown fields rejected), the image it runs, and both
against kd-ops' config and the Ray / torch versions kd-ops is tested with."""
from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import ray
import yaml

from workflows.config import load_config

ROOT = Path(__file__).parent.parent.parent
CLUSTER = ROOT / "cluster"
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
# KubeRay's RayJob CRD of a release (source and commit: tests/workflows/data/README.md)
RAYJOB_CRD = Path(__file__).parent / "data" / "kuberay-v1.7.0-ray.io_rayjobs.yaml"
TORCH = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)  # the tested torch


def _entrypoint(text: str, workdir: str) -> tuple[Path, list[str]]:
    """(config path in this repository, --set overrides) of a `kd run ...` command line whose config
    is a path in the image's copy of the repository at `workdir`."""
    argv = shlex.split(text)
    assert argv[:2] == ["kd", "run"], argv
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    config = PurePosixPath(argv[2])
    assert config.is_relative_to(workdir), f"{config} is not in the image's copy of the repository ({workdir})"
    return ROOT / config.relative_to(workdir), sets


def _dockerfile() -> dict[str, list[str]]:
    """Instruction → its arguments, in order, of cluster/Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            op, _, args = line.strip().partition(" ")
            out.setdefault(op.upper(), []).append(" ".join(args.split()))
    return out


def _pins(command: str) -> dict[str, str]:
    """Requirement name → pinned version of the `pip install` arguments in a shell command."""
    return {m[0]: m[1] for m in re.findall(r'"?([A-Za-z0-9_.-]+)(?:\[[a-z,]+\])?==([0-9][^"\s]*)"?', command)}


def _strict(schema):
    """The CRD schema with unknown fields rejected: `additionalProperties: false` on every object
    schema that lists properties and says nothing about others (what the API server's pruning and
    `kubectl apply --validate=strict` make of a CRD's structural schema)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in ("enum", "default", "example", "required", "properties") else _strict(v))
           for k, v in schema.items()}
    if "properties" in schema:  # `properties` maps names to schemas: walk the schemas, not the names
        out["properties"] = {name: _strict(s) for name, s in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def _rayjob_validators() -> tuple[jsonschema.Draft7Validator, jsonschema.Draft7Validator]:
    """(the CRD's own v1 schema, the same with unknown fields rejected)."""
    crd = yaml.load(RAYJOB_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1.4 MB
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "RayJob"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = v1["schema"]["openAPIV3Schema"]
    strict = _strict(schema)
    for s in (schema, strict):
        jsonschema.Draft7Validator.check_schema(s)
    return jsonschema.Draft7Validator(schema), jsonschema.Draft7Validator(strict)


def _rayjob() -> dict:
    return yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())


def _pod_specs(job: dict) -> dict[str, dict]:
    """Group name ("head" for the head group) → pod template of the RayJob's Ray cluster."""
    cluster = job["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"]} | {
        g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}


def test_cluster_launcher_yaml_is_valid_for_ray_and_pins_work_to_node_groups():
    cfg = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    jsonschema.validate(cfg, SCHEMA)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and types[cfg["head_node_type"]]["resources"]["CPU"] == 0
    assert types["teachers"]["resources"] == {"teacher_node": 1}
    assert types["students"]["resources"] == {"student_node": 1}
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["teachers"]["resources"] = {"teacher_node": "one"}  # the schema is really applied
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_cluster_launcher_installs_the_tested_ray_and_torch_before_kd_ops_and_keeps_the_dashboard_local():
    cfg = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    (setup,) = cfg["setup_commands"]
    assert _pins(setup) == {"torch": TORCH, "ray": ray.__version__}, setup
    assert re.search(r'"ray\[default,data,train,tune\]==', setup), setup  # dashboard/job API, Data, Train, Tune
    kd_ops = setup.index('"kd-ops @ git+')
    assert setup.index("torch==") < kd_ops and setup.index("ray[") < kd_ops, "torch and ray go in before kd-ops"
    (head_start,) = [c for c in cfg["head_start_ray_commands"] if c.startswith("ray start --head")]
    assert "--dashboard-host=127.0.0.1" in head_start.split()
    readme = (CLUSTER / "README.md").read_text()  # so the README says how to get at it: an SSH tunnel
    assert "ray dashboard cluster/cluster.yaml" in readme
    assert "ray job submit --address http://127.0.0.1:8265" in readme


def test_kuberay_rayjob_has_what_kuberay_needs_and_a_valid_kd_run():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for g in groups.values():
        assert g["replicas"] >= 1 and g["template"]["spec"]["containers"][0]["image"]
        assert "rayStartParams" in g
    config, sets = _entrypoint(spec["entrypoint"], _dockerfile()["WORKDIR"][-1])
    assert config.is_file(), config  # cluster/Dockerfile copies the repository, this file included
    cfg = load_config(config, sets)  # the job's config and overrides are valid kd-ops config
    started = {name: json.loads(json.loads(g["rayStartParams"]["resources"])) for name, g in groups.items()}
    assert cfg.precompute.resources and cfg.precompute.resources.keys() <= started["teachers"].keys()
    assert cfg.train.resources and cfg.train.resources.keys() <= started["students"].keys()


def test_kuberay_rayjob_is_valid_for_the_kuberay_rayjob_crd_with_unknown_fields_rejected():
    crd, strict = _rayjob_validators()
    job = _rayjob()
    strict.validate(job)
    head = ("spec", "rayClusterSpec", "headGroupSpec")

    def changed(path: tuple, key: str, value) -> dict:
        doc = copy.deepcopy(job)
        node = doc
        for p in path:
            node = node[p]
        node[key] = value
        return doc

    def without(path: tuple, key: str) -> dict:
        doc = copy.deepcopy(job)
        node = doc
        for p in path:
            node = node[p]
        node.pop(key)
        return doc

    container = (*head, "template", "spec", "containers", 0)
    misspelled = [
        changed(("spec",), "shutdownAfterJobFinish", True),
        changed(head, "rayStartParam", {"num-cpus": "0"}),
        changed(container, "workdir", "/app"),  # inside the embedded PodTemplateSpec too
        changed(("spec",), "submiterPodTemplate", {"spec": {"containers": []}}),
    ]
    for doc in misspelled:  # the CRD alone lets these through; rejecting them is what makes the check worth it
        crd.validate(doc)
        with pytest.raises(jsonschema.ValidationError, match="Additional properties are not allowed"):
            strict.validate(doc)
    wrong = [
        changed((*head, "rayStartParams"), "num-cpus", 0),  # rayStartParams is a map of strings
        changed(("spec", "rayClusterSpec", "workerGroupSpecs", 0), "replicas", "2"),
        changed(container, "envFrom", {"secretRef": {"name": "kd-ops-s3"}}),  # a list
        changed(container, "ports", [{"containerPort": "8265"}]),
        changed(("spec", "rayClusterSpec"), "authOptions", {"mode": "tokens"}),  # enum: disabled, token
        without(container, "name"),  # required
    ]
    for doc in wrong:
        with pytest.raises(jsonschema.ValidationError):
            crd.validate(doc)
    # the token auth cluster/README.md offers is valid for this CRD
    strict.validate(changed(("spec", "rayClusterSpec"), "authOptions", {"mode": "token"}))


def test_kuberay_rayjob_dashboard_is_reachable_by_the_submitter_and_only_inside_the_cluster():
    job = _rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    # KubeRay's submitter pod and the operator reach the dashboard through the head Service
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["num-cpus"] == "0"  # the driver only, as on the launcher cluster
    (container,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
    assert head["serviceType"] == "ClusterIP"
    assert "enableIngress" not in head and "headService" not in head
    # nothing in the job's runtime env turns Ray's auth off (a token cluster's driver must keep it)
    env = (yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}") or {}).get("env_vars", {})
    assert "RAY_AUTH_MODE" not in env
    # a NetworkPolicy selects this head and lets its submitter and the operator in (the job's own
    # pods: test_every_ray_pod_of_the_job_admits_only_the_jobs_pods)
    policy = _policies()["kd-ops-ray-head"]
    head_labels = head["template"]["metadata"]["labels"] | {"ray.io/node-type": "head"}  # KubeRay adds node-type
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected.items() <= head_labels.items() and "ray.io/node-type" in selected
    submitter, operator = policy["spec"]["ingress"]
    (peer,) = submitter["from"]
    assert peer["podSelector"]["matchLabels"] == {
        "ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": job["metadata"]["name"]}
    assert submitter["ports"] == [{"protocol": "TCP", "port": ports["dashboard"]}]
    (peer,) = operator["from"]
    assert peer == {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
    assert operator["ports"] == [{"protocol": "TCP", "port": ports["dashboard"]}]


def _policies() -> dict[str, dict]:
    """Name → NetworkPolicy of cluster/networkpolicy.yaml."""
    docs = list(yaml.safe_load_all((CLUSTER / "networkpolicy.yaml").read_text()))
    assert all(d["kind"] == "NetworkPolicy" and d["spec"]["policyTypes"] == ["Ingress"] for d in docs)
    return {d["metadata"]["name"]: d for d in docs}


def test_every_ray_pod_of_the_job_admits_only_the_jobs_pods():
    """Every node's dashboard agent accepts job submissions on its pod IP, not only the head's
    dashboard: every pod template is selected by an Ingress policy (so what no policy allows is
    refused), and whatever the policies selecting it let in is a pod of the job, except KubeRay's
    submitter and operator on the head's dashboard port."""
    job = _rayjob()
    policies = _policies().values()
    own = {"app.kubernetes.io/part-of": "kd-ops"}
    head_port = [{"protocol": "TCP", "port": 8265}]
    for group, template in _pod_specs(job).items():
        labels = template["metadata"]["labels"] | {"ray.io/node-type": "head" if group == "head" else "worker"}
        assert own.items() <= labels.items(), group
        selecting = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        assert selecting, f"no NetworkPolicy selects the {group} pods: anything in the cluster can reach them"
        for p in selecting:
            for rule in p["spec"]["ingress"]:
                for peer in rule.get("from") or [{"anyone": True}]:  # a rule without `from` lets in everything
                    ours = peer.keys() == {"podSelector"} and own.items() <= peer["podSelector"]["matchLabels"].items()
                    assert ours or (group == "head" and rule.get("ports") == head_port), (group, p["metadata"]["name"], peer)


def test_kuberay_rayjob_pods_run_the_repository_image_with_object_store_credentials():
    job = _rayjob()
    docker = _dockerfile()
    workdir = docker["WORKDIR"][-1]
    assert workdir == "/app"
    assert any(re.fullmatch(rf"(--chown=\S+ )?\. {workdir}", c) for c in docker["COPY"]), docker["COPY"]
    assert docker["FROM"] == [f"rayproject/ray:{ray.__version__}-py311"]
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    (install,) = docker["RUN"][-1:]
    assert _pins(install) == {"torch": TORCH, "ray": ray.__version__}, install
    assert install.index("torch==") < install.index("pip install --no-cache-dir .")
    ignored = {line.strip() for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", "mlruns"} <= ignored
    images = set()
    for group, template in _pod_specs(job).items():
        for c in template["spec"]["containers"]:
            assert c["workingDir"] == workdir, (group, c["name"])
            assert c["envFrom"] == [{"secretRef": {"name": "kd-ops-s3"}}], (group, c["name"])
            # MLflow's credentials from their optional Secret, in the pod's env (never the job's runtime env)
            assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]} == {
                k: {"name": "kd-ops-mlflow", "key": k, "optional": True}
                for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI")}, (group, c["name"])
            images.add(c["image"])
    assert len(images) == 1, images  # one image: the driver and every worker run the same kd-ops
