"""The layer under every stage: the streamed datasets a model trains on (`datasets`) and its typed
training-loop settings over them (`loop`); `fit_inputs` builds the pair."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ray

from kd_ops import store
from kd_ops.method_loss import Distill
from workflows import ingest
from workflows.config import RunConfig
from workflows.fingerprints import data_key, digest
from workflows.layout import Layout
from workflows.loop import FeaturePlan, Loop


def distill_settings(cfg: RunConfig, teacher_weights: list[float]) -> Distill:
    """The config's `distill` section as the one settings type a student's Loop carries to its
    workers (and Tune's trials replace fields of), over `teacher_weights`."""
    d = cfg.distill
    return Distill(tuple(teacher_weights), temperature=d.temperature, alpha=d.alpha, divergence=d.divergence, beta=d.beta,
                   tail=d.tail, response=d.response, dkd_alpha=d.dkd.alpha, dkd_beta=d.dkd.beta, schedule=d.schedule,
                   temperature_end=d.temperature_end, standardize=d.standardize,
                   feature=d.feature.kind if d.feature else None, feature_loss=d.feature.loss if d.feature else "mse",
                   feature_weight=d.feature.weight if d.feature else 0.0, rkd_distance=d.rkd.distance,
                   rkd_angle=d.rkd.angle, teacher_weighting=d.teacher_weighting)


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
    settings = distill_settings(cfg, teacher_weights or cfg.teacher_weight_list()) if distill else None
    opt = fit.model_dump()
    if opt["shuffle_buffer"] is None:  # auto
        opt["shuffle_buffer"] = CACHED_SHUFFLE_BUFFER if cached else 0
    # augmented views: the worker draws each row's view per epoch as it reads (ingest.ViewPicker): those fits stream
    views = _views(cfg) if distill else None
    return Loop(factory=factory, kwargs=kwargs, train_rows=train_rows, label=label, task=task.kind,
                cpus_per_worker=cfg.train.cpus_per_worker, in_memory=cfg.train.in_memory and cached and not views,
                checkpoint_interval_s=cfg.train.checkpoint_interval_s, inputs=inputs.key, views=views, distill=settings,
                features=features if distill else None, **opt)


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



def fit_inputs(task, dirs: dict[str, Path], lay: Layout, factory: str, kwargs: dict, fit, *, label: str,
               teachers: bool | list[str] = False, splits: dict[str, tuple[str, ...]] | None = None,
               teacher_weights: list[float] | None = None, features: FeaturePlan | None = None) -> tuple[Inputs, Loop]:
    """The datasets one model trains on and its Loop over them. With `teachers` (True: all the
    config's, or the names) a student distilled from their stored logits on the task's training
    splits; without, a model fitted to the labels of the train split. `splits` overrides the
    datasets built (e.g. with "test" for scoring)."""
    if splits is None:
        splits = {"train": task.train_splits if teachers else ("train",), "val": ("val",)}
    inputs = datasets(task, dirs, lay, teachers=teachers, splits=splits, features=features)
    return inputs, loop(task, factory, kwargs, fit, inputs=inputs, label=label, distill=bool(teachers),
                        teacher_weights=teacher_weights, features=features)
