"""Honest warnings on a real run: teachers with random weights mislead the student, the label-only
student wins, and the run says so on the console, in summary.json and in the report page."""
from __future__ import annotations

import html
import json

import pytest
import torch

from browser import not_blank, render
from conftest import tiny_config
from kd_ops import models
from test_report_page import _need_chromium
from workflows import cli


def test_random_teachers_the_label_only_student_wins_and_the_run_says_so(ray_session, tmp_path, capsys):
    teachers = []
    for i in range(2):
        torch.manual_seed(100 + i)
        w = tmp_path / f"random{i}.safetensors"
        models.save_weights(models.cnn(width=16), w)  # never trained
        teachers.append({"name": f"random{i}", "factory": "kd_ops.models:cnn", "kwargs": {"width": 16},
                         "weights": str(w)})
    cfg = tiny_config(tmp_path, teachers=teachers, tune={"enabled": False},
                      distill={"alpha": 1.0, "temperature": 1.0},  # the student learns from the teachers only
                      data={"mnist1d": {"labelled": 1400, "val": 100, "test": 300, "transfer": 0}},
                      train={"fit": {"epochs": 3}, "label_only_fit": {"epochs": 15, "lr": 0.01}})
    out = tmp_path / "out"
    capsys.readouterr()
    code = cli.main(["run", str(cfg), "--out", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    printed = capsys.readouterr().out
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    kd, lo = s["student"]["test_accuracy"], s["label_only_student"]["test_accuracy"]
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
