"""LM distillation end to end on real Ray + MLflow (tiny corpus, tiny GPT-2 teacher trained here),
and the LM bad-input errors: mismatched vocabularies, k > vocab, missing / non-causal model
directories, sequences longer than the context."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from conftest import TINY_DEPLOY, assert_ddp_split, ddp_fits
from kd_ops import lm, store
from workflows import cli, pipeline
from workflows.config import load_config

CORPUS = {f"mod{i}.py": "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(60)) for i in range(12)}


def _corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    for name, text in CORPUS.items():
        (d / name).write_text(text)
    return d


def _config(tmp_path, **over) -> dict:
    cfg = {
        "name": "tiny-lm-test", "task": "lm",
        "data": {"source": "text", "seq_len": 16,
                 "text": {"paths": [str(_corpus(tmp_path))], "vocab_size": 300, "val_fraction": 0.2, "test_fraction": 0.2}},
        "teachers": [{"name": "gpt", "init": {"n_layer": 2, "n_embd": 32, "n_head": 4},
                      "fit": {"epochs": 2, "batch_size": 32, "lr": 0.005}}],
        "student": {"factory": "kd_ops.lm:student_from_teacher", "kwargs": {"layers": 1, "width": 16, "heads": 2}},
        "distill": {"alpha": 1.0},
        "train": {"fit": {"epochs": 2, "batch_size": 32, "lr": 0.005}, "label_only_fit": {"epochs": 2, "batch_size": 32}},
        "precompute": {"batch_size": 64, "num_actors": 1, "top_k": 8, "tail_samples": 4},
        "tune": {"enabled": False},
        "tracking": {"experiment": "tiny-lm-test", "registered_model": "tiny-lm-student"},
        "deploy": TINY_DEPLOY | {"target": {"runs": 10, "warmup": 2, "batch_sizes": [1, 4]}},
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg


def _write(tmp_path, cfg) -> str:
    p = tmp_path / "lm.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


@pytest.fixture(scope="module")
def lm_run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm-run")
    cfg = load_config(_write(tmp, _config(tmp)))
    summary = pipeline.run(cfg, tmp / "out", tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    return tmp, summary


def test_lm_run_writes_summary_and_a_topk_store(lm_run):
    tmp, s = lm_run
    assert json.loads((tmp / "out" / "summary.json").read_text())["task"] == "lm"
    for key in ("teacher_val_perplexity", "student_val_perplexity", "label_only_student_val_perplexity"):
        assert 1.0 < s[key] < 300.0  # below the uniform-guess perplexity of the 300-token vocabulary
    assert 0.0 <= s["top1_agreement"] <= 1.0
    m = store.read_manifest(tmp / "out" / "store", "gpt")
    assert m["kind"] == "topk" and m["top_k"] == 8 and m["tail_samples"] == 4
    assert m["columns"] == {"values": {"dtype": "float16", "shape": [16, 8]},
                            "indices": {"dtype": "uint16", "shape": [16, 8]},
                            "lse": {"dtype": "float32", "shape": [16]},
                            "tail_values": {"dtype": "float16", "shape": [16, 4]},
                            "tail_indices": {"dtype": "uint16", "shape": [16, 4]}}
    # (8 + 4) × (2 + 2) + 4 = 52 raw bytes per token, less after Parquet compression, plus file overhead
    assert 15 < s["store_bytes_per_token"] < 80
    assert s["student"]["params"] < s["teachers"][0]["params"] / 2


def test_the_lm_student_ships_as_onnx_and_int8(lm_run):
    """The GPT-2 student exports (batch dynamic, sequence fixed), matches PyTorch, is quantized and
    scored by perplexity like the student, and timed."""
    from kd_ops import deploy as dp

    tmp, s = lm_run
    d = s["deploy"]
    assert "onnx_error" not in d, d.get("onnx_error")
    assert d["onnx"]["opset"] >= 18 and d["onnx"]["max_abs_logit_diff"] < 1e-3
    assert 1.0 < d["int8"]["val_perplexity"] < 300.0 and 0 < d["int8"]["weight_bytes"] < d["onnx"]["fp32_weight_bytes"]
    # drops are measured against the fp32 ONNX file on validation: what quantization alone changed
    i8 = d["int8"]
    assert i8["fp32_val_perplexity"] == pytest.approx(s["student_val_perplexity"], rel=1e-3)
    assert i8["ptq_drop"] == pytest.approx(i8["ptq_val_perplexity"] / i8["fp32_val_perplexity"] - 1)
    # deploy.qat: always — one epoch of quantization-aware distillation through the GPT-2 student
    assert d["int8"]["qat_epochs"] == 1
    assert i8["qat_drop"] == pytest.approx(i8["qat_val_perplexity"] / i8["fp32_val_perplexity"] - 1)
    # chosen on validation; the test split scores only the INT8 model that ships
    assert d["int8"]["chosen_by"] == "val_perplexity"
    assert d["int8"]["test_drop"] == pytest.approx(d["int8"]["test_perplexity"] / s["student"]["test_perplexity"] - 1)
    x = lm.tokenize_and_pack(lm.load_tokenizer(tmp / "out" / "tokenizer"), list(CORPUS.values())[:2], 16)[:4]
    logits = dp.onnx_logits(dp.onnx_session(str(tmp / "out" / "deploy" / "student.onnx")), x.astype(np.int64))
    assert logits.shape == (4, 16, 300)
    assert {(r["runtime"], r["batch"]) for r in d["latency"]} == {
        (rt, b) for rt in ("pytorch-fp32", "onnxruntime-fp32", "onnxruntime-int8") for b in (1, 4)}


def test_lm_store_matches_the_teacher(lm_run):
    tmp, _ = lm_run
    import torch

    from kd_ops import data

    val = data.read_inputs(tmp / "out" / "data" / "val", ["x"], dtype=np.int32)
    cols = store.soft_labels(tmp / "out" / "store", ["gpt"], val.ids[:4])
    teacher = lm.load_causal_lm(tmp / "out" / "teachers" / "gpt")
    with torch.inference_mode():
        logits = teacher(torch.from_numpy(val.x[:4]).long())
    v, i, lse = torch.topk(logits, 8).values, torch.topk(logits, 8).indices, torch.logsumexp(logits, -1)
    np.testing.assert_allclose(cols["values"][0].astype(np.float32), v.numpy(), atol=2e-2)
    assert (cols["indices"][0].astype(np.int64) == i.numpy()).mean() > 0.99  # ties may swap
    np.testing.assert_allclose(cols["lse"][0], lse.numpy(), rtol=1e-5)
    # tail draws: outside the stored top-8, stored with the teacher's own logits there
    ti = cols["tail_indices"][0].astype(np.int64)
    assert not (ti[..., :, None] == cols["indices"][0][..., None, :].astype(np.int64)).any()
    np.testing.assert_allclose(cols["tail_values"][0].astype(np.float32),
                               np.take_along_axis(logits.numpy(), ti, -1), atol=2e-2)


def _fails(capsys, tmp_path, cfg, command="precompute") -> str:
    rc = cli.main([command, _write(tmp_path, cfg), "--out", str(tmp_path / "out"),
                   "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("kd: error:") == 1
    assert not list((tmp_path / "out").rglob("manifest.json")) and not (tmp_path / "out" / "summary.json").exists()
    return err


def _teacher_dir(tmp_path, lm_run, name="gpt"):
    return str(lm_run[0] / "out" / "teachers" / name)


def test_teachers_with_different_vocabularies_are_refused(ray_session, capsys, tmp_path, lm_run):
    other = tmp_path / "other"
    tok = lm.load_tokenizer(_teacher_dir(tmp_path, lm_run))
    m = lm.new_causal_lm(len(tok) + 5, 16, 1, 16, 2)
    m.hf.save_pretrained(other)
    tok.save_pretrained(other)
    cfg = _config(tmp_path, teachers=[{"name": "a", "hf_dir": _teacher_dir(tmp_path, lm_run)},
                                      {"name": "b", "hf_dir": str(other)}])
    err = _fails(capsys, tmp_path, cfg, "run")
    assert f"vocab sizes differ: a={len(tok)}, b={len(tok) + 5}" in err


def test_k_larger_than_the_vocabulary_is_refused(ray_session, capsys, tmp_path, lm_run):
    cfg = _config(tmp_path, teachers=[{"name": "a", "hf_dir": _teacher_dir(tmp_path, lm_run)}])
    cfg["precompute"]["top_k"] = 100000
    err = _fails(capsys, tmp_path, cfg, "run")
    assert "k=100000 is larger than the vocabulary" in err


def test_missing_and_non_causal_model_directories_are_refused(ray_session, capsys, tmp_path):
    from transformers import ViTConfig

    err = _fails(capsys, tmp_path, _config(tmp_path, teachers=[{"name": "a", "hf_dir": str(tmp_path / "nope")}]), "run")
    assert "model directory" in err and "does not exist" in err
    ViTConfig().save_pretrained(tmp_path / "vit")
    err = _fails(capsys, tmp_path, _config(tmp_path, teachers=[{"name": "a", "hf_dir": str(tmp_path / "vit")}]), "run")
    assert "is not a causal LM" in err or "no usable tokenizer" in err


def test_a_teacher_with_only_pickle_weights_is_refused_unless_the_config_opts_in(ray_session, capsys, tmp_path, lm_run):
    import shutil

    import torch

    pickled = tmp_path / "pickled"
    shutil.copytree(_teacher_dir(tmp_path, lm_run), pickled)
    torch.save(lm.load_causal_lm(pickled).hf.state_dict(), pickled / "pytorch_model.bin")  # as older tools saved them
    (pickled / "model.safetensors").unlink()
    err = _fails(capsys, tmp_path, _config(tmp_path, teachers=[{"name": "a", "hf_dir": str(pickled)}]), "run")
    assert "has only pickle weights (pytorch_model.bin)" in err and "set allow_pickle: true" in err, err
    assert "Traceback" not in err
    from workflows.precompute import TeacherSpec

    cfg = load_config(_write(tmp_path, _config(tmp_path, teachers=[{"name": "a", "hf_dir": str(pickled),
                                                                     "allow_pickle": True}])))
    spec = TeacherSpec.of(cfg.teachers[0])  # what precompute's actors build
    assert [f.name for f in spec.weight_files] == ["pytorch_model.bin"] and spec.kwargs["allow_pickle"] is True
    assert spec.build()(torch.zeros(1, 4, dtype=torch.long)).shape[:2] == (1, 4)


def test_sequences_longer_than_the_context_are_refused(ray_session, capsys, tmp_path, lm_run):
    cfg = _config(tmp_path, teachers=[{"name": "a", "hf_dir": _teacher_dir(tmp_path, lm_run)}])
    cfg["data"]["seq_len"] = 40  # the test teacher was built with 16 positions
    err = _fails(capsys, tmp_path, cfg, "run")
    assert "sequence length 40 is longer than a's context (16 positions)" in err


def test_the_runs_own_tokenizer_reloads_for_a_rerun(lm_run):
    # `kd run` on an existing --out reuses the data stage, which reloads DIR/tokenizer (no config.json there)
    tmp, _ = lm_run
    tok = lm.load_tokenizer(tmp / "out" / "tokenizer")
    assert lm.tokenizer_fingerprint(tok) == lm.tokenizer_fingerprint(lm.load_tokenizer(tmp / "out" / "teachers" / "gpt"))


def test_two_lm_train_workers_split_each_epoch_and_hold_the_same_weights(lm_run, tmp_path):
    """DDP for an LM student on the streamed top-k store: disjoint sequences per worker whose union is
    the training split, identical weights, and a validation perplexity within noise of one worker's
    (the run's student: the same fit on one worker, tune being off)."""
    tmp, summary = lm_run
    cfg = load_config(tmp / "lm.yaml")
    assert not cfg.tune.enabled and cfg.train.num_workers == 1
    kwargs = summary["student"]["config"]["student_kwargs"] | {"teacher_dir": str(tmp / "out" / "teachers" / "gpt")}
    fits, expected = ddp_fits(cfg, tmp / "out", tmp_path, cfg.train.fit, kwargs, workers=(2,))
    assert len(expected) % 2 == 0, len(expected)  # an even count: Ray's equal split drops no sequence
    assert_ddp_split(fits, expected, cfg.train.fit.epochs)
    one, two = summary["student_val_perplexity"], fits[2][0].metrics["val_perplexity"]
    assert abs(np.log(two / one)) <= 0.15, (one, two)
