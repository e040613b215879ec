"""Pipeline stages shared by every task, each usable alone (`kd precompute`, `kd train`, `kd tune`)
or chained by `kd run`. The task-specific parts (data, teachers, metrics) are in workflows.tasks.

Orchestration only: the maths lives in kd_ops; Ray does the work; MLflow records it.
"""
from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import ray

from kd_ops import store
from kd_ops.fsio import Loc
from workflows import concurrent_fits, console, ingest, train, validate
from workflows import precompute as pre
from workflows.config import RunConfig, TeacherConfig, TrainConfig
from workflows.fingerprints import data_key, digest
from workflows.layout import Layout
from workflows.loop import FeaturePlan, Loop
from workflows.ray_session import progress_bars
from workflows.tracking import Tracker

log = logging.getLogger("kd")


class _NullRun:
    def __enter__(self): return None
    def __exit__(self, *a): return False


def child_run(tracker: Tracker | None, name: str, params: dict | None = None):
    """A nested MLflow run (or nothing without a tracker)."""
    return tracker.child(name, params) if tracker else _NullRun()


@contextmanager
def child_fit(t: TrainConfig, tracker: Tracker | None, run_name: str, params: dict | None, loop: Loop,
              sets: dict, *, name: str, lay: Layout, progress=None):
    """Fit `loop` under a nested MLflow run `run_name` (rank 0 logs each epoch there) with the run's
    Train workers (`t`: the config's train section) and an epoch progress line (or `progress(epoch)`); yields the `train.Trained`
    inside that run, so the caller logs what it measures of the model there too."""
    with child_run(tracker, run_name, params) as run_id:
        loop = loop.replace(mlflow=tracker and {"tracking_uri": tracker.uri, "run_id": run_id})
        yield train.fit(loop, sets, name=name, storage=lay.ray, **workers(t),
                        progress=progress or epoch_progress(loop))


def teachers(task, dirs, lay: Layout, tracker: Tracker | None) -> list[TeacherConfig]:
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
    at_once = concurrent_fits.fits_at_once(cfg.train, len(todo))
    if at_once > 1:
        log.info("teachers: training %d at once", at_once)
    progress = epochs_progress("teachers" if len(todo) > 1 else loops[0].label, loops)

    def fit(i: int):
        t, lp = todo[i][0], loops[i]
        with child_fit(cfg.train, tracker, f"teacher-{t.name}", json.loads(json.dumps(vars(lp), default=str)),
                       lp, inputs.sets, name=f"teacher-{t.name}", lay=lay, progress=progress(i)) as res:
            return res.weights

    return concurrent_fits.run_all(fit, range(len(todo)), at_once)


def check_run(task, dirs: dict[str, Path], lay: Layout, *, target: bool = False) -> FeaturePlan | None:
    """Everything that can be checked before a teacher trains or runs: the inputs (`check_inputs`),
    the view function (`check_views`), with `target` the deploy target (`check_target`) and feature
    KD's layers; returns the feature plan (`feature_plan`)."""
    check_inputs(task, dirs, lay)
    if target:
        check_target(task.cfg)
    return feature_plan(task, dirs, lay)


def check_target(cfg) -> None:
    """Some node can hold the deploy stage's timing task (`deploy.target`): ResourceWaitError naming
    the resources after train.resource_wait_s otherwise (nodes may still be on their way), instead
    of a run that hangs after all its training."""
    if not cfg.deploy.enabled:
        return
    opts = cfg.deploy.target.ray_options()
    bundle = {"CPU": opts["num_cpus"], **opts.get("resources", {})}
    if opts.get("accelerator_type"):
        bundle |= {"GPU": 1, f"accelerator_type:{opts['accelerator_type']}": 0.001}
    train.wait_for_a_node(bundle, "deploy.target", "Fix deploy.target (threads, resources, accelerator_type) to "
                          "match a node, add such a node, or set deploy.enabled: false", cfg.train.resource_wait_s)


def check_inputs(task, dirs: dict[str, Path], lay: Layout) -> None:
    """`workflows.validate.check_inputs` for this run's inputs (remembered under --out/checks)."""
    cfg = task.cfg
    validate.check_inputs(dirs, feature_columns=task.feature_columns, label_column=task.label_column,
                          num_classes=task.num_classes,
                          remember=lay.out / "checks")
    if cfg.precompute.views > 1:
        check_views(task, dirs)


def check_views(task, dirs) -> None:
    """The view function on the first training rows, before any teacher trains or runs: it
    imports, keeps shape and dtype, returns the rows themselves for view 0, and gives a row the
    same view whether it is asked for one view (precompute) or one view per row (training)."""
    from kd_ops import augment, models

    pc = task.cfg.precompute
    fn = models.resolve(pc.augment)
    x = ingest.first_rows(dirs["train"], task.feature_columns, task.input_dtype, n=4)
    ids, views = np.arange(len(x)), np.arange(len(x)) % pc.views
    if not np.array_equal(augment.apply(fn, x, ids, 0, pc.augment_seed), x):
        raise ValueError(f"precompute.augment {pc.augment!r}: view 0 must return the inputs unchanged")
    per_row = augment.apply(fn, x, ids, views, pc.augment_seed)
    one = np.concatenate([augment.apply(fn, x[i:i + 1], ids[i:i + 1], int(views[i]), pc.augment_seed)
                          for i in range(len(x))])
    if not np.array_equal(per_row, one):
        raise ValueError(f"precompute.augment {pc.augment!r}: a row's view differs when views come one per row "
                         "(an array) rather than as one int; it must depend only on (seed, id, view)")


def stage_precompute(task, teachers: list[TeacherConfig], dirs: dict[str, Path], lay: Layout,
                     tracker: Tracker | None) -> list[pre.TeacherResult]:
    """Every teacher's raw logits on every split into the store (reused where already stored)."""
    pc = task.cfg.precompute
    with child_run(tracker, "precompute", pc.model_dump()), progress_bars():
        results = pre.precompute(teachers, dirs, lay.store, feature_columns=task.feature_columns, **pre.options(pc),
                                 **task.precompute_options(), progress=console.progress("precompute", "rows"))
        if tracker:
            for r in results:
                mlflow.log_dict(r.manifest, f"manifests/{r.name}.json")
                mlflow.log_metric(f"{r.name}.seconds", r.seconds)
                mlflow.log_metric(f"{r.name}.shards_computed", r.shards_computed)
            mlflow.log_metric("store_bytes", store.size_bytes(lay.store))
            mlflow.set_tag("kd.reused", ",".join(r.name for r in results if r.reused) or "none")
    _remember_timings(lay, results)
    return results


def precompute_all(task, teachers: list[TeacherConfig], dirs: dict[str, Path], lay: Layout,
                   tracker: Tracker | None) -> tuple[list[pre.TeacherResult], list[pre.TeacherResult]]:
    """The store of a run: every teacher's logits (`stage_precompute`), then the feature KD entry
    (`precompute_features`) and the augmented views (`precompute_views`) where configured.
    Returns (the teachers' results, the features' and views' results)."""
    results = stage_precompute(task, teachers, dirs, lay, tracker)
    extra = [r for r in [precompute_features(task, teachers, dirs, lay, tracker)] if r]
    return results, extra + precompute_views(task, teachers, dirs, lay, tracker)


# {store entry: {rows, seconds, pass_seconds, view}} of the last full pass that computed it
TIMINGS = "precompute-timings.json"


def _remember_timings(lay: Layout, results: list[pre.TeacherResult]) -> None:
    """Keep what each entry's precompute pass measured, so a rerun that reuses the store can still
    say what the store saved in teacher-seconds. A pass runs all its entries at once in one wall
    time: each entry keeps its share of it by rows, so a pass of M teachers counts its wall time
    once (not M times), and a later pass of some entries replaces only their shares. A pass that
    computed only part of an entry (resumed after a crash) is not timed: it ran rows no entry counts."""
    ran = [r for r in results if not r.reused]
    if not ran or any(r.shards_computed != len(r.manifest.get("shards", {})) for r in ran):
        return
    wall, rows = max(r.seconds for r in ran), sum(r.manifest["rows"] for r in ran)
    if wall <= 0 or rows <= 0:
        return
    known = timings(lay)
    for r in ran:
        known[r.name] = {"rows": r.manifest["rows"], "seconds": wall * r.manifest["rows"] / rows,
                         "pass_seconds": wall, "view": r.manifest.get("view", 0)}
    (lay.out / TIMINGS).write_text(json.dumps(known))


def timings(lay: Layout) -> dict[str, dict[str, float]]:
    """The recorded passes (`_remember_timings`) by store entry. Records without `pass_seconds`
    (an older kd) are left out: each held the whole wall time of a pass it shared."""
    path = lay.out / TIMINGS
    known = json.loads(path.read_text()) if path.is_file() else {}
    return {k: v for k, v in known.items() if "pass_seconds" in v}


def feature_spec(cfg: RunConfig, teachers: list[TeacherConfig]) -> pre.TeacherSpec | None:
    """The teacher whose layer feature KD reads, as a precompute spec of that layer (or None)."""
    f = cfg.distill.feature
    if f is None:
        return None
    return pre.TeacherSpec.of(_feature_teacher(cfg, teachers)).features(f.teacher_layer, f.pool)


def _feature_teacher(cfg: RunConfig, teachers: list[TeacherConfig]) -> TeacherConfig:
    """The teacher whose layer feature KD reads: `distill.feature.teacher`, or the first."""
    name = cfg.distill.feature.teacher or teachers[0].name
    return next(t for t in teachers if t.name == name)


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
    _remember_timings(lay, results)  # the views' pass is teacher compute too
    return results


def feature_plan(task, dirs, lay: Layout) -> FeaturePlan | None:
    """The Loop's `features`: layers, shapes and where the teacher's features come from. Builds
    the teacher (untrained: shapes do not depend on weights) and the student on the first input
    rows, so a wrong layer name or shapes no projection can map fail before any teacher is
    trained or run (`feature_kd.LayerError`)."""
    cfg = task.cfg
    f = cfg.distill.feature
    if f is None:
        return None
    from kd_ops import feature_kd, models
    import torch

    t = _feature_teacher(cfg, cfg.teachers)
    example = torch.from_numpy(ingest.first_rows(dirs["train"], task.feature_columns, task.input_dtype))
    tap = feature_kd.LayerOutput(models.build(t.factory, t.kwargs), f.teacher_layer, f.pool).eval()
    t_shape = list(pre.forward(f"teacher {t.name!r}", tap, example.numpy()).shape[1:])
    feature_kd.feature_student(models.build(cfg.student.factory, cfg.student.kwargs), f.student_layer, example,
                               t_shape, f.kind)
    return FeaturePlan(student_layer=f.student_layer, teacher_layer=f.teacher_layer, source=f.source, pool=f.pool,
                       input_shape=list(example.shape[1:]), input_dtype=task.input_dtype, teacher_shape=t_shape,
                       store_entry=pre.feature_entry(t.name, f.teacher_layer, f.pool), teacher_factory=t.factory,
                       teacher_kwargs=t.kwargs, teacher_weights=Loc.of(lay.teacher_weights(t)).uri)


def epoch_progress(loop: Loop):
    """A fit's `progress`: `label: epoch/epochs epochs (…, ETA)` on the console."""
    return epochs_progress(loop.label, [loop])(0)


def epochs_progress(label: str, loops: list[Loop]):
    """For fits running side by side: progress(i) is fit i's `progress(epoch)`, all of them counted
    on one line `label: epochs done/all epochs`."""
    bar, lock = console.progress(label, "epochs"), threading.Lock()
    done, total = [0] * len(loops), sum(lp.epochs for lp in loops)

    def of(i: int):
        def update(epoch: int) -> None:
            with lock:
                done[i] = epoch
                bar(sum(done), total)
        return update
    return of


def workers(t: TrainConfig) -> dict:
    """How every fit of a run gets its Train workers (train.fit's keyword arguments), from the
    config's train section."""
    return dict(num_workers=t.num_workers, use_gpu=t.use_gpu, max_failures=t.max_failures, resources=t.resources)


def loop(task, factory: str, kwargs: dict, fit, *, inputs: "Inputs", label: str,
         distill: bool = False, teacher_weights: list[float] | None = None,
         features: FeaturePlan | None = None) -> Loop:
    """The typed training-loop settings for one model trained on `inputs` (`datasets`): its fit,
    the run's distillation settings when it is a student (`teacher_weights` over the dataset's
    teachers, default the config's), and the task's loss kind. Whether the train dataset sits in
    the object store (it then needs the local shuffle buffer; see ingest.dataset) and what the
    datasets read (part of the fit's key: a rerun reuses a fit only of the same data) come from
    `inputs`."""
    train_rows, cached = inputs.rows["train"], inputs.cached
    cfg = task.cfg
    d = cfg.distill
    kd = dict(temperature=d.temperature, alpha=d.alpha, teacher_weights=teacher_weights or cfg.teacher_weight_list(),
              divergence=d.divergence, beta=d.beta, tail=d.tail) if distill else {}
    if distill:
        kd |= task.method_settings(features)
    settings = fit.model_dump()
    if settings["shuffle_buffer"] is None:  # auto
        settings["shuffle_buffer"] = CACHED_SHUFFLE_BUFFER if cached else 0
    # augmented views: the worker draws each row's view per epoch as it reads (ingest.ViewPicker): those fits stream
    views = _views(cfg) if distill else None
    return Loop(factory=factory, kwargs=kwargs, train_rows=train_rows, label=label, task=task.kind,
                cpus_per_worker=cfg.train.cpus_per_worker, in_memory=cfg.train.in_memory and cached and not views,
                checkpoint_interval_s=cfg.train.checkpoint_interval_s, inputs=inputs.key, views=views, **settings, **kd)


# Rows in a Train worker's local shuffle buffer for a dataset cached in the object store (its rows
# stay in the same blocks every epoch). Streamed datasets are permuted by their read tasks instead:
# the buffer runs in the Train worker's process and cost ~7% of training throughput in kd bench ingest.
CACHED_SHUFFLE_BUFFER = 8192


@dataclass
class Inputs:
    """Streamed datasets by name (`datasets`) and what they read."""
    sets: dict[str, ray.data.Dataset]
    rows: dict[str, int]
    cached: bool   # whether "train" sits in the object store
    key: str       # a digest of the input files, store entries and view settings that fits read


def datasets(task, dirs: dict[str, Path], lay: Layout, *, teachers: bool | list[str],
             splits: dict[str, tuple[str, ...]], features: FeaturePlan | None = None) -> Inputs:
    """Streamed datasets by name, e.g. {"train": ("train", "transfer"), "val": ("val",)}, with the
    stored columns of every teacher (`teachers` True), of the teachers named, or of none; only
    "train" is shuffled, and it carries stored teacher features when `features` (a feature_plan)
    reads them from the store."""
    cfg = task.cfg
    names = list(teachers) if isinstance(teachers, list) else [t.name for t in cfg.teachers] if teachers else []
    stored = features.store_entry if features and features.source == "store" else None
    out, rows, cached = {}, {}, {}
    for name, parts in splits.items():
        out[name], rows[name], cached[name] = ingest.dataset({s: dirs[s] for s in parts if s in dirs},
                                               feature_columns=task.feature_columns, label_column=task.label_column,
                                               input_dtype=task.input_dtype, store_dir=lay.store, teachers=names,
                                               shuffle=name == "train",
                                               cache_bytes=int(cfg.train.cache_datasets_mb * 1e6),
                                               features=stored if name == "train" else None,
                                               views=_views(cfg) if name == "train" and names else None)
    # fits read "train" and "val" only: the test split does not enter their key
    used = sorted({s for name, parts in splits.items() if name != "test" for s in parts if s in dirs})
    views = _views(cfg) if names else None
    entries = [store.view_entry(t, k) for t in names for k in range(views.count)] if views else names
    key = digest({"files": data_key(task.feature_columns, {s: dirs[s] for s in used}),
                  "store": {e: store.read_manifest(lay.store, e) for e in [*entries, *([stored] if stored else [])]},
                  "views": views and [views.count, views.augment, views.seed]})
    return Inputs(out, rows, cached.get("train", True), key)


def _views(cfg: RunConfig) -> "ingest.Views | None":
    pc = cfg.precompute
    return ingest.Views(pc.views, pc.augment, pc.augment_seed) if pc.views > 1 else None
