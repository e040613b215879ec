"""Distillation methods on the one pipeline: stored vs online teacher features, bad method input,
and a `kd run` with a teacher-assistant chain, online feature KD and DKD."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from kd_ops import feature_kd, method_loss, models, store
from conftest import TINY_DEPLOY, one_teacher_split
from test_errors import _nothing_complete, _parquet_source, _run, _teacher
from workflows import ingest
from workflows.stages import chain
from workflows import precompute as pre
from workflows.config import load_config


def test_stored_and_online_teacher_features_give_the_same_loss(ray_session, tmp_path):
    split, src, w, t = one_teacher_split(tmp_path)
    spec = pre.TeacherSpec.of(t).features("features.3", pool=None)
    opts = dict(feature_columns=["x"], batch_size=64, num_actors=1, use_gpu=False)
    pre.precompute([t], {"train": src}, tmp_path / "store", **opts)
    [r] = pre.precompute([spec], {"train": src}, tmp_path / "store", **opts)
    assert r.manifest["columns"]["logits"] == {"dtype": "float16", "shape": [8, 10]}  # [channels, positions]
    assert r.manifest["bytes_per_row"] == 8 * 10 * 2
    ds, rows, _ = ingest.dataset({"train": src}, feature_columns=["x"], label_column="label",
                                 store_dir=tmp_path / "store", teachers=["t"], shuffle=False, features=spec.name)
    batch = next(iter(ds.iter_torch_batches(batch_size=128)))
    assert rows == len(split.ids) and batch["features"].shape == (128, 8, 10) and batch["features"].dtype == torch.float16

    torch.manual_seed(0)
    student = feature_kd.feature_student(models.cnn(width=4), "features.3", batch["x"][:2], [8, 10], "hint")
    online = feature_kd.LayerOutput(models.load_weights(models.cnn(width=8), w), "features.3").eval()
    logits = student(batch["x"])
    m = method_loss.Distill((1.0,), temperature=2.0, alpha=0.5, feature="hint", feature_weight=1.0)
    args = (logits, batch["logits"].transpose(0, 1), batch["y"], torch.ones(1), m)
    stored_loss, stored = method_loss.student_loss(*args,
                                                   student_features=student.features, teacher_features=batch["features"])
    online_f = feature_kd.teacher_features(online, batch["x"])
    online_loss, live = method_loss.student_loss(*args,
                                                 student_features=student.features, teacher_features=online_f)
    assert torch.equal(online_f, batch["features"])
    assert stored_loss.item() == online_loss.item() and stored["feature"] == live["feature"] > 0


def _method_config(tmp_path, deploy: dict | None = None, **distill) -> str:
    cfg = {"name": "methods", "data": _parquet_source(tmp_path), "teachers": _teacher(tmp_path),
           "student": {"kwargs": {"width": 4}}, "distill": {"temperature": 2.0, **distill},
           "train": {"fit": {"epochs": 1, "batch_size": 64}, "label_only_fit": {"epochs": 1}},
           "precompute": {"batch_size": 128, "num_actors": 1}, "tune": {"enabled": False},
           "tracking": {"experiment": "methods"}, "deploy": deploy or {"enabled": False}}
    path = tmp_path / "methods.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("feature, message", [
    ({"student_layer": "features.9", "teacher_layer": "features.5"},
     "student has no layer 'features.9'; its layers are: features, features.0, features.1"),
    ({"student_layer": "features.5", "teacher_layer": "body"}, "teacher has no layer 'body'; its layers are: features"),
    ({"student_layer": "features.5", "teacher_layer": "head"},
     "no projection maps student features of shape [4, 5] to teacher features [10]"),
    ({"kind": "attention", "student_layer": "head", "teacher_layer": "features.5"},
     "attention transfer needs [channels, positions] features; student layer 'head' gives [10]"),
])
def test_bad_feature_layers_fail_before_any_teacher_runs(ray_session, capsys, tmp_path, feature, message):
    rc, err, uri = _run(capsys, tmp_path, "run", _method_config(tmp_path, feature=feature))
    assert rc == 2 and message in err and err.count("kd: error:") == 1, err
    _nothing_complete(tmp_path, uri)
    assert not (tmp_path / "out" / "store").exists()


def test_an_assistant_larger_than_its_teacher_is_warned_about(capsys, tmp_path):
    cfg = load_config(_method_config(tmp_path, assistants=[{"name": "big", "kwargs": {"width": 32}},
                                                           {"name": "small", "kwargs": {"width": 6}}]))
    chain.warn_sizes(cfg, cfg.teachers)
    err = capsys.readouterr().err
    big = models.num_params(models.cnn(width=32))
    assert f"kd: warning: assistant 'big' ({big:,} params) is larger than the smallest teacher (" in err
    assert "'small'" not in err


@pytest.mark.parametrize("distill, message", [
    ({"dkd": {"beta": -1}}, "distill.dkd.beta: Input should be greater than or equal to 0"),
    ({"schedule": "step"}, "distill.schedule: Input should be 'constant', 'linear' or 'cosine'"),
    ({"feature": {"student_layer": "a", "teacher_layer": "b", "teacher": "t9"}}, "distill.feature.teacher 't9' is not a teacher"),
    ({"assistants": [{"name": "a", "kwargs": {}}], "generations": 2}, "give distill.assistants (TAKD) or distill.generations"),
    ({"generations": 0}, "distill.generations: Input should be greater than or equal to 1"),
])
def test_method_settings_outside_their_range_are_config_errors(capsys, tmp_path, distill, message):
    rc, err, _ = _run(capsys, tmp_path, "run", _method_config(tmp_path, **distill))
    assert rc == 2 and message in err and err.count("kd: error:") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, message", [
    ("tune.response={choice: [hinton, fitnet]}", "tune.response must be a choice among ['hinton', 'dkd']"),
    ("tune.dkd_beta={uniform: [-1, 8]}", "tune.dkd_beta values must be >= 0"),
    ("tune.feature_weight={choice: [0.5]}", "tune.feature_weight searches the feature term's weight: set distill.feature"),
])
def test_method_search_space_errors(capsys, tmp_path, override, message):
    rc, err, _ = _run(capsys, tmp_path, "run", _method_config(tmp_path), "--set", override)
    assert rc == 2 and message in err, err


def test_kd_run_with_a_teacher_assistant_online_features_and_dkd(ray_session, capsys, tmp_path):
    path = _method_config(tmp_path, response="dkd", dkd={"alpha": 1.0, "beta": 4.0}, schedule="linear",
                          temperature_end=1.0, assistants=[{"name": "a", "kwargs": {"width": 6}}],
                          feature={"student_layer": "features.5", "teacher_layer": "features.5", "source": "online",
                                   "weight": 0.5}, deploy=TINY_DEPLOY)
    rc, err, uri = _run(capsys, tmp_path, "run", path)
    assert rc == 0, err
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    [stage] = s["chain"]
    assert stage["name"] == "assistant-a" and stage["params"] == models.num_params(models.cnn(width=6))
    assert 0 <= stage["test_accuracy"] <= 1
    c = s["student"]["config"]
    assert c["teachers"] == ["t", "assistant-a"] and c["teacher_weights"] == [0.0, 1.0]
    assert c["method"]["response"] == "dkd" and c["method"]["dkd_beta"] == 4.0 and c["method"]["feature"] == "hint"
    # the assistant's logits are a teacher in the store; online features write no feature entry
    entries = sorted(p.parent.name for p in (tmp_path / "out" / "store").rglob("manifest.json"))
    assert entries == ["assistant-a", "t"]
    a = store.read_manifest(tmp_path / "out" / "store", "assistant-a")
    t = store.read_manifest(tmp_path / "out" / "store", "t")
    assert a["shards"].keys() == t["shards"].keys() and sum(sh["rows"] for sh in a["shards"].values()) == 300
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("methods")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = s["mlflow"]["parent_run_id"]
    assert runs["assistant-a"].data.tags["mlflow.parentRunId"] == parent
    assert runs["assistant-a"].data.metrics["test_accuracy"] == pytest.approx(stage["test_accuracy"])
    assert np.isfinite(s["student"]["test_accuracy"])
    # quantization-aware distillation (deploy.qat: always) trains with DKD; the feature term is left out
    # (its projection is not shipped), so the fine-tune runs without the online feature teacher
    i8 = s["deploy"]["int8"]
    assert i8["qat_epochs"] == 1 and 0 <= i8["qat_val_accuracy"] <= 1
    assert runs["deploy"].data.tags["mlflow.parentRunId"] == parent
    assert runs["qat-student"].data.tags["mlflow.parentRunId"] == runs["deploy"].info.run_id
    assert runs["qat-student"].data.params["epochs"] == "1"


def test_tune_searches_the_method_and_each_trial_trains_with_its_point(tmp_path):
    from ray import tune as ray_tune

    from workflows import tasks
    from workflows.stages import training_data
    from workflows.tune import apply_trial, search_space

    cfg = load_config(_method_config(tmp_path, feature={"student_layer": "features.5", "teacher_layer": "features.5"}),
                      ["tune.response={choice: [hinton, dkd]}", "tune.dkd_beta={uniform: [1, 8]}",
                       "tune.schedule={choice: [constant, cosine]}", "tune.temperature_end={choice: [1.0]}",
                       "tune.feature_weight={loguniform: [0.1, 10]}",
                       "tune.teacher_weighting={choice: [static, entropy, correctness]}"])
    space = search_space(cfg.tune, ["t"])
    assert {"response", "dkd_beta", "schedule", "temperature_end", "feature_weight", "teacher_weighting"} <= set(space)
    assert isinstance(space["response"], ray_tune.search.sample.Categorical)
    base = training_data.loop(tasks.for_config(cfg), cfg.student.factory, cfg.student.kwargs, cfg.train.fit,
                       inputs=training_data.Inputs({}, {"train": 100}, True, ""), label="s", distill=True)
    assert base.distill == method_loss.Distill((1.0,), temperature=cfg.distill.temperature, alpha=cfg.distill.alpha,
                                               feature="hint", feature_weight=1.0)
    point = {"response": "dkd", "dkd_beta": 2.5, "schedule": "cosine", "temperature_end": 1.0, "feature_weight": 0.3,
             "temperature": 3.0, "teacher_weighting": "correctness"}
    loop = apply_trial(base, point, ["t"], "width")
    assert loop.distill == dataclasses.replace(base.distill, response="dkd", dkd_beta=2.5, schedule="cosine",
                                               temperature_end=1.0, feature_weight=0.3, teacher_weighting="correctness",
                                               temperature=3.0)
    assert loop.distill.feature == "hint" and loop.features == base.features


def test_a_width_only_point_keeps_a_labels_only_loop_labels_only():
    """A search of widths alone (temperature, α and weights unsearched) also runs loops without
    teachers: the point changes the student's width and leaves `distill` unset."""
    from workflows.loop import Loop
    from workflows.tune import apply_trial

    base = Loop(factory="kd_ops.models:cnn", kwargs={"width": 8}, epochs=1, batch_size=8, lr=0.01, weight_decay=0.0,
                seed=0, train_rows=10)
    loop = apply_trial(base, {"student_width": 5}, [], "width")
    assert loop.kwargs == {"width": 5} and loop.distill is None
