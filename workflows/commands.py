"""Single-stage commands: `kd precompute`, `kd train`, `kd tune`. Each reuses what earlier stages
left under --out (data, teacher weights, store) and records itself as an MLflow parent run."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kd_ops import store
from kd_ops.fsio import Loc
from workflows import console, ray_session, stages, tasks
from workflows.config import RunConfig
from workflows.tracking import Tracker
from workflows.tune import run_tune
from workflows.layout import Layout


def _setup(cfg: RunConfig, out: Path, tracking_uri, ray_address):
    task = tasks.for_config(cfg)
    if not task.stage_commands:
        raise ValueError("kd precompute / train / tune take classification configs for now; "
                         "for task: lm run the whole pipeline with `kd run`")
    lay = Layout(out)
    lay.make()
    tracker = Tracker(tracking_uri or cfg.tracking.tracking_uri, cfg.tracking.experiment)  # reachable before Ray starts
    ray_session.init_ray(ray_address, cfg.code, cfg.train.resource_wait_s)
    return lay, tracker, task


def _teachers_with_weights(cfg: RunConfig, lay: Layout):
    teachers = [t.model_copy(update={"weights": lay.teacher_weights(t)}) for t in cfg.teachers]
    teachers = [t.model_copy(update={"weights": Loc.of(t.weights).uri}) for t in teachers]
    missing = [t.name for t in teachers if not Loc.of(t.weights).is_file()]
    if missing:
        raise ValueError(f"teachers {missing} have no weights file (looked in teachers[].weights and {lay.teachers}); "
                         "give weights in the config or run `kd run` once to train them")
    return teachers


def precompute(cfg: RunConfig, out: Path, *, tracking_uri=None, ray_address=None) -> int:
    lay, tracker, task = _setup(cfg, out, tracking_uri, ray_address)
    with tracker.parent(f"{cfg.name}-precompute", cfg.model_dump(mode="json"), {"kd.out": str(lay.out)}):
        dirs = task.data(lay)
        stages.check_run(task, dirs, lay)  # inputs, views, feature layers: before any teacher runs
        teachers = _teachers_with_weights(cfg, lay)
        logits, extra = stages.precompute_all(task, teachers, dirs, lay, tracker)
        results = logits + extra
    t = Table(title=f"soft-label store {lay.store}")
    for c in ("teacher", "rows", "shards", "kind", "columns", "status", "seconds"):
        t.add_column(c)
    for r in results:
        cols = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in r.manifest["columns"].items())
        status = "reused" if r.reused else f"computed {r.shards_computed} shards"
        t.add_row(r.name, str(r.manifest["rows"]), str(len(r.manifest["shards"])), r.manifest["kind"], cols,
                  status, f"{r.seconds:.1f}")
    Console(file=console.out()).print(t)
    console.say(f"store size: {store.size_bytes(lay.store):,} bytes")
    return 0


def _datasets(lay, task):
    cfg = task.cfg
    if cfg.distill.assistants or cfg.distill.generations > 1:
        raise ValueError("distill.assistants / distill.generations train a chain of students, each stored as a "
                         "teacher: run them with `kd run`")
    dirs = task.data(lay)
    features = stages.feature_plan(task, dirs, lay)
    entries = [t.name for t in cfg.teachers]
    if features and features.source == "store":
        entries.append(features.store_entry)
    for name in entries:
        if store.read_manifest(lay.store, name) is None:
            raise ValueError(f"no soft labels or features {name!r} in {lay.store}; run `kd precompute` first")
    inputs = stages.datasets(task, dirs, lay, teachers=True,
                             splits={"train": task.train_splits, "val": ("val",), "test": ("test",)}, features=features)
    base = stages.loop(task, cfg.student.factory, task.student_kwargs(cfg.teachers), cfg.train.fit,
                       inputs=inputs, label="student", distill=True, features=features)
    return inputs.sets, base


def train(cfg: RunConfig, out: Path, *, tracking_uri=None, ray_address=None) -> int:
    lay, tracker, task = _setup(cfg, out, tracking_uri, ray_address)
    with tracker.parent(f"{cfg.name}-train", cfg.model_dump(mode="json"), {"kd.out": str(lay.out)}):
        sets, spec = _datasets(lay, task)
        params = {"temperature": spec.temperature, "alpha": spec.alpha, "teacher_weights": spec.teacher_weights,
                  "kwargs": spec.kwargs, "method": dataclasses.asdict(spec.method)}
        with stages.child_fit(cfg.train, tracker, "student", params, spec, {k: sets[k] for k in ("train", "val")},
                              name="student", lay=lay) as res:
            row = task.model_report(spec, res.weights, sets)
    console.say(json.dumps({"student": row, "weights": str(res.weights)}, indent=2))
    return 0


def tune(cfg: RunConfig, out: Path, *, tracking_uri=None, ray_address=None) -> int:
    lay, tracker, task = _setup(cfg, out, tracking_uri, ray_address)
    with tracker.parent(f"{cfg.name}-tune", cfg.model_dump(mode="json"), {"kd.out": str(lay.out)}) as parent_id:
        sets, spec = _datasets(lay, task)
        _, best, rows, failed = run_tune(cfg.tune, spec, [t.name for t in cfg.teachers], cfg.student.width_kwarg,
                                 {k: sets[k] for k in ("train", "val")}, storage=lay.ray, workers=stages.workers(cfg.train),
                                 tracking_uri=tracker.uri, experiment=tracker.experiment, parent_run_id=parent_id)
    console.say(json.dumps({"best": best, "trials": rows, "failed_trials": failed}, indent=2, default=str))
    return 0
