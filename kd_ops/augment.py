"""Seeded augmented views of inputs, reproducible from (seed, sample id, view) alone.

Fast Knowledge Distillation (Shen & Xing, ECCV 2022) stores the teacher's soft labels per
augmented view so the teacher still runs once; "patient and consistent" distillation (Beyer et
al., CVPR 2022) needs teacher and student to see the same view. Both hold when the view can be
rebuilt anywhere from its key: precompute writes the teacher's logits of view k of sample i, and
training rebuilds exactly that input from (seed, i, k). View 0 is the input itself.

The randomness is counter-based (splitmix64 of the key), vectorised over rows, so no generator
state travels between processes.
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: uint64 → well-mixed uint64 (elementwise)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, ids: np.ndarray, view: np.ndarray | int, stream: int, n: int) -> np.ndarray:
    """[N, n] floats in [0, 1), a pure function of (seed, id, view, stream, column)."""
    with np.errstate(over="ignore"):
        key = (np.asarray(ids, np.int64).astype(np.uint64) * _GOLDEN
               ^ _mix(np.asarray(view, np.int64).astype(np.uint64) + np.uint64(seed) * _GOLDEN
                      + np.uint64(stream) * np.uint64(0xD1B54A32D192ED03)))
        z = _mix(key[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None, :] * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def signal_views(x: np.ndarray, ids: np.ndarray, view: np.ndarray | int, seed: int = 0, *, max_shift: int = 3,
                 scale: float = 0.1, noise: float = 0.05) -> np.ndarray:
    """View `view` of 1-D signals x [N, L] (float32): a circular shift by up to ±max_shift
    positions, an amplitude scale in [1 − scale, 1 + scale] and Gaussian noise of std `noise`
    (for MNIST-1D-like inputs). ids [N] int64; view: one int or [N]. Rows of view 0 are returned
    unchanged."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"signal_views takes 1-D signals [N, L], got inputs of shape {list(x.shape)}; give "
                         "precompute.augment a view function for these inputs")
    n, length = x.shape
    view = np.broadcast_to(np.asarray(view, np.int64), (n,))
    u = uniforms(seed, ids, view, 0, 2)
    shift = np.floor(u[:, 0] * (2 * max_shift + 1)).astype(np.int64) - max_shift
    amp = 1 - scale + 2 * scale * u[:, 1]
    g = uniforms(seed, ids, view, 1, 2 * length)  # Box–Muller over pairs of uniforms
    gauss = np.sqrt(-2 * np.log1p(-g[:, :length])) * np.cos(2 * np.pi * g[:, length:])
    cols = (np.arange(length)[None, :] - shift[:, None]) % length
    out = (np.take_along_axis(x, cols, axis=1) * amp[:, None] + noise * gauss).astype(np.float32)
    return np.where((view == 0)[:, None], x, out)


_DRAW_STREAM = 0xD7A3  # the per-epoch view draw's own stream, apart from any view function's


def draw_views(seed: int, epoch: int, ids, k: int) -> np.ndarray:
    """[N] int64 in 0..k-1: the view each row trains on in `epoch`. A pure function of (seed,
    epoch, id), so a rerun or a resumed fit sees the same views whatever its batches, and each
    epoch draws anew."""
    u = uniforms(seed, id_keys(ids), epoch, _DRAW_STREAM, 1)[:, 0]
    return (u * k).astype(np.int64)  # u < 1: never k


def id_keys(ids) -> np.ndarray:
    """Sample ids as the int64 keys augmentations take: integer ids as they are, any other id
    (strings) by a stable 63-bit hash, so a view is a function of the id whatever its type."""
    a = np.asarray(ids)
    if a.dtype.kind in "iu":
        return a.astype(np.int64)
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") >> 1
                     for i in a], np.int64)


def apply(fn, x: np.ndarray, ids, view: np.ndarray | int, seed: int) -> np.ndarray:
    """`fn(x, ids, view, seed)` (e.g. `signal_views`, or a user function of the same signature)
    on a batch, checked: the view must keep the input's shape and dtype, which the teacher and
    the student both take."""
    out = np.asarray(fn(x, id_keys(ids), view, seed))
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"augmentation {getattr(fn, '__name__', fn)!r} returned {out.dtype}{list(out.shape)} for "
                         f"inputs {x.dtype}{list(x.shape)}: it must keep the shape and dtype")
    return out
