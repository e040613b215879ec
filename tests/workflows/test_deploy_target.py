"""A deploy target no node can hold fails before any teacher trains or runs, with one `kd: error:`
line naming the resource (it used to hang forever after all the training)."""
from __future__ import annotations

import pytest

from conftest import TINY_DEPLOY, tiny_config
from workflows import cli


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One --out and MLflow store for the cases: the data and its checks are made once and reused,
    and no case may leave a teacher, a store entry or a summary in it."""
    return tmp_path_factory.mktemp("deploy-target")


@pytest.mark.parametrize("target, named", [
    ({"resources": {"kd-no-such-node": 1}}, "kd-no-such-node: 1"),
    ({"threads": 64}, "CPU: 64"),
    ({"accelerator_type": "H100"}, "accelerator_type:H100: 0.001"),
])
def test_a_deploy_target_no_node_can_hold_fails_before_any_teacher_runs(ray_session, shared, tmp_path, capsys,
                                                                        target, named):
    cfg = tiny_config(tmp_path, deploy={**TINY_DEPLOY, "enabled": True, "target": {**TINY_DEPLOY["target"], **target}},
                      tune={"enabled": False}, train={"fit": {"epochs": 1}, "resource_wait_s": 1})
    out = shared / "out"
    capsys.readouterr()
    code = cli.main(["run", str(cfg), "--out", str(out), "--tracking-uri", f"sqlite:///{shared / 'mlflow.db'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kd:")]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("kd: error: deploy.target: gave up waiting for a node with {"), err
    assert named in err[0] and "after 1.0 s" in err[0] and "deploy.enabled: false" in err[0], err
    assert not list((out / "teachers").glob("*.safetensors")) and not (out / "store").exists()
    assert not (out / "summary.json").exists()
