"""Augmented views in the store: the teacher's logits of view k of every training row, and a
dataset that gives the student, per row and epoch, one view of x with that view's logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import one_teacher_split
from kd_ops import augment, models, store
from workflows import ingest
from workflows import precompute as pre

K, SEED = 3, 7


def _teacher_logits(w, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return models.load_weights(models.cnn(width=8), w).eval()(torch.from_numpy(x)).numpy()


def test_views_are_stored_per_view_and_each_row_gets_one_view_with_its_logits(ray_session, tmp_path):
    split, src, w, t = one_teacher_split(tmp_path, rows=400)
    fn = "kd_ops.augment:signal_views"
    specs = [pre.TeacherSpec.of(t), *(pre.TeacherSpec.of(t).viewed(k, fn, SEED) for k in range(1, K))]
    assert [s.name for s in specs] == ["t", "t.view1", "t.view2"]
    assert len({s.fingerprint() for s in specs}) == K  # each view is its own store entry
    opts = dict(feature_columns=["x"], batch_size=64, num_actors=1, use_gpu=False)
    pre.precompute(specs, {"train": src}, tmp_path / "store", **opts)

    # the stored logits of view k are the teacher on view k of each row, rebuilt from (seed, id, k)
    x, ids = split.x.astype(np.float32), np.asarray(split.ids)
    for k in range(K):
        got = {}
        m = store.read_manifest(tmp_path / "store", store.view_entry("t", k))
        for u in m["shards"]:
            table = store.open_parquet(store.shard_of(tmp_path / "store", m, u)).read()
            got |= dict(zip(table.column("id").to_pylist(),
                            store.decode(table.column("logits"), "float16", [10]).astype(np.float32)))
        want = _teacher_logits(w, augment.signal_views(x, ids, k, SEED))
        np.testing.assert_allclose(np.stack([got[i] for i in ids.tolist()]), want, atol=2e-2, rtol=1e-2, err_msg=f"view {k}")
    assert store.size_bytes(tmp_path / "store", ["t.view1", "t.view2"]) > store.size_bytes(tmp_path / "store", ["t"])

    ds, rows, _ = ingest.dataset({"train": src}, feature_columns=["x"], label_column="label",
                                 store_dir=tmp_path / "store", teachers=["t"],
                                 views=ingest.Views(K, fn, SEED))
    n_rows = len(ids)
    assert rows == n_rows
    with pytest.raises(store.StoreError, match=r"store entry 't.view1' holds views made by kd_ops.augment:signal_views "
                                               r"with seed 7, but this run makes them with .* and seed 8"):
        ingest.dataset({"train": src}, feature_columns=["x"], label_column="label", store_dir=tmp_path / "store",
                       teachers=["t"], views=ingest.Views(K, fn, SEED + 1))
    views = np.stack([augment.signal_views(x, ids, k, SEED) for k in range(K)])       # [K, N, L]
    stored = np.stack([_teacher_logits(w, views[k]) for k in range(K)])              # [K, N, C]
    pos = {int(i): n for n, i in enumerate(ids)}
    drawn = []
    for epoch in (1, 2):
        raw = next(iter(ds.iter_batches(batch_size=n_rows, batch_format="numpy")))
        batch = ingest.ViewPicker(ingest.Views(K, fn, SEED), epoch).pick(raw)
        assert set(batch) == {"x", "y", "id", "logits"} and batch["logits"].shape == (n_rows, 1, 10)
        n = np.array([pos[int(i)] for i in batch["id"]])
        # each row's x is one of its K views, and its logits are that view's
        match = np.all(np.isclose(batch["x"][None], views[:, n], atol=1e-6), axis=2)  # [K, rows]
        assert match.any(0).all()
        v = match.argmax(0)
        np.testing.assert_allclose(batch["logits"][:, 0], stored[v, n], atol=2e-2, rtol=1e-2)
        assert len(set(v.tolist())) == K  # every view is drawn
        drawn.append(dict(zip(batch["id"].tolist(), v.tolist())))
    assert drawn[0] != drawn[1]  # a new draw every epoch


def test_view_keys_and_a_view_function_that_changes_the_shape():
    assert augment.id_keys(np.array([3, 9])).tolist() == [3, 9]
    a, b = augment.id_keys(np.array(["row-1", "row-2"])), augment.id_keys(np.array(["row-1"]))
    assert a.dtype == np.int64 and a[0] == b[0] != a[1] and (a >= 0).all()
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match=r"returned float32\[2, 4\] for inputs float32\[2, 5\]: it must keep the shape"):
        augment.apply(lambda x, ids, view, seed: x[:, :4], x, np.arange(2), 1, 0)
