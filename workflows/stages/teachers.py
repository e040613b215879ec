"""Stage 2, the teachers: those the task says to train are trained on the labelled train split,
as many at once as the cluster holds; the task then keeps and checks them all."""
from __future__ import annotations

import json
import logging

from kd_ops.fsio import Loc
from workflows.config import TeacherConfig
from workflows.layout import Layout
from workflows.stages.fit import child_fit, epochs_progress, fits_at_once, run_all
from workflows.stages.training_data import datasets, loop
from workflows.tracking import Tracker

log = logging.getLogger("kd")


def run(task, dirs, lay: Layout, tracker: Tracker | None) -> list[TeacherConfig]:
    """The run's teachers, ready for precompute: those the task says to train (`teachers_to_train`)
    are trained on the labelled train split, then the task keeps and checks them all (`keep_teachers`)."""
    todo = task.teachers_to_train(dirs, lay)
    return task.keep_teachers(list(zip(todo, train_teachers(task, todo, dirs, lay, tracker))), lay, tracker, dirs)


def train_teachers(task, todo: list[tuple[TeacherConfig, str, dict]], dirs, lay: Layout,
                   tracker: Tracker | None) -> list:
    """Train each (teacher, factory, kwargs) on the labelled train split, as many at once as the
    cluster holds (`concurrent_fits`), under one progress line; returns their best weights files (Locs)."""
    if not todo:
        return []
    cfg = task.cfg
    inputs = datasets(task, dirs, lay, teachers=False, splits={"train": ("train",), "val": ("val",)})
    loops = [loop(task, factory, kwargs, t.fit, inputs=inputs, label=f"teacher {t.name}") for t, factory, kwargs in todo]
    at_once = fits_at_once(cfg.train, len(todo))
    if at_once > 1:
        log.info("teachers: training %d at once", at_once)
    progress = epochs_progress("teachers" if len(todo) > 1 else loops[0].label, loops)

    def fit(i: int):
        t, lp = todo[i][0], loops[i]
        with child_fit(cfg.train, tracker, f"teacher-{t.name}", json.loads(json.dumps(vars(lp), default=str)),
                       lp, inputs.sets, name=f"teacher-{t.name}", lay=lay, progress=progress(i)) as res:
            return res.weights

    return run_all(fit, range(len(todo)), at_once)


def with_weights(cfg, lay: Layout) -> list[TeacherConfig]:
    """The config's teachers with their weights files (`teachers[].weights`, else those `kd run`
    trained under --out); ValueError naming those without one."""
    found = [t.model_copy(update={"weights": Loc.of(lay.teacher_weights(t)).uri}) for t in cfg.teachers]
    missing = [t.name for t in found if not Loc.of(t.weights).is_file()]
    if missing:
        raise ValueError(f"teachers {missing} have no weights file (looked in teachers[].weights and {lay.teachers}); "
                         "give weights in the config or run `kd run` once to train them")
    return found
