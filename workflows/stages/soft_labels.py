"""Stage 3, the soft labels: every teacher's raw logits on every split into the store, then feature
KD's teacher layer and the augmented views where configured (each reused where already stored)."""
from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np

from kd_ops import store
from workflows import console
from workflows import precompute as pre
from workflows.config import RunConfig, TeacherConfig
from workflows.layout import Layout
from workflows.ray_session import progress_bars
from workflows.stages.fit import child_run
from workflows.stages.store_pass import precompute_logits, remember_timings
from workflows.tracking import Tracker

log = logging.getLogger("kd")


def run(task, teachers: list[TeacherConfig], dirs: dict[str, Path], lay: Layout,
        tracker: Tracker | None) -> tuple[list[pre.TeacherResult], list[pre.TeacherResult]]:
    """The store of a run: every teacher's logits (`store_pass.precompute_logits`), then the feature KD entry
    (`precompute_features`) and the augmented views (`precompute_views`) where configured.
    Returns (the teachers' results, the features' and views' results)."""
    results = precompute_logits(task, teachers, dirs, lay, tracker)
    extra = [r for r in [precompute_features(task, teachers, dirs, lay, tracker)] if r]
    return results, extra + precompute_views(task, teachers, dirs, lay, tracker)


def feature_spec(cfg: RunConfig, teachers: list[TeacherConfig]) -> pre.TeacherSpec | None:
    """The teacher whose layer feature KD reads, as a precompute spec of that layer (or None)."""
    f = cfg.distill.feature
    if f is None:
        return None
    return pre.TeacherSpec.of(cfg.feature_teacher(teachers)).features(f.teacher_layer, f.pool)


def precompute_features(task, teachers: list[TeacherConfig], dirs, lay: Layout,
                        tracker: Tracker | None) -> pre.TeacherResult | None:
    """Feature KD from the store: the named teacher layer's outputs per id (fp16) as a store entry."""
    cfg = task.cfg
    spec = feature_spec(cfg, teachers)
    if spec is None or cfg.distill.feature.source != "store":
        return None
    with child_run(tracker, "precompute-features", {"entry": spec.name}), progress_bars():
        [r] = pre.precompute([spec], dirs, lay.store, feature_columns=task.feature_columns, **pre.options(cfg.precompute),
                             input_dtype=task.input_dtype, extra={"layer": spec.layer, "pool": spec.pool},
                             progress=console.progress("features", "rows"))
        col = r.manifest["columns"]["logits"]
        log.info("features %s: %s %s per sample (%d bytes)", spec.name, col["dtype"], col["shape"],
                 int(np.prod(col["shape"])) * np.dtype(col["dtype"]).itemsize)
        if tracker:
            mlflow.log_dict(r.manifest, f"manifests/{spec.name}.json")
    return r


def precompute_views(task, teachers: list[TeacherConfig], dirs, lay: Layout,
                     tracker: Tracker | None) -> list[pre.TeacherResult]:
    """Augmented views (precompute.views K > 1): every teacher's logits on views 1..K-1 of the
    training splits, each view its own store entry; view 0 is the teacher's entry itself (the
    view function was checked by `check_inputs`)."""
    pc = task.cfg.precompute
    if pc.views == 1:
        return []
    specs = [pre.TeacherSpec.of(t).viewed(k, pc.augment, pc.augment_seed) for t in teachers for k in range(1, pc.views)]
    splits = {s: dirs[s] for s in task.train_splits if s in dirs}
    with child_run(tracker, "precompute-views", {"views": pc.views, "augment": pc.augment, "seed": pc.augment_seed}), \
            progress_bars():
        results = pre.precompute(specs, splits, lay.store, feature_columns=task.feature_columns, **pre.options(pc),
                                 **task.precompute_options(), progress=console.progress("views", "rows"))
        one = store.size_bytes(lay.store, [t.name for t in teachers])
        views_bytes = store.size_bytes(lay.store, [s.name for s in specs])
        console.say(f"precompute: {pc.views} views of the training rows: {views_bytes / 1e6:.1f} MB beside the "
                    f"teachers' {one / 1e6:.1f} MB ({(one + views_bytes) / max(one, 1):.2f}x)")
        if tracker:
            mlflow.log_metric("views_store_bytes", views_bytes)
    remember_timings(lay, results)  # the views' pass is teacher compute too
    return results
