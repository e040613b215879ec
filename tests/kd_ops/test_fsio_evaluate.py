"""Storage locations, input-file keys from metadata, and the per-batch counts metrics are built from."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kd_ops import data, evaluate, losses
from kd_ops.fsio import Loc


def test_loc_writes_whole_files_lists_and_deletes(tmp_path):
    root = Loc.of(tmp_path / "a")
    (root / "x" / "one.json").write_text("1")
    (root / "x" / "two.json").write_bytes(b"2")
    (root / "x" / "skip.txt").write_text("3")
    assert [f.name for f in (root / "x").files(".json")] == ["one.json", "two.json"]
    assert [f.name for f in root.files(".json", recursive=True)] == ["one.json", "two.json"]
    assert not list((tmp_path / "a" / "x").glob("*.tmp-*"))  # the tmp file was renamed, not left behind
    assert (root / "x" / "one.json").read_text() == "1" and (root / "x" / "one.json").size() == 1
    assert (root / "nope").files() == [] and not (root / "nope").exists()
    (root / "x").delete()
    assert not (root / "x").exists()
    assert Loc.of("file:///tmp/some/where").path == "/tmp/some/where"


def test_file_key_comes_from_metadata_and_follows_the_content(tmp_path):
    t = pa.table({"id": np.arange(10), "x": np.arange(10.0)})
    pq.write_table(t, tmp_path / "a.parquet")
    pq.write_table(t, tmp_path / "b.parquet")
    key = data.file_key(Loc.of(tmp_path / "a.parquet"), ["id", "x"])
    assert key["rows"] == 10 and key == data.file_key(Loc.of(tmp_path / "b.parquet"))  # same bytes, same key
    pq.write_table(t.set_column(1, "x", pa.array(np.arange(10.0) + 1)), tmp_path / "b.parquet")
    assert data.file_key(Loc.of(tmp_path / "b.parquet"))["footer_sha256"] != key["footer_sha256"]
    with pytest.raises(data.DataError, match="no `id` column"):
        data.file_key(_without_id(tmp_path), ["id", "x"])
    with pytest.raises(data.DataError, match=r"column\(s\) \['z'\] not found"):
        data.file_key(Loc.of(tmp_path / "a.parquet"), ["id", "z"])


def _without_id(tmp_path):
    pq.write_table(pa.table({"x": [1.0]}), tmp_path / "c.parquet")
    return Loc.of(tmp_path / "c.parquet")


def test_classification_counts_skip_unlabelled_rows_and_weight_the_ensemble():
    student = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, -1])
    # teacher 0 says class 0 everywhere, teacher 1 says class 1 everywhere, weighted 0.2 / 0.8
    t = torch.tensor([[[3.0, 0.0], [0.0, 3.0]]] * 4)  # [B, M, C]
    out = evaluate.classification_sums(student, labels, t, torch.tensor([0.2, 0.8]))
    counts = {k: v for k, v in out.items() if not k.startswith(("bin", "class", "ensemble_bin", "ensemble_class"))}
    assert counts == {"rows": 3.0, "correct": 1.0, "ensemble_correct": 1.0, "teacher0_correct": 2.0,
                      "teacher1_correct": 1.0, "agree": 1.0}
    r = evaluate.rates(out, "classification")
    # the student is 0.8808 confident (softmax of [2, 0]) on all 3 labelled rows and right on 1:
    # one confidence bin, |1 − 3 × 0.8808| / 3
    p = float(torch.softmax(torch.tensor([2.0, 0.0]), 0)[0])
    assert r["ece"] == pytest.approx(abs(1 - 3 * p) / 3)
    assert r["per_class_accuracy"] == [0.5, 0.0]  # class 0: rows 0 (right) and 1 (wrong); class 1: row 2 (wrong)
    # the ensemble (0.2 × class 0 + 0.8 × class 1 at T=1) predicts class 1 on every row: right only on row 2
    assert r["ensemble_per_class_accuracy"] == [0.0, 1.0]
    assert r["accuracy"] == pytest.approx(1 / 3) and "bin0_n" not in r


def test_lm_counts_give_the_perplexity_of_a_uniform_model():
    logits = torch.zeros(2, 5, 7)  # uniform over 7 tokens: nll per position = log 7
    ids = torch.randint(0, 7, (2, 5))
    out = evaluate.lm_sums(logits, ids, {"indices": ids[:, None, :, None]}, torch.tensor([1.0]))  # top-1 = ids
    assert out["tokens"] == 8 and out["positions"] == 10
    assert np.exp(out["nll"] / out["tokens"]) == pytest.approx(7.0, rel=1e-5)
    assert out["agree"] == float((ids == 0).sum())  # argmax of a uniform row is token 0


def test_mix_is_the_alpha_weighted_sum_and_checks_alpha():
    kd, ce = torch.tensor(2.0), torch.tensor(10.0)
    assert float(losses.mix(kd, ce, 0.25)) == pytest.approx(0.25 * 2 + 0.75 * 10)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        losses.mix(kd, ce, 1.5)


def test_lm_kl_and_rates_per_position():
    logits = torch.zeros(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    teacher = {"logits": torch.zeros(2, 1, 5, 7)}  # the same uniform distribution: KL 0
    out = evaluate.lm_sums(logits, ids, teacher, torch.tensor([1.0]), kl=True)
    assert out["kl"] == pytest.approx(0.0, abs=1e-5)
    r = evaluate.rates(out, "lm")
    assert r["perplexity"] == pytest.approx(7.0, rel=1e-5) and r["top1_agreement"] == out["agree"] / 10


def test_interval95_is_wilsons_and_narrows_with_rows():
    # Wilson's interval by hand for 90 of 100: centre (p + z²/2n)/(1 + z²/n), half-width z·√(p(1-p)/n + z²/4n²)/(1 + z²/n)
    lo, hi = evaluate.interval95(0.9, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.8256, 0.9448)
    assert lo < 0.9 < hi and hi - 0.9 < 0.9 - lo  # skewed away from the bound at 1
    # what the demo's splits resolve: ±2.6 points on 500 rows, ±0.6 on 10,000
    assert evaluate.interval95(0.9, 500)[1] - evaluate.interval95(0.9, 500)[0] == pytest.approx(0.052, abs=0.002)
    assert evaluate.interval95(0.9, 10_000)[1] - evaluate.interval95(0.9, 10_000)[0] == pytest.approx(0.0118, abs=0.0003)
    assert evaluate.interval95(1.0, 50) == (pytest.approx(0.9287, abs=1e-4), 1.0)  # inside [0, 1]
    assert evaluate.interval95(0.0, 50)[0] == pytest.approx(0.0, abs=1e-12)
    assert evaluate.interval95(0.5, 0) == (0.0, 1.0)
