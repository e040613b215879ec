import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from kd_ops import store

SPEC2 = {"logits": {"dtype": "float16", "shape": [2]}}
SPEC3 = {"logits": {"dtype": "float16", "shape": [3]}}


def _stage(tmp_path, teacher, ids, logits, files=2):
    staging = store.staging_dir(tmp_path, teacher)
    for i, part in enumerate(np.array_split(np.arange(len(ids)), files)):
        pq.write_table(store.shard_table(ids[part], {"logits": np.asarray(logits[part], np.float16)}), staging / f"s{i}.parquet")
    return staging


def test_encode_decode_round_trip_is_exact_fp16():
    z = (np.random.default_rng(0).standard_normal((5, 7)) * 10).astype(np.float16)
    arr = store.encode(z)
    assert arr.type.byte_width == 14
    back = store.decode(arr, "float16", [7])
    assert back.dtype == np.float16 and np.array_equal(back, z)
    assert np.array_equal(store.decode(arr.slice(2, 2), "float16", [7]), z[2:4])


def test_multi_dimensional_columns_round_trip():
    idx = np.random.default_rng(1).integers(0, 65535, (4, 3, 8)).astype(np.uint16)
    lse = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    t = store.shard_table(np.arange(4), {"indices": idx, "lse": lse})
    spec = store.column_spec({"indices": idx, "lse": lse})
    assert spec == {"indices": {"dtype": "uint16", "shape": [3, 8]}, "lse": {"dtype": "float32", "shape": [3]}}
    assert np.array_equal(store.decode(t.column("indices"), "uint16", [3, 8]), idx)
    assert np.array_equal(store.decode(t.column("lse"), "float32", [3]), lse)


def test_publish_read_and_align_by_id(tmp_path):
    ids = np.array([30, 10, 20, 40], dtype=np.int64)
    logits = np.arange(12, dtype=np.float32).reshape(4, 3)
    staging = _stage(tmp_path, "t1", ids, logits)
    m = store.publish(staging, tmp_path, "t1", kind="full", columns=SPEC3, expected_rows=4, teacher_fp="fp", input_fps={"train": "x"})
    assert not staging.exists()
    on_disk = json.loads((tmp_path / "t1" / "manifest.json").read_text())
    assert on_disk == m and m["rows"] == 4 and m["columns"] == SPEC3 and len(m["files"]) == 2
    got = store.soft_labels(tmp_path, ["t1"], np.array([20, 40, 10]))["logits"]
    assert got.shape == (1, 3, 3)
    assert np.array_equal(got[0], logits[[2, 3, 1]].astype(np.float16))
    assert store.is_current(tmp_path, "t1", "fp", {"train": "x"})
    assert not store.is_current(tmp_path, "t1", "other", {"train": "x"})
    assert not store.is_current(tmp_path, "t1", "fp", {"train": "changed"})


def test_missing_ids_are_named(tmp_path):
    ids = np.array([1, 2, 3])
    store.publish(_stage(tmp_path, "t", ids, np.zeros((3, 2))), tmp_path, "t", kind="full", columns=SPEC2, expected_rows=3,
                  teacher_fp="f", input_fps={})
    with pytest.raises(store.StoreError, match=r"2 input ids have no soft labels, e.g. \[7, 9\]"):
        store.soft_labels(tmp_path, ["t"], np.array([1, 7, 9]))


def test_duplicate_ids_are_not_published(tmp_path):
    ids = np.array([1, 2, 2, 3])
    staging = _stage(tmp_path, "t", ids, np.zeros((4, 2)))
    with pytest.raises(store.StoreError, match="duplicate ids"):
        store.publish(staging, tmp_path, "t", kind="full", columns=SPEC2, expected_rows=4, teacher_fp="f", input_fps={})
    assert not staging.exists() and not (tmp_path / "t").exists()


def test_row_count_mismatch_is_not_published_and_old_version_survives(tmp_path):
    ids = np.array([1, 2, 3])
    store.publish(_stage(tmp_path, "t", ids, np.ones((3, 2))), tmp_path, "t", kind="full", columns=SPEC2, expected_rows=3,
                  teacher_fp="old", input_fps={})
    with pytest.raises(store.StoreError, match="wrote 3 rows, expected 5"):
        store.publish(_stage(tmp_path, "t", ids, np.zeros((3, 2))), tmp_path, "t", kind="full", columns=SPEC2,
                      expected_rows=5, teacher_fp="new", input_fps={})
    assert store.read_manifest(tmp_path, "t")["teacher_fingerprint"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["t"]


def test_reading_an_incomplete_teacher_fails_clearly(tmp_path):
    (tmp_path / "t").mkdir()
    with pytest.raises(store.StoreError, match="no complete soft labels for teacher 't'.*kd precompute"):
        store.read_teacher(tmp_path, "t")


def test_shards_keep_statistics_for_ids_only_and_read_back_exactly(tmp_path):
    """min/max of a teacher column are whole rows: written per row group they cost more than the data."""
    rng = np.random.default_rng(3)
    cols = {"values": rng.standard_normal((64, 16, 32)).astype(np.float16),
            "indices": rng.integers(0, 2048, (64, 16, 32)).astype(np.uint16)}
    path = tmp_path / "shard.parquet"
    pq.write_table(store.shard_table(np.arange(64), cols), path, row_group_size=16, **store.parquet_options(cols))
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 4
    for g in range(meta.num_row_groups):
        stats = {meta.row_group(g).column(c).path_in_schema: meta.row_group(g).column(c).statistics for c in range(3)}
        assert stats["id"] is not None and stats["id"].min == 16 * g
        assert stats["values"] is None and stats["indices"] is None
    back = pq.read_table(path)
    assert np.array_equal(store.decode(back.column("values"), "float16", [16, 32]), cols["values"])
    assert np.array_equal(store.decode(back.column("indices"), "uint16", [16, 32]), cols["indices"])
