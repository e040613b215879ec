"""Stage 4, the chain: teacher-assistant chains (TAKD; Mirzadeh et al., AAAI 2020, "Improved
Knowledge Distillation via Teacher Assistant") and born-again students (Furlanello et al., ICML
2018, "Born-Again Neural Networks") on the one store.

Each stage is a student distilled (Ray Train) from the stage before, registered nowhere, whose
raw logits are then precomputed into the store as a new teacher; the final student (and Tune)
distil from the last stage, beside the original teachers at `distill.chain_teacher_weight`.
Every stage is a nested MLflow run; a rerun reuses finished stages (fits and shards are keyed
by their settings)."""
from __future__ import annotations

import dataclasses
import logging

from kd_ops import models
from workflows import console
from workflows.config import RunConfig, TeacherConfig
from workflows.layout import Layout
from workflows.stages.fit import child_fit
from workflows.stages.store_pass import precompute_logits
from workflows.stages.training_data import fit_inputs
from workflows.tracking import Tracker

log = logging.getLogger("kd")


def plan(cfg: RunConfig) -> list[tuple[str, dict]]:
    """(name, student kwargs) of each stage before the final student, in training order."""
    d = cfg.distill
    if d.assistants:
        return [(f"assistant-{a.name}", dict(a.kwargs)) for a in d.assistants]
    return [(f"generation-{g}", dict(cfg.student.kwargs)) for g in range(1, d.generations)]


def warn_sizes(cfg: RunConfig, teachers: list[TeacherConfig]) -> None:
    """TAKD assistants sit between teacher and student in size; say so when one does not."""
    if not cfg.distill.assistants:
        return
    sizes = {t.name: models.num_params(models.build(t.factory, t.kwargs)) for t in teachers}
    previous = ("the smallest teacher", min(sizes.values()))
    for a in cfg.distill.assistants:
        n = models.num_params(models.build(cfg.student.factory, a.kwargs))
        if n > previous[1]:
            print(f"kd: warning: assistant {a.name!r} ({n:,} params) is larger than {previous[0]} ({previous[1]:,}); "
                  "a teacher assistant should sit between teacher and student in size", file=console.err(), flush=True)
        previous = (f"assistant {a.name!r}", n)


def weights_for(cfg: RunConfig, n_stage_teachers: int) -> list[float]:
    """Teacher weights over [original teachers..., previous stage]."""
    w = cfg.distill.chain_teacher_weight
    return [w * x for x in cfg.teacher_weight_list()] + [1.0 - w] if n_stage_teachers else cfg.teacher_weight_list()


def run(task, teachers: list[TeacherConfig], dirs, lay: Layout, tracker: Tracker | None,
        test_set) -> tuple[list[str], list[float], list[dict]]:
    """Train and store every stage; returns (teacher names and weights for the final student,
    one row per stage: name, params, test_accuracy). `test_set`: the test split with the original
    teachers (for the stage's scores)."""
    cfg = task.cfg
    names = [t.name for t in teachers]
    rows: list[dict] = []
    previous: str | None = None
    for name, kwargs in plan(cfg):
        console.say(f"==> {name}")
        use = names + ([previous] if previous else [])
        weights = weights_for(cfg, 1 if previous else 0)
        inputs, loop = fit_inputs(task, dirs, lay, cfg.student.factory, kwargs, cfg.train.fit, label=name,
                                  teachers=use, teacher_weights=weights)
        loop = loop.replace(distill=dataclasses.replace(loop.distill, feature=None, feature_weight=0.0))
        with child_fit(cfg.train, tracker, name, {"student_kwargs": kwargs, "teachers": use, "teacher_weights": weights},
                       loop, inputs.sets, name=f"chain-{name}", lay=lay) as res:
            row = {"name": name, **task.model_report(loop, res.weights, {"test": test_set})}
            path = lay.teachers / f"{name}.safetensors"
            models.save_weights(models.load_weights(models.build(loop.factory, loop.kwargs), res.weights), path)
            stage_teacher = TeacherConfig(name=name, factory=loop.factory, kwargs=kwargs, weights=path.uri)
            precompute_logits(task, [stage_teacher], dirs, lay, tracker)
            if tracker:
                import mlflow

                mlflow.log_metrics({k: v for k, v in row.items() if isinstance(v, float)})
        console.say(f"{name}: {row['params']:,} params, test accuracy {row['test_accuracy']:.4f}")
        rows.append(row)
        previous = name
    if previous is None:
        return names, cfg.teacher_weight_list(), rows
    return names + [previous], weights_for(cfg, 1), rows
