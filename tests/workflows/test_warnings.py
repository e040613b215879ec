"""Honest warnings on a real run: teachers with random weights mislead the student, the label-only
student wins, and the run says so on the console, in summary.json and in the report page."""
from __future__ import annotations

import contextlib
import html
import io
import json

import pytest
import torch

from browser import not_blank, render
from conftest import TINY_DEPLOY, tiny_config
from kd_ops import deploy as kd_deploy
from kd_ops import models
from test_report_page import _need_chromium
from workflows import cli


@pytest.fixture(scope="module")
def random_teachers_run(ray_session, tmp_path_factory):
    """A run whose teachers were never trained, deploying its student while INT8 quantization
    fails, into an --out holding an earlier run's INT8 files: (summary, console, out, tmp dir)."""
    tmp_path = tmp_path_factory.mktemp("random-teachers")
    teachers = []
    for i in range(2):
        torch.manual_seed(100 + i)
        w = tmp_path / f"random{i}.safetensors"
        models.save_weights(models.cnn(width=16), w)  # never trained
        teachers.append({"name": f"random{i}", "factory": "kd_ops.models:cnn", "kwargs": {"width": 16},
                         "weights": str(w)})
    cfg = tiny_config(tmp_path, teachers=teachers, tune={"enabled": False},
                      distill={"alpha": 1.0, "temperature": 1.0},  # the student learns from the teachers only
                      data={"mnist1d": {"labelled": 1400, "val": 300, "test": 100, "transfer": 0}},
                      train={"fit": {"epochs": 3}, "label_only_fit": {"epochs": 15, "lr": 0.01}},
                      deploy={**TINY_DEPLOY, "qat": "never"})
    out = tmp_path / "out"
    (out / "deploy").mkdir(parents=True)
    for stale in ("student.int8.onnx", "student.qat.onnx", "pareto.png"):  # an earlier run's
        (out / "deploy" / stale).write_bytes(b"stale")

    def broken(*args, **kwargs):  # a quantizer failure (fault injection; the quantizer is tested in tests/kd_ops)
        raise RuntimeError("injected: ONNX Runtime could not quantize this graph")

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(kd_deploy, "quantize_int8", broken)
        code = cli.main(["run", str(cfg), "--out", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert code == 0, printed.getvalue()[-3000:]
    return json.loads((out / "summary.json").read_text()), printed.getvalue(), out, tmp_path


def test_random_teachers_the_label_only_student_wins_and_the_run_says_so(random_teachers_run):
    s, printed, out, tmp_path = random_teachers_run
    # judged on the validation split, as every choice and warning is
    kd, lo = s["student"]["val_accuracy"], s["label_only_student"]["val_accuracy"]
    assert lo > kd, (lo, kd)
    labels_win = [w for w in s["warnings"] if w.startswith("the label-only student")]
    weak = [w for w in s["warnings"] if w.startswith("teacher random")]
    assert len(labels_win) == 1 and f"{kd:.4f}" in labels_win[0] and f"{lo:.4f}" in labels_win[0]
    assert len(weak) == 2  # both random teachers are worse than the label-only student
    page = (out / "report.html").read_text()
    for w in labels_win + weak:
        assert f"warning: {w}" in printed
        assert html.escape(w) in page
    assert s["teacher_compute"]["online_forward_rows"] == 2 * 3 * 1000  # 2 teachers × 3 epochs × 1,000 train rows
    # the run's own page, in a real browser: rendered, its charts decoded, the warnings on it
    _need_chromium()
    shown = render(out / "report.html", tmp_path / "report.png")
    assert shown["images_total"] >= 1 and shown["images_decoded"] == shown["images_total"]
    assert 'id="warnings"' in shown["dom"] and html.escape(labels_win[0]) in shown["dom"]
    assert not_blank(tmp_path / "report.png") > 0.02


def test_a_failed_int8_quantization_is_a_warning_and_the_student_ships_in_fp32(random_teachers_run):
    s, printed, out, _ = random_teachers_run
    d = s["deploy"]
    assert d["int8_error"] == "RuntimeError: injected: ONNX Runtime could not quantize this graph"
    assert "int8" not in d and d["files"] == ["student.onnx"]
    assert s["mlflow"]["registered_model"]["version"] == "1"
    assert {r["runtime"] for r in d["latency"]} == {"teacher-pytorch-fp32", "pytorch-fp32", "onnxruntime-fp32"}
    warned = [w for w in s["warnings"] if w.startswith("INT8 quantization failed")]
    assert len(warned) == 1 and f"warning: {warned[0]}" in printed
    # only what this run wrote: the earlier run's INT8, QAT and Pareto files are gone
    assert sorted(p.name for p in (out / "deploy").iterdir()) == ["student.onnx"]
    assert (out / "report.html").is_file()
