"""Streaming ingest: lazily built Ray Datasets of inputs + labels + every teacher's stored columns.

The store is co-partitioned with the inputs (one shard per input file, same rows in the same
order), so a dataset is a list of input files, each read by a Ray task in lockstep with its
shards (`kd_ops.store.aligned_batches`, ids checked row for row): no join, no shuffle of the data,
nothing on the driver but the file list and the manifests. Per epoch the file order is shuffled
(a shuffle of the file list only), the read tasks permute the rows of each chunk they read, and
Ray Train's local shuffle buffer (`fit.shuffle_buffer`) mixes rows of the chunks in flight.

Rows: `x` (features or token ids), `y` (int64, −1 for unlabelled rows; classification only) and
each stored column stacked over teachers, [M, ...] per row (e.g. `logits` [M, C]).

Augmented views (`Views`, K > 1): the read tasks stack every teacher's K view entries, and the
Train worker, reading epoch e, draws one view per row from (augment_seed, e, id), rebuilds that
view of `x` and keeps the teachers' logits of that view (`ViewPicker`), so the student sees what
the teachers saw, and a rerun or resumed fit sees the same views.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from kd_ops import augment, data, models, store
from kd_ops.fsio import Loc
from workflows.kinds import TEACHER_COLUMNS


@dataclass(frozen=True)
class Views:
    """Augmented views of the training rows: `count` views (0 = the inputs) made by `augment`
    (an import path, fn(x, ids, view, seed)) with `seed`."""
    count: int
    augment: str
    seed: int


@dataclass
class ViewPicker(NumpyBatchCollateFn):
    """A Train worker's `iter_torch_batches(collate_fn=…)` for epoch `epoch` of a dataset with
    views (`dataset(views=…)`): per row, view v = augment.draw_views(seed, epoch, id) of the K
    stored, x replaced by view v of x and each stored column [M·K, ...] reduced to view v's
    [M, ...]; then torch tensors. Here, not in a Ray Data step, because only the worker knows the
    epoch; Ray Data runs it in the iterator's prefetch thread, beside the training step."""
    views: Views
    epoch: int

    def pick(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = dict(batch)
        keys = batch.pop("view_key")
        n, k = len(keys), self.views.count
        v = augment.draw_views(self.views.seed, self.epoch, keys, k)
        batch["x"] = augment.apply(models.resolve(self.views.augment), batch["x"], keys, v, self.views.seed)
        for c in TEACHER_COLUMNS:
            if c in batch:
                a = batch[c]
                batch[c] = np.ascontiguousarray(a.reshape(n, -1, k, *a.shape[2:])[np.arange(n), :, v])
        return batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        # Ray Data's arrays may be read-only views of Arrow memory, which torch will not wrap
        return {c: torch.from_numpy(np.require(a, requirements=["C", "W"])) for c, a in self.pick(batch).items()}


@dataclass
class Reader:
    """How to turn one input file (+ its shards) into row batches; shipped to the read tasks."""
    files: dict[str, Loc]                  # unit (split/file name) → input file
    shards: dict[str, list[Loc]]           # unit → one shard per teacher (empty without teachers)
    columns: dict[str, dict[str, Any]]     # stored column spec
    feature_columns: list[str]
    label_column: str | None               # None: no `y` (LM)
    input_dtype: str
    batch_rows: int
    permute: bool = False                  # shuffle rows within each chunk read (in the read task)
    feature_spec: dict[str, Any] | None = None  # the last shard of each unit holds teacher features
    view_keys: bool = False                # emit `view_key` (augment.id_keys of the ids) for ViewPicker


    def __call__(self, batch: dict[str, np.ndarray]):
        for u in batch["unit"]:
            yield from self.read(str(u))

    def read(self, u: str):
        src = self.files[u]
        labels = (self.label_column,) if self.label_column else ()
        for rb, parts in store.aligned_batches(src, ["id", *self.feature_columns], self.shards[u], self.batch_rows,
                                               optional=labels):
            table = pa.Table.from_batches([rb])
            out = {"x": data.features(table, self.feature_columns, str(src), np.dtype(self.input_dtype))}
            ids = rb.column("id")
            if pa.types.is_integer(ids.type):  # carried so a worker can say which rows it saw (Loop.trace_dir)
                out["id"] = ids.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            if self.view_keys:
                out["view_key"] = augment.id_keys(ids.to_numpy(zero_copy_only=False))
            if self.label_column is not None:  # a file without labels (transfer set): −1, soft term only
                out["y"] = (table.column(self.label_column).fill_null(-1).to_numpy().astype(np.int64)
                            if self.label_column in table.column_names else np.full(rb.num_rows, -1, np.int64))
            # here, on the reader's CPU, not in the Train worker's process
            order = np.random.default_rng().permutation(rb.num_rows) if self.permute else slice(None)
            out = {k: v[order] for k, v in out.items()}
            if self.feature_spec is not None:  # [N, ...]: one teacher's layer output (stored as its `logits`)
                *parts, feats = parts
                out["features"] = store.decode(feats.column("logits"), self.feature_spec["dtype"],
                                               self.feature_spec["shape"])[order]
            for k, spec in self.columns.items():  # [N, M, ...]: one copy does the stacking and the permutation
                cols = [store.decode(p.column(k), spec["dtype"], spec["shape"]) for p in parts]
                out[k] = np.empty((rb.num_rows, len(cols), *spec["shape"]), cols[0].dtype)
                for m, c in enumerate(cols):
                    if self.permute:  # mode="clip": no bounds-check buffer, the order is a permutation
                        np.take(c, order, axis=0, out=out[k][:, m], mode="clip")
                    else:
                        out[k][:, m] = c
            yield out


def dataset(split_dirs: dict[str, Any], *, feature_columns: list[str], label_column: str | None,
            input_dtype: str = "float32", store_dir=None, teachers: list[str] = (), shuffle: bool = True,
            batch_rows: int = 16384, read_tasks: int = 2, cache_bytes: int = 0,
            features: str | None = None, views: Views | None = None) -> tuple[ray.data.Dataset, int, bool]:
    """(lazy dataset over the files of `split_dirs` joined with `teachers`' shards, its row count,
    whether it was cached).

    The row count comes from Parquet footers (for the LR schedule); StoreError if a teacher's
    manifest is missing or does not cover an input file. A dataset whose files (inputs + shards)
    take less than `cache_bytes` on storage is read once into Ray's object store (on the nodes that
    read it, spilled to disk under pressure; never in the driver) instead of once per epoch:
    re-reading costs a Ray Data execution per epoch, which dominates sub-second epochs. A cached
    dataset's rows stay in their blocks across epochs, so it wants the Train worker's local
    shuffle buffer; a streamed one is permuted by its read tasks every epoch. `features`: a store
    entry of teacher features (`precompute.feature_entry`) whose rows become the `features` column.
    `views`: each teacher's view entries are read too, stacked [M·K, ...] per row with its
    `view_key`; the Train worker draws one view per row and epoch as it reads (`ViewPicker`)."""
    files, rows = {}, 0
    for split, d in split_dirs.items():
        for f in data.parquet_files(d):
            files[store.unit(split, f.name)] = f
    entries = [store.view_entry(t, k) for t in teachers for k in range(views.count)] if views else list(teachers)
    manifests = [store.check_manifest(store_dir, e) for e in entries]
    for e, m in zip(entries, manifests):
        if views and m.get("view") and (m.get("augment"), m.get("augment_seed")) != (views.augment, views.seed):
            raise store.StoreError(f"store entry {e!r} holds views made by {m.get('augment')} with seed "
                                   f"{m.get('augment_seed')}, but this run makes them with {views.augment} and seed "
                                   f"{views.seed}; run `kd precompute` (or `kd run`) with these settings")
    columns = manifests[0]["columns"] if manifests else {}
    for m in manifests[1:]:
        if m["columns"] != columns:
            raise store.StoreError(f"teachers {list(teachers)} were stored with different columns "
                                   f"({columns} vs {m['columns']}); recompute them with the same settings")
    feature_spec = None
    if features is not None:
        fm = store.check_manifest(store_dir, features)
        manifests.append(fm)
        feature_spec = fm["columns"]["logits"]
    shards = {u: [store.shard_of(store_dir, m, u) for m in manifests] for u in files}
    for u, f in files.items():
        rows += (manifests[0]["shards"][u]["rows"] if manifests
                 else store.open_parquet(f).metadata.num_rows)
    reader = Reader(files, shards, columns, feature_columns, label_column, input_dtype, batch_rows, permute=shuffle,
                    feature_spec=feature_spec, view_keys=views is not None)
    ds, cached = _read(reader, files, shards, shuffle, read_tasks, cache_bytes)
    return ds, rows, cached


def _read(reader: Reader, files, shards, shuffle: bool, read_tasks: int, cache_bytes: int):
    """The dataset of the reader's rows (cached in the object store when small) and whether it is cached."""
    ds = ray.data.from_items([{"unit": u} for u in files], override_num_blocks=max(1, len(files)))
    # Read tasks reserve no CPU: Train workers (and, under Tune, other trials' workers) may hold
    # every CPU, and a reader that waits for one would starve them; the pool size bounds them.
    read = dict(batch_size=1, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=read_tasks))
    if cache_bytes and sum(f.size() for f in files.values()) + sum(s.size() for ss in shards.values() for s in ss) < cache_bytes:
        ds = ds.map_batches(reader, **read).materialize()
        return (ds.randomize_block_order() if shuffle else ds), True
    if shuffle:
        ds = ds.randomize_block_order()  # one file per block: a new file order every epoch, no task
    return ds.map_batches(reader, **read), False


def first_rows(d, feature_columns: list[str], dtype: str, n: int = 2) -> np.ndarray:
    """The first `n` rows' features of a split (an input example for MLflow), read from one file."""
    f = data.parquet_files(d)[0]
    table = store.open_parquet(f).read(columns=feature_columns).slice(0, n)
    return data.features(table, feature_columns, str(f), np.dtype(dtype))
