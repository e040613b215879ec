"""Augmented views are a pure function of (seed, id, view): the view precompute stored is the view
training rebuilds."""
from __future__ import annotations

import numpy as np

from kd_ops.augment import signal_views, uniforms


def test_views_are_reproducible_per_key_and_independent_of_the_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 40)).astype(np.float32)
    ids = np.arange(1000, 1064)
    a = signal_views(x, ids, 3, seed=7)
    # the same rows in another order and batch split: the same views, row by row
    perm = rng.permutation(64)
    b = np.concatenate([signal_views(x[perm[:10]], ids[perm[:10]], 3, seed=7),
                        signal_views(x[perm[10:]], ids[perm[10:]], 3, seed=7)])
    np.testing.assert_array_equal(a[perm], b)
    assert not np.allclose(a, signal_views(x, ids, 4, seed=7))   # another view
    assert not np.allclose(a, signal_views(x, ids, 3, seed=8))   # another seed
    np.testing.assert_array_equal(signal_views(x, ids, 0, seed=7), x)  # view 0: the input itself
    per_row = signal_views(x, ids, np.array([0, 3] * 32), seed=7)
    np.testing.assert_array_equal(per_row[0::2], x[0::2])
    np.testing.assert_array_equal(per_row[1::2], a[1::2])


def test_a_view_is_a_shift_a_scale_and_small_noise():
    x = np.zeros((200, 40), np.float32)
    x[:, 20] = 1.0  # one spike per row: its new position is the shift
    out = signal_views(x, np.arange(200), 1, seed=0, noise=0.0)
    shifts = out.argmax(1) - 20
    assert set(shifts.tolist()) == set(range(-3, 4))             # every shift in ±3 is used
    peaks = out.max(1)
    assert 0.9 <= peaks.min() and peaks.max() <= 1.1 and peaks.std() > 0.03
    noisy = signal_views(np.zeros((500, 40), np.float32), np.arange(500), 1, seed=0)
    assert abs(noisy.std() - 0.05) < 0.003 and abs(noisy.mean()) < 0.003


def test_uniforms_are_uniform():
    u = uniforms(0, np.arange(20000), 1, 0, 2)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03
