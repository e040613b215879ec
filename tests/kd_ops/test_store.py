import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd_ops import store

SPEC2 = {"logits": {"dtype": "float16", "shape": [2]}}
SPEC3 = {"logits": {"dtype": "float16", "shape": [3]}}


SETTINGS = {"kind": "full"}


def _key(rows, tag="k"):
    return {"size": 100 + rows, "rows": rows, "footer_sha256": tag}


def _write(root, teacher, ids, logits, files=2, fp="fp", spec=None):
    """Shards for `files` input files of split train, committed; returns the inputs mapping."""
    inputs = {"train": {}}
    for i, part in enumerate(np.array_split(np.arange(len(ids)), files)):
        name = f"part-{i}.parquet"
        inputs["train"][name] = _key(len(part))
        table = store.shard_table(ids[part], {"logits": np.asarray(logits[part], np.float16)})
        store.write_shard(root, teacher, "train", name, table, inputs["train"][name], fp, SETTINGS,
                          spec or {"logits": {"dtype": "float16", "shape": [logits.shape[1]]}})
    return inputs


def _publish(root, teacher, inputs, fp="fp", spec=SPEC3):
    return store.publish(root, teacher, kind="full", columns=spec, inputs=inputs, teacher_fp=fp, settings=SETTINGS)


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
    inputs = _write(tmp_path, "t1", ids, logits)
    m = _publish(tmp_path, "t1", inputs)
    on_disk = json.loads((tmp_path / "t1" / "manifest.json").read_text())
    assert on_disk == m and m["rows"] == 4 and m["columns"] == SPEC3 and m["format_version"] == 2
    assert sorted(m["shards"]) == ["train/part-0.parquet", "train/part-1.parquet"]
    assert [s["rows"] for s in m["shards"].values()] == [2, 2]
    got = store.soft_labels(tmp_path, ["t1"], np.array([20, 40, 10]))["logits"]
    assert got.shape == (1, 3, 3)
    assert np.array_equal(got[0], logits[[2, 3, 1]].astype(np.float16))
    assert store.is_current(tmp_path, "t1", "fp", inputs, SETTINGS)
    assert not store.is_current(tmp_path, "t1", "other", inputs, SETTINGS)
    assert not store.is_current(tmp_path, "t1", "fp", {"train": {**inputs["train"], "part-0.parquet": _key(2, "new")}})
    assert not store.is_current(tmp_path, "t1", "fp", inputs, {"kind": "topk"})


def test_missing_ids_are_named(tmp_path):
    inputs = _write(tmp_path, "t", np.array([1, 2, 3]), np.zeros((3, 2)), files=1)
    _publish(tmp_path, "t", inputs, spec=SPEC2)
    with pytest.raises(store.StoreError, match=r"2 input ids have no soft labels, e.g. \[7, 9\]"):
        store.soft_labels(tmp_path, ["t"], np.array([1, 7, 9]))


def test_a_missing_shard_is_not_published_then_a_rerun_completes_and_drops_unnamed_files(tmp_path):
    ids = np.arange(6)
    inputs = _write(tmp_path, "t", ids, np.ones((6, 3)), files=3)
    inputs["train"]["part-3.parquet"] = _key(2)  # an input file with no shard yet (a crash before it)
    with pytest.raises(store.StoreError, match=r"1 input files have no committed shard, e.g. \['train/part-3.parquet'\]"):
        _publish(tmp_path, "t", inputs)
    assert store.read_manifest(tmp_path, "t") is None
    # an interrupted attempt leaves a shard nobody commits; a shard for the same file is then written again
    store.new_shard(tmp_path, "t", "train", "part-3.parquet").write_bytes(b"half a parquet file")
    table = store.shard_table(np.array([6, 7]), {"logits": np.ones((2, 3), np.float16)})
    store.write_shard(tmp_path, "t", "train", "part-3.parquet", table, inputs["train"]["part-3.parquet"], "fp",
                      SETTINGS, SPEC3)
    m = _publish(tmp_path, "t", inputs)
    assert m["rows"] == 8
    on_disk = sorted(str(p.relative_to(tmp_path / "t")) for p in (tmp_path / "t").rglob("*.parquet"))
    assert on_disk == sorted(s["file"] for s in m["shards"].values())  # the half-written file is gone
    ids_back, _, _ = store.read_teacher(tmp_path, "t")
    assert sorted(ids_back.tolist()) == list(range(8))


def test_commits_of_another_teacher_version_settings_or_input_are_not_reused(tmp_path):
    inputs = _write(tmp_path, "t", np.arange(4), np.ones((4, 3)), files=2, fp="old")
    assert len(store.committed(tmp_path, "t", "old", SETTINGS, inputs)) == 2
    assert store.committed(tmp_path, "t", "new", SETTINGS, inputs) == {}
    assert store.committed(tmp_path, "t", "old", {"kind": "topk"}, inputs) == {}
    changed = {"train": {**inputs["train"], "part-1.parquet": _key(2, "edited")}}
    assert list(store.committed(tmp_path, "t", "old", SETTINGS, changed)) == ["train/part-0.parquet"]


def test_row_count_mismatch_is_not_published_and_old_version_survives(tmp_path):
    inputs = _write(tmp_path, "t", np.array([1, 2, 3]), np.ones((3, 2)), files=1, fp="old")
    _publish(tmp_path, "t", inputs, fp="old", spec=SPEC2)
    grown = {"train": {"part-0.parquet": _key(5)}}  # the input file changed: 5 rows now
    table = store.shard_table(np.array([1, 2, 3]), {"logits": np.zeros((3, 2), np.float16)})
    store.write_shard(tmp_path, "t", "train", "part-0.parquet", table, grown["train"]["part-0.parquet"], "new",
                      SETTINGS, SPEC2)
    with pytest.raises(store.StoreError, match="shard for train/part-0.parquet has 3 rows, the input file 5"):
        _publish(tmp_path, "t", grown, fp="new", spec=SPEC2)
    assert store.read_manifest(tmp_path, "t")["teacher_fingerprint"] == "old"
    _, arrays, _ = store.read_teacher(tmp_path, "t")  # the old version is still whole and readable
    assert np.array_equal(arrays["logits"], np.ones((3, 2), np.float16))


def test_aligned_batches_refuse_a_shard_of_another_file(tmp_path):
    from kd_ops.fsio import Loc

    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "x": [0.0, 1.0, 2.0, 3.0]}), src)
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    pq.write_table(store.shard_table(np.array([1, 2, 3, 4]), {"logits": np.zeros((4, 2), np.float16)}), good)
    pq.write_table(store.shard_table(np.array([1, 2, 9, 4]), {"logits": np.zeros((4, 2), np.float16)}), bad)
    batches = list(store.aligned_batches(Loc.of(src), ["id", "x"], [Loc.of(good)], batch_rows=3))
    assert [b.num_rows for b, _ in batches] == [3, 1] and batches[1][1][0].column("id").to_pylist() == [4]
    with pytest.raises(store.StoreError, match="row 2 has id 9 but its input file .* has 3"):
        list(store.aligned_batches(Loc.of(src), ["id", "x"], [Loc.of(bad)], batch_rows=3))


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


def test_damaged_shards_are_found_from_their_footers_and_forgotten(tmp_path):
    ids = np.arange(300, dtype=np.int64)
    logits = np.random.default_rng(0).standard_normal((300, 3))
    inputs = _write(tmp_path, "t", ids, logits, files=3)
    m = _publish(tmp_path, "t", inputs)
    assert store.damaged(tmp_path, m) == []
    shards = {u: store.shard_of(tmp_path, m, u) for u in sorted(m["shards"])}
    first, second, _ = shards
    path = shards[first].path
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])  # truncated
    t = pq.read_table(shards[second].path)
    swapped = t.column("id").to_numpy().copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # two ids swapped, same values otherwise
    pq.write_table(t.set_column(0, "id", pa.array(swapped)), shards[second].path, **store.parquet_options(SPEC3))
    assert store.damaged(tmp_path, m) == [first, second]
    store.forget(tmp_path, "t", [first, second])
    assert store.read_manifest(tmp_path, "t") is None
    left = store.committed(tmp_path, "t", "fp", SETTINGS, inputs)
    assert sorted(left) == sorted(set(shards) - {first, second})  # only those two will be recomputed
