"""Stage 6, the student: the KD student with the chosen settings and its label-only baseline (same
architecture, labels only), side by side when the cluster holds both; each scored on the test
split; the student registered in MLflow."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlflow

from workflows import ingest
from workflows.layout import Layout
from workflows.loop import Loop
from workflows.stages.fit import child_fit, epochs_progress, fits_at_once, run_all
from workflows.stages.training_data import fit_inputs
from workflows.tracking import Tracker
from workflows.train import Trained


@dataclass
class Fitted:
    loop: Loop
    trained: Trained          # best weights and their metrics
    report: dict[str, Any]    # the task's test report (task.model_report)


@dataclass
class Students:
    student: Fitted
    label_only: Fitted
    settings: dict[str, Any]          # the student's chosen settings, as the summary records them
    registered: dict | None           # the registered model version


@dataclass
class _Fit:
    run_name: str             # its MLflow run
    params: dict[str, Any]
    loop: Loop
    sets: dict
    name: str                 # its Train run under --out/ray
    is_student: bool


def run(task, base: Loop, names: list[str], train_sets: dict, kd_sets: dict, dirs, lay: Layout,
        tracker: Tracker) -> Students:
    """Fit the student (`base`, distilled from the stored logits of `names` on `train_sets`) and its
    label-only baseline, score both on `kd_sets["test"]`, register the student."""
    cfg = task.cfg
    d = base.distill
    settings = {"temperature": d.temperature, "alpha": d.alpha, "teacher_weights": list(d.teacher_weights),
                "student_kwargs": {k: v for k, v in base.kwargs.items() if k != "teacher_dir"}}
    settings |= task.chosen(base, names)
    lo_inputs, lo = fit_inputs(task, dirs, lay, base.factory, base.kwargs, cfg.train.label_only_fit, label="label-only")
    fits = [_Fit("student", settings | {"epochs": base.epochs}, base, train_sets, "student", True),
            _Fit("label-only-student", {"student_kwargs": settings["student_kwargs"],
                                        **cfg.train.label_only_fit.model_dump()}, lo, lo_inputs.sets, "label-only", False)]
    progress = epochs_progress("student, label-only", [f.loop for f in fits])

    def fit_and_score(i: int) -> tuple[Fitted, dict | None]:
        f = fits[i]
        with child_fit(cfg.train, tracker, f.run_name, f.params, f.loop, f.sets, name=f.name, lay=lay,
                       progress=progress(i)) as res:
            if f.is_student and not all(math.isfinite(v) for v in res.metrics.values() if isinstance(v, float)):
                raise ValueError(f"the student's training diverged (metrics {res.metrics}); not registered. "
                                 "Lower train.fit.lr or set train.fit.max_grad_norm")
            report = task.model_report(f.loop, res.weights, kd_sets)
            mlflow.log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float))})
            registered = _register(task, tracker, f.loop, res.weights, dirs) if f.is_student else None
        return Fitted(f.loop, res, report), registered

    # independent fits: side by side when the cluster holds both
    (student, registered), (label_only, _) = run_all(fit_and_score, range(len(fits)), fits_at_once(cfg.train, len(fits)))
    return Students(student, label_only, settings, registered)


def _register(task, tracker: Tracker, loop, weights, dirs) -> dict | None:
    """The student's weights as an artifact of its run, and as a version of the registered model."""
    cfg = task.cfg
    example = ingest.first_rows(dirs[task.eval_split], task.feature_columns, task.input_dtype)
    tracker.log_file(weights, "weights", "model.safetensors")
    return tracker.register(weights, {"factory": loop.factory, "kwargs": loop.kwargs}, cfg.tracking.registered_model,
                            example.astype(task.example_dtype), cfg.code)

