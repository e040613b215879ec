"""Every choice reads the validation split: warnings, the budget's pick (by a trial's best epoch,
as Tune's pick) and the check of the retrained final student against the quality target. The
test split only scores what ships. (INT8's PTQ-or-QAT choice on a real run: test_pipeline.py.)"""
from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from workflows import advice
from workflows.stages import search
from workflows.config import TuneConfig
from workflows.tune import _best_epoch

CFG = SimpleNamespace(tune=TuneConfig())


def _summary(kd_val: float, kd_test: float, lo_val: float, lo_test: float, **extra) -> dict:
    return {"student": {"val_accuracy": kd_val, "test_accuracy": kd_test},
            "label_only_student": {"val_accuracy": lo_val, "test_accuracy": lo_test},
            "teachers": [{"name": "t", "val_accuracy": 0.9, "test_accuracy": 0.5}],
            "val_rows": 5000, "test_rows": 5000, **extra}


def test_warnings_follow_the_validation_split_where_it_and_the_test_split_disagree():
    # test says the label-only student wins by far and the teacher is weak; validation says neither
    assert advice.warnings(_summary(0.90, 0.60, 0.80, 0.85), CFG, None) == []
    # validation says the label-only student wins; test says the opposite
    w = advice.warnings(_summary(0.60, 0.90, 0.85, 0.80), CFG, None)
    assert len(w) == 1 and w[0].startswith("the label-only student (val accuracy 0.8500) beats the KD student (0.6000)")
    assert "on 5000 validation rows" in w[0]


def test_a_trial_counts_by_its_best_epoch_as_tunes_own_pick():
    frame = pd.DataFrame({"training_iteration": [1, 2, 3], "val_accuracy": [0.5, 0.8, 0.7],
                          "val_agreement": [0.4, 0.9, 0.6]})
    last = {"training_iteration": 3, "val_accuracy": 0.7, "val_agreement": 0.6}
    best = _best_epoch(SimpleNamespace(metrics_dataframe=frame, metrics=last), "val_accuracy", "max")
    assert (best["training_iteration"], best["val_accuracy"], best["val_agreement"]) == (2, 0.8, 0.9)
    frame = pd.DataFrame({"training_iteration": [1, 2], "val_perplexity": [9.0, 12.0]})
    assert _best_epoch(SimpleNamespace(metrics_dataframe=frame, metrics={}), "val_perplexity", "min")[
        "val_perplexity"] == 9.0
    assert _best_epoch(SimpleNamespace(metrics_dataframe=None, metrics=last), "val_accuracy", "max") == last


def test_a_quality_target_with_no_trial_scored_is_one_clear_error():
    trials = [{"trial_id": "a", "quality": None, "latency_ms": 1.0, "params": 10},
              {"trial_id": "b", "quality": float("nan"), "latency_ms": 2.0, "params": 20}]
    with pytest.raises(ValueError, match=r"deploy.quality_target=0.9: none of the 2 tune trials reported a "
                                         r"validation score"):
        search.pick_under_budget(trials, 5.0, 0.9, lm=False)
    # without a target a trial with no score can still be named by its latency
    with pytest.raises(ValueError, match=r"the closest, trial a \(10 params\), reached 1.000 ms \(budget 0.5 ms\)"):
        search.pick_under_budget(trials, 0.5, None, lm=False)


@pytest.mark.parametrize("lm, student, reference, target, warned", [
    (False, {"val_accuracy": 0.80}, 0.90, 0.95, True),    # 0.889 × the ensemble < 0.95
    (False, {"val_accuracy": 0.88}, 0.90, 0.95, False),   # 0.978 ≥ 0.95
    (True, {"val_perplexity": 12.0}, None, 10.0, True),   # perplexity above its ceiling
    (True, {"val_perplexity": 9.0}, None, 10.0, False),
])
def test_the_retrained_final_student_is_checked_against_the_target_again(lm, student, reference, target, warned):
    s = {"task": "lm" if lm else "classification", "student": student, "teachers": [],
         "deploy": {"budget": {"quality_target": target, "reference": reference, "chosen_trial": "t7"}}}
    if lm:
        s |= {"label_only_student": {"val_perplexity": 99.0}}
    else:
        s |= {"label_only_student": {"val_accuracy": 0.1}, "val_rows": 100}
    got = [w for w in advice.warnings(s, CFG, None) if w.startswith("the final student's quality")]
    assert len(got) == warned
    if warned:
        assert f"misses deploy.quality_target={target}, which trial t7 met in the search" in got[0]


def _int8_stage(tmp_path, val: dict, test: dict):
    """The ship stage's INT8 step on a real CNN export, its scores per file kind ('fp32', 'static',
    'dynamic', read from the graph's ops) given as `val` and `test`: (shipped file, row)."""
    import onnx
    import torch

    from kd_ops import deploy, models
    from workflows.config import DeployConfig
    from workflows.loop import Loop
    from workflows.stages import ship

    def kind(loop) -> str:
        ops = {n.op_type for n in onnx.load_from_string(loop.kwargs["data"]).graph.node}
        return "dynamic" if "DynamicQuantizeLinear" in ops else "static" if "QuantizeLinear" in ops else "fp32"

    task = SimpleNamespace(cfg=SimpleNamespace(deploy=DeployConfig(qat="never", int8_max_drop=0.01)),
                           choice_key="val_accuracy", quality_key="test_accuracy",
                           choice_score=lambda loop, w, sets: val[kind(loop)], int8_drop=lambda f, i: f - i,
                           model_report=lambda loop, w, sets: {"test_accuracy": test[kind(loop)]})
    torch.manual_seed(0)
    x = torch.randn(64, 40)
    fp32 = deploy.export_onnx(models.cnn(width=8).eval(), x[:2], tmp_path / "student.onnx")
    loop = Loop(factory="kd_ops.models:cnn", kwargs={"width": 8}, epochs=1, batch_size=8, lr=0.01, weight_decay=0.0,
                seed=0, train_rows=64)
    return ship._int8(task, None, loop, None, None, None, {"test_accuracy": test["fp32"]}, x.numpy(), fp32,
                      tmp_path, None)[:2]


def test_the_int8_recipe_follows_validation_where_it_and_the_test_split_disagree(tmp_path):
    # validation: static loses 0.05, dynamic 0.005 (within 0.01); test says the opposite
    shipped, row = _int8_stage(tmp_path, {"fp32": 0.90, "static": 0.85, "dynamic": 0.895},
                               {"fp32": 0.90, "static": 0.90, "dynamic": 0.80})
    assert row["recipe"] == "dynamic" and row["method"] == "ptq" and "int8-dynamic" in shipped.name
    assert row["test_accuracy"] == 0.80 and row["test_drop"] == pytest.approx(0.10)  # scored, not chosen, on test
    assert [(r["recipe"], r["shipped"]) for r in row["recipes"]] == [("static", False), ("dynamic", True)]
    assert [r["drop"] for r in row["recipes"]] == pytest.approx([0.05, 0.005])


def test_no_int8_recipe_within_the_tolerance_on_validation_ships_fp32(tmp_path):
    shipped, row = _int8_stage(tmp_path, {"fp32": 0.90, "static": 0.85, "dynamic": 0.87},
                               {"fp32": 0.90, "static": 0.90, "dynamic": 0.90})
    assert shipped is None and not any(r["shipped"] for r in row["recipes"]) and "test_accuracy" not in row
