"""The end-of-run summary as printed to a pipe or a file (80 columns, no terminal to size it by):
the latency table keeps every runtime's name whole and no line is wider than the console."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from test_report_page import _summary
from workflows.summary_table import print_summary

RUNTIMES = ("teacher-pytorch-fp32", "pytorch-fp32", "onnxruntime-fp32", "onnxruntime-int8")


def _printed(s: dict, width: int = 80) -> str:
    out = io.StringIO()
    print_summary(s, Console(file=out, width=width))  # a StringIO is no terminal: rich uses `width` as given
    return out.getvalue()


def _with_target(s: dict) -> dict:
    # as workflows.stages.target.latency_on_target writes it
    s["deploy"]["target"] = {"description": "any node, 2 thread(s), batch sizes [1, 32]", "node": "n1",
                             "cpu": "AMD EPYC 7B13 64-Core Processor", "threads": 2}
    return s


@pytest.mark.parametrize("task", ["classification", "lm"])
def test_the_latency_table_reads_whole_at_80_columns(tmp_path, task):
    s = _with_target(_summary(tmp_path))
    if task == "lm":
        s |= {"task": "lm", "store_bytes_per_token": 12.5}
        for r in (*s["teachers"], s["student"], s["label_only_student"], s["deploy"]["int8"]):
            r |= {"val_perplexity": 8.25, "top1_agreement": 0.61}
        s["student"]["config"] |= {"divergence": "forward_kl", "tail": True}
    text = _printed(s)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(line for line in lines if len(line) > 80)
    assert "…" not in text
    # each (runtime, batch) row on one line, the runtime's name whole, with its median
    for r in s["deploy"]["latency"]:
        row = [line for line in lines if f" {r['runtime']} " in line and f" {r['median_ms']:.3f} " in line]
        assert len(row) == 1, (r, text)
        assert f" {r['batch']} " in row[0]
    # the INT8 notes, whole, beside the table
    assert "onnxruntime-int8 at batch 1: not faster here (1.20× ORT fp32's time)" in text
    assert "onnxruntime-int8 at batch 32: 2.50× faster than ORT fp32" in text
    # speed against PyTorch fp32 at the same batch: the teacher 0.13×, ORT fp32 6.20×
    assert sum(line.count("6.20×") for line in lines if " onnxruntime-fp32 " in line) == 2


def test_a_wide_console_prints_the_same_rows(tmp_path):
    text = _printed(_with_target(_summary(tmp_path)), width=200)
    assert all(text.count(f" {rt} ") == 2 for rt in RUNTIMES)  # batches 1 and 32


def test_every_accuracy_is_printed_with_its_interval(tmp_path):
    from kd_ops import evaluate
    from workflows.report_page import write_page
    from workflows.tasks import Classification

    s = _with_target(_summary(tmp_path)) | {"test_rows": 10_000, "val_rows": 5_000}
    Classification.add_intervals(s)
    rows = [*s["teachers"], *s["chain"], s["student"], s["label_only_student"], s["deploy"]["int8"]]
    assert all(r["test_accuracy_ci95"] == evaluate.interval95(r["test_accuracy"], 10_000) for r in rows)
    want = [f"{lo:.3f}–{hi:.3f}" for lo, hi in [r["test_accuracy_ci95"] for r in rows] + [s["ensemble_test_accuracy_ci95"]]]
    text = _printed(s)  # 80 columns: every row whole, its name on one line, its agreement at the end
    assert all(w in text for w in want), (want, text)
    assert "95% interval" in text and max(len(line) for line in text.splitlines()) <= 80
    for label, r in (("KD student", s["student"]), ("label-only student", s["label_only_student"])):
        [line] = [line for line in text.splitlines() if f" {label} " in line]
        assert line.rstrip().endswith(f"{r['test_agreement']:.4f} │"), line
    page = write_page(s, tmp_path / "run").read_text()
    assert all(w in page for w in want) and "95% interval" in page
