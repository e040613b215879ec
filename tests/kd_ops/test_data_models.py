import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kd_ops import data, models


def test_mnist1d_splits_have_unique_ids_and_unlabelled_transfer():
    s = data.mnist1d_splits(300, 50, 50, 120, seed=0, transfer_seed=1)
    assert {k: len(v.ids) for k, v in s.items()} == {"train": 200, "val": 50, "test": 50, "transfer": 120}
    all_ids = np.concatenate([v.ids for v in s.values()])
    assert len(np.unique(all_ids)) == len(all_ids)
    assert s["transfer"].y is None and s["train"].x.shape == (200, 40) and s["train"].x.dtype == np.float32
    # a different seed gives different signals
    assert not np.allclose(s["train"].x[:5], s["transfer"].x[:5])


def test_split_round_trip(tmp_path):
    s = data.mnist1d_splits(200, 20, 20, 0, seed=3, transfer_seed=4)
    data.write_split(s["train"], tmp_path / "train", rows_per_file=64)
    assert len(list((tmp_path / "train").glob("*.parquet"))) == 3
    back = data.read_inputs(tmp_path / "train", ["x"])
    assert np.array_equal(back.ids, s["train"].ids) and np.array_equal(back.x, s["train"].x)
    assert np.array_equal(back.y, s["train"].y)


def test_directory_without_id_is_rejected(tmp_path):
    pq.write_table(pa.table({"x": [1.0, 2.0]}), tmp_path / "a.parquet")
    with pytest.raises(data.DataError, match=r"no `id` column"):
        data.read_inputs(tmp_path, ["x"])


def test_duplicate_ids_are_rejected(tmp_path):
    pq.write_table(pa.table({"id": [1, 2, 2, 5, 5], "x": [0.0] * 5}), tmp_path / "a.parquet")
    with pytest.raises(data.DataError, match=r"2 duplicate ids, e.g. \[2, 5\]"):
        data.read_inputs(tmp_path, ["x"])


def test_scalar_feature_columns_are_stacked(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "f1": [1, 2], "f2": [0.5, 0.25]}), tmp_path / "a.parquet")
    inp = data.read_inputs(tmp_path, ["f1", "f2"])
    assert inp.x.tolist() == [[1.0, 0.5], [2.0, 0.25]] and inp.y is None and list(inp.ids) == ["a", "b"]
    with pytest.raises(data.DataError, match=r"feature column\(s\) \['f3'\] not found"):
        data.read_inputs(tmp_path, ["f3"])


def test_factory_errors_are_clear():
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        models.build("no_such_pkg.mod:make")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        models.build("kd_ops.models:nope")
    with pytest.raises(ValueError, match="must look like"):
        models.build("kd_ops.models.cnn")


def test_weights_round_trip_and_mismatch(tmp_path):
    m = models.cnn(width=8)
    models.save_weights(m, tmp_path / "w.safetensors")
    m2 = models.load_weights(models.cnn(width=8), tmp_path / "w.safetensors")
    x = torch.randn(3, 40)
    assert torch.equal(m(x), m2(x))
    with pytest.raises(ValueError, match=r"does not fit the module CNN1D: shape mismatch"):
        models.load_weights(models.cnn(width=16), tmp_path / "w.safetensors")
    assert models.teacher_fingerprint("f", {}, tmp_path / "w.safetensors") != models.teacher_fingerprint(
        "f", {"width": 8}, tmp_path / "w.safetensors")


def test_cnn_param_count_grows_with_width():
    counts = [models.num_params(models.cnn(width=w)) for w in (16, 20, 24, 88)]
    assert counts == sorted(counts) and counts[-1] > 10 * counts[2]


def test_the_transfer_set_is_made_in_parts_with_distinct_seeds_and_any_row_count():
    parts = data.transfer_parts(25_003, seed=1)
    assert [n for n, _ in parts] == [10_000, 10_000, 5_003]
    assert len({s for _, s in parts}) == 3 and 0 not in {s for _, s in parts}
    assert data.transfer_parts(0, seed=1) == []
    # parts made by the caller (here in reverse order) give the same splits as the default one-after-another
    specs = data.mnist1d_parts(300, 0, 123, 1)
    assert specs == [(300, 0), *data.transfer_parts(123, 1)]
    a = data.mnist1d_splits(300, 50, 50, 123, seed=0, transfer_seed=1,
                            arrays=[data.mnist1d_arrays(n, s) for n, s in reversed(specs)][::-1])
    b = data.mnist1d_splits(300, 50, 50, 123, seed=0, transfer_seed=1)
    assert a["transfer"].x.shape == (123, 40) and np.array_equal(a["transfer"].x, b["transfer"].x)
    assert np.array_equal(a["train"].x, b["train"].x)
