"""What a rerun into the same --out reuses is keyed by everything that produced it: a trained
teacher by its model, fit and data; a fit (and a search, whose key holds its base fit's) by the
input files, the store entries and the view settings its datasets read."""
from __future__ import annotations

import torch
import yaml

from kd_ops import data, models
from workflows import tasks, train
from workflows.stages import soft_labels, store_pass, training_data
from workflows.config import load_config
from workflows.layout import Layout


def _splits(root, seed: int = 0) -> dict[str, str]:
    splits = data.mnist1d_splits(300, 60, 60, 0, seed=seed, transfer_seed=1)
    return {s: str(data.write_split(splits[s], root / s, rows_per_file=100)) for s in ("train", "val", "test")}


def _config(tmp_path, dirs, teacher: dict, **sections):
    cfg = {"name": "reuse", "data": {"source": "parquet", "parquet": dirs},
           "teachers": [{"name": "t1", "factory": "kd_ops.models:cnn", **teacher}],
           "student": {"kwargs": {"width": 4}}, "precompute": {"batch_size": 128, "num_actors": 1}, **sections}
    path = tmp_path / "reuse.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def _to_train(cfg, lay) -> list[str]:
    task = tasks.for_config(cfg)
    return [t.name for t, _, _ in task.teachers_to_train(task.data(lay), lay)]


def _keep(cfg, lay, tmp_path) -> None:
    """What `kd run` does once a teacher trained: its weights (here an untrained model's) and key kept."""
    task = tasks.for_config(cfg)
    dirs = task.data(lay)
    todo = task.teachers_to_train(dirs, lay)
    w = tmp_path / "fit.safetensors"
    models.save_weights(models.build(todo[0][1], todo[0][2]), w)
    task.keep_teachers([(todo[0], w)], lay, None, dirs)


def test_a_trained_teacher_is_reused_only_for_the_same_model_fit_and_data(tmp_path):
    dirs, lay = _splits(tmp_path / "in"), Layout(tmp_path / "out")
    lay.make()
    base = {"kwargs": {"width": 32}, "fit": {"epochs": 2, "seed": 0}}
    cfg = _config(tmp_path, dirs, base)
    assert _to_train(cfg, lay) == ["t1"]
    _keep(cfg, lay, tmp_path)
    assert _to_train(cfg, lay) == []  # nothing changed: reused
    # each change trains it again (a width change used to die on the old file: "does not fit the module")
    for changed in ({"kwargs": {"width": 24}}, {"fit": {"epochs": 2, "seed": 1}}, {"fit": {"epochs": 3, "seed": 0}},
                    {"factory": "kd_ops.models:CNN1D"}):
        assert _to_train(_config(tmp_path, dirs, base | changed), lay) == ["t1"], changed
    new_train = data.mnist1d_splits(300, 60, 60, 0, seed=5, transfer_seed=1)["train"]
    data.write_split(new_train, dirs["train"], rows_per_file=100)  # the same file names, other rows
    assert _to_train(cfg, lay) == ["t1"]
    _keep(cfg, lay, tmp_path)
    assert _to_train(cfg, lay) == []


def test_a_fit_is_keyed_by_the_store_entries_and_views_its_datasets_read(ray_session, tmp_path):
    dirs, lay = _splits(tmp_path / "in"), Layout(tmp_path / "out")
    lay.make()
    w = tmp_path / "t1.safetensors"
    models.save_weights(models.cnn(width=8), w)
    teacher = {"kwargs": {"width": 8}, "weights": str(w)}
    cfg = _config(tmp_path, dirs, teacher)
    task = tasks.for_config(cfg)
    splits = {"train": ("train",), "val": ("val",)}

    def keys(task) -> tuple[str, str]:
        """(a KD student's fit key, the label-only student's), as `kd run` builds them."""
        kd = training_data.datasets(task, dirs, lay, teachers=True, splits=splits)
        lo = training_data.datasets(task, dirs, lay, teachers=False, splits=splits)
        fit = task.cfg.train.fit
        return tuple(train._loop_key(training_data.loop(task, "kd_ops.models:cnn", {"width": 4}, fit, inputs=i, label="s",
                                                 distill=d)) for i, d in ((kd, True), (lo, False)))

    store_pass.precompute_logits(task, cfg.teachers, dirs, lay, None)
    kd1, lo1 = keys(task)
    assert keys(task) == (kd1, lo1)  # nothing changed: the fits are reused
    assert store_pass.precompute_logits(task, cfg.teachers, dirs, lay, None)[0].reused
    assert keys(task) == (kd1, lo1)

    torch.manual_seed(3)
    models.save_weights(models.cnn(width=8), w)  # other teacher weights: the store is recomputed
    assert not store_pass.precompute_logits(task, cfg.teachers, dirs, lay, None)[0].reused
    kd2, lo2 = keys(task)
    assert kd2 != kd1 and lo2 == lo1  # the label-only student reads no store entry

    def viewed(seed: int):
        c = _config(tmp_path, dirs, teacher, precompute={"batch_size": 128, "num_actors": 1, "views": 2,
                                                         "augment": "kd_ops.augment:signal_views", "augment_seed": seed})
        t = tasks.for_config(c)
        soft_labels.precompute_views(t, c.teachers, dirs, lay, None)
        return keys(t)

    kv7, lo7 = viewed(7)
    assert kv7 not in (kd1, kd2) and lo7 == lo1
    kv8, _ = viewed(8)  # another augment_seed: the views are recomputed, and so are the fits
    assert kv8 != kv7
    assert viewed(8)[0] == kv8

    new = data.mnist1d_splits(300, 60, 60, 0, seed=9, transfer_seed=1)["val"]
    data.write_split(new, dirs["val"], rows_per_file=100)  # other validation rows: every fit is recomputed
    store_pass.precompute_logits(task, cfg.teachers, dirs, lay, None)
    kd3, lo3 = keys(task)
    assert kd3 != kd2 and lo3 != lo1
