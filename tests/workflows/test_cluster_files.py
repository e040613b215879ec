"""The cluster files users deploy with: the Ray cluster launcher YAML against Ray's own schema,
the KubeRay RayJob against the fields KubeRay needs, and both against kd-ops' config."""
from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from workflows.config import load_config

ROOT = Path(__file__).parent.parent.parent
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def _entrypoint(text: str) -> tuple[Path, list[str]]:
    """(config path, --set overrides) of a `kd run ...` command line."""
    argv = shlex.split(text)
    assert argv[:2] == ["kd", "run"], argv
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return ROOT / argv[2], sets


def test_cluster_launcher_yaml_is_valid_for_ray_and_pins_work_to_node_groups():
    cfg = yaml.safe_load((ROOT / "cluster" / "cluster.yaml").read_text())
    jsonschema.validate(cfg, SCHEMA)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and types[cfg["head_node_type"]]["resources"]["CPU"] == 0
    assert types["teachers"]["resources"] == {"teacher_node": 1}
    assert types["students"]["resources"] == {"student_node": 1}
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["teachers"]["resources"] = {"teacher_node": "one"}  # the schema is really applied
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_kuberay_rayjob_has_what_kuberay_needs_and_a_valid_kd_run():
    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for g in groups.values():
        assert g["replicas"] >= 1 and g["template"]["spec"]["containers"][0]["image"]
        assert "rayStartParams" in g
    config, sets = _entrypoint(spec["entrypoint"])
    cfg = load_config(config, sets)  # the job's config and overrides are valid kd-ops config
    started = {name: json.loads(json.loads(g["rayStartParams"]["resources"])) for name, g in groups.items()}
    assert cfg.precompute.resources and cfg.precompute.resources.keys() <= started["teachers"].keys()
    assert cfg.train.resources and cfg.train.resources.keys() <= started["students"].keys()
