"""Which augmented view a training row gets in an epoch: a pure function of (augment_seed, epoch,
id), so a rerun and a resumed fit see the same views, each epoch draws anew, and neither the
batch a row comes in nor its order changes it. The Train worker picks the views of each batch
of an epoch (ingest.ViewPicker, its `collate_fn`), where the epoch is known."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from kd_ops import augment
from workflows import ingest

K, M, C, SEED, FN = 3, 2, 10, 7, "kd_ops.augment:signal_views"


def _batch(ids: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
    """Rows as the Reader emits them with views: logits [N, M·K, C], teacher m's view k at m·K + k
    (here the value 100·m + k, so the kept view can be read off)."""
    n = len(ids)
    logits = np.broadcast_to((100 * np.arange(M)[:, None] + np.arange(K)[None, :]).reshape(1, M * K, 1),
                             (n, M * K, C)).astype(np.float16)
    return {"x": x, "y": np.arange(n, dtype=np.int64) % 10, "id": ids, "view_key": augment.id_keys(ids),
            "logits": logits}


def _rows(n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.permutation(10_000)[:n].astype(np.int64), rng.normal(size=(n, 40)).astype(np.float32)


def test_the_draw_is_a_function_of_seed_epoch_and_id():
    ids, _ = _rows()
    a = augment.draw_views(SEED, 1, ids, K)
    assert a.dtype == np.int64 and set(a.tolist()) == set(range(K))
    np.testing.assert_array_equal(a, augment.draw_views(SEED, 1, ids, K))  # a rerun: the same views
    perm = np.random.default_rng(1).permutation(len(ids))
    split = np.concatenate([augment.draw_views(SEED, 1, ids[part], K) for part in (perm[:7], perm[7:])])
    np.testing.assert_array_equal(split, a[perm])  # other batches, another order: row by row the same
    for other in (augment.draw_views(SEED, 2, ids, K), augment.draw_views(SEED + 1, 1, ids, K)):
        assert 0.5 < (other != a).mean() < 0.8  # another epoch or seed: a new draw (≈ 2/3 of rows differ)
    counts = np.bincount(augment.draw_views(SEED, 1, np.arange(30_000), K), minlength=K)
    assert np.all(np.abs(counts / 30_000 - 1 / K) < 0.02)  # every view about as often
    # string ids draw through their stable keys
    s = np.array([f"row-{i}" for i in ids[:50]])
    np.testing.assert_array_equal(augment.draw_views(SEED, 1, s, K), augment.draw_views(SEED, 1, augment.id_keys(s), K))


def test_the_picker_keeps_each_rows_drawn_view_of_x_and_of_the_logits():
    ids, x = _rows()
    got = ingest.ViewPicker(ingest.Views(K, FN, SEED), epoch=4).pick(_batch(ids, x))
    v = augment.draw_views(SEED, 4, ids, K)
    assert set(got) == {"x", "y", "id", "logits"} and got["logits"].shape == (len(ids), M, C)
    np.testing.assert_array_equal(got["x"], augment.signal_views(x, ids, v, SEED))
    for m in range(M):  # teacher m's logits of the drawn view
        np.testing.assert_array_equal(got["logits"][:, m, 0], 100 * m + v)
    np.testing.assert_array_equal(got["id"], ids)


def test_the_same_epoch_gives_the_same_views_in_any_batches_and_another_epoch_new_ones():
    ids, x = _rows()
    views = ingest.Views(K, FN, SEED)

    def views_of(epoch: int, order: np.ndarray, cut: int) -> dict[int, int]:
        picker, out = ingest.ViewPicker(views, epoch), {}
        for part in (order[:cut], order[cut:]):
            got = picker.pick(_batch(ids[part], x[part]))
            out |= dict(zip(got["id"].tolist(), got["logits"][:, 0, 0].astype(int).tolist()))
        return out

    rng = np.random.default_rng(3)
    first = views_of(2, np.arange(len(ids)), 256)
    assert views_of(2, rng.permutation(len(ids)), 100) == first  # a resumed or rerun epoch 2, batched otherwise
    later = views_of(3, np.arange(len(ids)), 256)
    assert sum(first[i] != later[i] for i in first) > len(ids) / 2


def test_as_collate_fn_the_picker_gives_the_worker_tensors():
    from ray.data.collate_fn import NumpyBatchCollateFn

    ids, x = _rows(64)
    batch = _batch(ids, x)
    for a in batch.values():  # Ray Data hands the collate function read-only arrays
        a.flags.writeable = False
    picker = ingest.ViewPicker(ingest.Views(K, FN, SEED), epoch=1)
    assert isinstance(picker, NumpyBatchCollateFn)  # so iter_torch_batches gives it numpy batches
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = picker(batch)
    assert not caught, [str(w.message) for w in caught]  # e.g. torch's "non-writable NumPy array"
    assert {k: v.dtype for k, v in got.items()} == {"x": torch.float32, "y": torch.int64, "id": torch.int64,
                                                   "logits": torch.float16}
    want = picker.pick(_batch(ids, x))
    for k, v in want.items():
        np.testing.assert_array_equal(got[k].numpy(), v)


@pytest.mark.parametrize("epochs", [(1, 1, 2)])
def test_a_dataset_with_views_read_as_the_worker_reads_it(ray_session, tmp_path, epochs):
    """Through Ray Data: every epoch's batches of a real dataset with stored views, read with the
    worker's collate_fn, give each row its (seed, epoch, id) view and that view's stored logits."""
    from conftest import one_teacher_split
    from kd_ops import models
    from workflows import precompute as pre

    split, src, w, t = one_teacher_split(tmp_path, rows=300)
    specs = [pre.TeacherSpec.of(t), *(pre.TeacherSpec.of(t).viewed(k, FN, SEED) for k in range(1, K))]
    pre.precompute(specs, {"train": src}, tmp_path / "store", feature_columns=["x"], batch_size=64, num_actors=1,
                   use_gpu=False)
    views = ingest.Views(K, FN, SEED)
    ds, rows, _ = ingest.dataset({"train": src}, feature_columns=["x"], label_column="label",
                                 store_dir=tmp_path / "store", teachers=["t"], views=views)
    x, ids = split.x.astype(np.float32), np.asarray(split.ids)
    with torch.inference_mode():
        teacher = models.load_weights(models.cnn(width=8), w).eval()
        stored = np.stack([teacher(torch.from_numpy(augment.signal_views(x, ids, k, SEED))).numpy() for k in range(K)])
    pos = {int(i): n for n, i in enumerate(ids)}
    seen = []
    for epoch in epochs:
        got = {}
        for b in ds.iter_torch_batches(batch_size=50, collate_fn=ingest.ViewPicker(views, epoch),
                                       local_shuffle_buffer_size=100, local_shuffle_seed=epoch):
            n = np.array([pos[int(i)] for i in b["id"]])
            v = augment.draw_views(SEED, epoch, ids[n], K)
            np.testing.assert_allclose(b["x"].numpy(), augment.signal_views(x[n], ids[n], v, SEED), atol=1e-6)
            np.testing.assert_allclose(b["logits"][:, 0].float().numpy(), stored[v, n], atol=2e-2, rtol=1e-2)
            got |= dict(zip(b["id"].tolist(), v.tolist()))
        assert len(got) == rows
        seen.append(got)
    assert seen[0] == seen[1] and seen[1] != seen[2]  # epoch 1 read twice: the same views; epoch 2: new ones
