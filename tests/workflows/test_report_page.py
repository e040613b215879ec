"""`kd report`'s HTML page: built from a realistic summary, parsed, and rendered in a real headless
Chromium (images decoded, tables in the DOM, a non-blank screenshot). No Ray, no MLflow."""
from __future__ import annotations

import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser import INSTALL_HINT, chromium, not_blank, render

from workflows.report_page import write_page

TEACHERS = ["cnn-a", "cnn-b", "mlp-c"]
WARNINGS = ["teacher mlp-c is < 0.5 accurate on class 7 & was down-weighted",
            "onnxruntime-int8 is not faster than fp32 at batch 1 on this target"]


def _pareto_png(path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    lat, acc = [0.05, 0.08, 0.12, 0.2, 0.35], [0.81, 0.86, 0.9, 0.92, 0.93]
    ax.plot(lat, acc, "o-", color="#2a7")
    ax.scatter([0.1, 0.25], [0.84, 0.89], color="#999")
    ax.set_xlabel("latency batch 1 (ms)")
    ax.set_ylabel("val accuracy")
    ax.set_title("Pareto front")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _summary(run_dir: Path) -> dict:
    _pareto_png(run_dir / "deploy" / "pareto.png")
    method = {"response": "dkd", "dkd_alpha": 1.0, "dkd_beta": 8.0, "schedule": "cosine", "temperature_end": 1.0,
              "standardize": False, "feature": None, "feature_weight": 0.0, "rkd_distance": 0.0, "rkd_angle": 0.0}
    trials = []
    for i in range(8):
        row = {"trial_id": f"a1b2_{i:05d}", "temperature": 1.0 + 0.7 * i, "alpha": round(0.1 + 0.1 * i, 2),
               "student_width": [8, 16, 32][i % 3], "epochs": 4 if i % 2 else 2,
               "val_accuracy": 0.80 + 0.013 * ((i * 5) % 8), "val_agreement": 0.83 + 0.01 * i,
               "latency_ms": 0.04 + 0.01 * [8, 16, 32][i % 3] / 8, "params": [3100, 11900, 46700][i % 3]}
        row |= {f"teacher_weight.{t}": round(0.2 + 0.1 * ((i + j) % 5), 2) for j, t in enumerate(TEACHERS)}
        trials.append(row)
    lat = []
    for batch in (1, 32):
        for runtime, ms in (("teacher-pytorch-fp32", 2.4), ("pytorch-fp32", 0.31), ("onnxruntime-fp32", 0.05),
                            ("onnxruntime-int8", 0.06 if batch == 1 else 0.02)):
            scale = 1 if batch == 1 else 9
            lat.append({"runtime": runtime, "batch": batch, "median_ms": ms * scale, "p95_ms": ms * scale * 1.3,
                        "runs": 200, "rss_added_mb": 40.0 if runtime.startswith("teacher") else 12.5})
    return {
        "name": "mnist1d <demo>",
        "task": "classification",
        "warnings": WARNINGS,
        "teachers": [{"name": "cnn-a", "params": 126_000, "test_accuracy": 0.9312, "test_ece": 0.031},
                     {"name": "cnn-b", "params": 98_500, "test_accuracy": 0.9204, "test_ece": 0.042},
                     {"name": "mlp-c", "params": 64_200, "test_accuracy": 0.7711}],
        "ensemble_test_accuracy": 0.9405, "ensemble_test_ece": 0.018,
        "chain": [{"name": "TAKD assistant (width 32)", "params": 46_700, "test_accuracy": 0.9101,
                   "test_agreement": 0.9322}],
        "student": {"params": 11_900, "test_accuracy": 0.9050, "test_agreement": 0.9233, "val_accuracy": 0.9012,
                    "test_ece": 0.027,
                    "config": {"temperature": 4.5, "alpha": 0.6, "teacher_weights": [0.5, 0.35, 0.15],
                               "student_kwargs": {"width": 16}, "teachers": TEACHERS, "method": method}},
        "label_only_student": {"params": 11_900, "test_accuracy": 0.8421, "test_agreement": 0.8630, "test_ece": 0.061},
        "student_vs_ensemble": 0.9050 / 0.9405,
        "tune_trials": trials,
        "chosen_trial": "a1b2_00003",
        "tune_failed_trials": [],
        "per_class_accuracy": {
            "ensemble": [0.97, 0.95, 0.93, 0.9, 0.96, 0.92, 0.94, 0.91, 0.95, 0.93],
            "KD student": [0.95, 0.92, 0.9, 0.86, 0.93, 0.88, 0.91, 0.87, 0.92, 0.91],
            "label-only": [0.9, 0.85, 0.83, 0.78, 0.88, 0.8, 0.86, 0.79, 0.86, 0.86]},
        "teacher_compute": {"precompute_forward_rows": 24_000, "online_forward_rows": 576_000, "ratio": 24.0,
                            "precompute_teacher_seconds": 41.0, "online_teacher_seconds": 996.0,
                            "saved_teacher_seconds": 955.0},
        "deploy": {
            "onnx": {"opset": 18, "max_abs_logit_diff": 2.4e-6, "fp32_file_bytes": 51_230, "fp32_weight_bytes": 47_600},
            "int8": {"file_bytes": 19_880, "weight_bytes": 11_900, "test_accuracy": 0.9031, "test_agreement": 0.9207,
                     "test_ece": 0.029, "method": "qat", "chosen_by": "val_accuracy", "fp32_val_accuracy": 0.9125,
                     "ptq_val_accuracy": 0.8950, "ptq_drop": 0.0175, "max_drop": 0.01, "qat_val_accuracy": 0.9080,
                     "qat_drop": 0.0045, "qat_epochs": 3},
            "teacher_file_bytes": 505_000, "student_file_bytes": 48_100,
            "target": {"description": "x86_64 CPU (2 threads), onnxruntime 1.22", "threads": 2},
            "latency": lat,
            "gpu": "GPU latency: not measured (no GPU on this machine)",
            "pareto_png": "deploy/pareto.png",
            "budget": {"latency_budget_ms": 0.1, "quality_target": 0.97, "chosen_trial": "a1b2_00003",
                       "reason": "smallest student with val accuracy ≥ 0.97 × ensemble and ONNX latency ≤ 0.1 ms"},
        },
        "store_bytes": 3_456_789,
        "wall_seconds": 312.4,
        "mlflow": {"tracking_uri": "http://127.0.0.1:5000", "experiment": "mnist1d", "parent_run_id": "9f2c3e",
                   "registered_model": {"name": "mnist1d-student", "version": "3"}},
    }


class Page(HTMLParser):
    """Rows per table id (in tbody), header texts per table id, warning items, every src/href, and
    the text of each row by table id."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows: dict[str, int] = {}
        self.headers: dict[str, list[str]] = {}
        self.row_text: dict[str, list[str]] = {}
        self.row_class: dict[str, list[str]] = {}
        self.warnings: list[str] = []
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.tags: list[str] = []
        self._table = self._section = None
        self._in_th = self._in_li = False
        self._warn_depth = 0
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        for k in ("src", "href", "data", "action", "poster"):
            if k in a:
                self.links.append((tag, k, a[k] or ""))
        if a.get("id") == "warnings":
            self._warn_depth = 1
        elif self._warn_depth and tag == "div":
            self._warn_depth += 1
        if tag == "table":
            self._table = a.get("id")
            if self._table:
                self.rows.setdefault(self._table, 0)
                self.headers.setdefault(self._table, [])
                self.row_text.setdefault(self._table, [])
                self.row_class.setdefault(self._table, [])
        elif tag == "tbody":
            self._section = "tbody"
        elif tag == "tr" and self._table and self._section == "tbody":
            self.rows[self._table] += 1
            self.row_class[self._table].append(a.get("class") or "")
            self._text = []
        elif tag == "th" and self._table:
            self._in_th, self._text = True, []
        elif tag == "li" and self._warn_depth:
            self._in_li, self._text = True, []

    def handle_endtag(self, tag):
        if tag == "div" and self._warn_depth:
            self._warn_depth -= 1
        if tag == "table":
            self._table = self._section = None
        elif tag == "th" and self._in_th:
            self.headers[self._table].append("".join(self._text).strip())
            self._in_th = False
        elif tag == "tr" and self._table and self._section == "tbody":
            self.row_text[self._table].append(" | ".join(t.strip() for t in self._text if t.strip()))
        elif tag == "li" and self._in_li:
            self.warnings.append("".join(self._text))
            self._in_li = False

    def handle_data(self, data):
        self._text.append(data)


def _parse(path: Path) -> tuple[str, Page]:
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    page.close()
    return text, page


def _need_chromium() -> str:
    exe = chromium()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    return exe


def test_page_sections_and_self_contained(tmp_path):
    run = tmp_path / "run"
    summary = _summary(run)
    path = write_page(summary, run)
    assert path == run / "report.html" and path.is_file()
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # the temp file was renamed
    text, page = _parse(path)

    assert "<title>kd-ops report: mnist1d &lt;demo&gt;</title>" in text  # escaped
    assert page.rows == {"models": 8, "sizes": 2, "deploy": 8, "trials": 8, "per-class": 3, "settings": 6,
                         "chain": 1, "compute": 2}
    assert page.warnings == WARNINGS  # one <li> each, text escaped (no tags injected)
    assert text.index('id="warnings"') < text.index('id="models"')  # at the top

    models = page.row_text["models"]
    assert [r.split(" | ")[0] for r in models] == [
        "teacher cnn-a", "teacher cnn-b", "teacher mlp-c", "teacher ensemble (uniform)", "TAKD assistant (width 32)",
        "KD student", "label-only student", "INT8 student"]
    assert page.headers["models"][:6] == ["model", "test accuracy", "95% interval", "vs ensemble", "agreement w/ ensemble",
                                          "calibration error (ECE)"]
    kd = models[5]
    assert "0.9050" in kd and f"{0.905 / 0.9405:.3f}" in kd and "10.6× fewer" in kd  # 126000 / 11900
    assert "48.1 kB" in kd and "10.5× smaller" in kd and "7.7× faster" in kd  # 505000/48100, 2.4/0.31
    assert "40.0× faster" in models[7] and "25.4× smaller" in models[7]  # INT8: 2.4/0.06, 505000/19880
    assert "—" in models[6]  # label-only: size and latency unknown

    deploy = page.row_text["deploy"]
    slow = [r for r in deploy if "INT8 not faster here" in r]
    assert len(slow) == 1 and slow[0].startswith("onnxruntime-int8 | 1 |")
    assert "opset <b>18</b>" in text and "2.40e-06" in text and "after 3 epoch(s)" in text
    assert ("chosen on the validation split. PTQ val accuracy <b>0.8950</b> (drop 0.0175, tolerance 0.0100); "
            "QAT val accuracy <b>0.9080</b>") in text and "Shipped INT8 test accuracy <b>0.9031</b>" in text
    assert "GPU latency: not measured" in text and "x86_64 CPU (2 threads)" in text

    trials, classes = page.row_text["trials"], page.row_class["trials"]
    scores = [float(re.search(r"\b0\.\d{4}\b", r).group()) for r in trials]  # first 4-decimal cell: val_accuracy
    assert scores == sorted(scores, reverse=True)
    assert classes.count("chosen") == 1 and "a1b2_00003" in trials[classes.index("chosen")]
    assert page.headers["trials"] == ["trial", "temperature", "alpha", "student width", "teacher weight cnn-a",
                                      "teacher weight cnn-b", "teacher weight mlp-c", "epochs", "val accuracy",
                                      "val agreement", "latency ms", "params"]
    assert "dkd(α=1, β=8)" in text and "Smallest student under the budget" in text
    assert "24.0×" in text and "955 s" in text  # compute saved

    # self-contained: images embedded as PNG data URIs, nothing fetched from anywhere
    imgs = [v for tag, k, v in page.links if tag == "img"]
    assert len(imgs) == 3 and all(v.startswith("data:image/png;base64,") for v in imgs)
    assert all(v.startswith("data:") for _, _, v in page.links), page.links
    assert not re.search(r"url\(|@import", text) and "script" not in page.tags and "link" not in page.tags


def test_page_in_headless_chromium(tmp_path):
    _need_chromium()
    run = tmp_path / "run"
    path = write_page(_summary(run), run)
    shot = tmp_path / "report.png"
    out = render(path, shot, width=1400, height=3000)
    assert out["images_total"] >= 3 and out["images_decoded"] == out["images_total"], out["images_total"]
    for table_id in ("models", "deploy", "trials", "compute", "warnings"):
        assert f'id="{table_id}"' in out["dom"]
    assert "INT8 not faster here" in out["dom"]
    assert not_blank(shot) > 0.02
    keep = os.environ.get("KD_REPORT_SCREENSHOT")  # e.g. to look at it: KD_REPORT_SCREENSHOT=/tmp/report.png
    if keep:
        shutil.copyfile(shot, keep)
    print(f"screenshot: {shot}")


def test_lm_page(tmp_path):
    s = {"name": "tiny-lm", "task": "lm",
         "teachers": [{"name": "smol-135m", "params": 134_515_008, "val_perplexity": 18.234}],
         "teacher_val_perplexity": 18.234,
         "student": {"params": 6_400_000, "val_perplexity": 31.52, "test_perplexity": 32.07, "top1_agreement": 0.4312,
                     "config": {"temperature": 2.0, "alpha": 0.5, "teacher_weights": [1.0], "divergence": "kl",
                                "tail": "topk", "student_kwargs": {"n_layer": 2}}},
         "label_only_student": {"params": 6_400_000, "val_perplexity": 40.1, "test_perplexity": 41.0,
                                "top1_agreement": 0.3504},
         "tune_trials": [{"trial_id": f"t{i}", "temperature": 1.0 + i, "alpha": 0.5, "epochs": 1,
                          "val_perplexity": v} for i, v in enumerate([35.0, 31.5, 33.2])],
         "deploy": {"onnx_error": "the exporter cannot take <this graph>", "gpu": "GPU latency: not measured"},
         "store_bytes_per_token": 412.5, "store_bytes": 9_900_000, "wall_seconds": 60.0,
         "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "lm", "parent_run_id": "abc",
                    "registered_model": {"name": "lm-student", "version": 1}}}
    out = tmp_path / "pages" / "lm.html"
    assert write_page(s, tmp_path, out) == out
    text, page = _parse(out)
    assert page.headers["models"][:4] == ["model", "val perplexity", "test perplexity", "top-1 agreement w/ teacher"]
    assert "test accuracy" not in page.headers["models"]
    assert page.rows["models"] == 3
    kd = page.row_text["models"][1]
    assert kd.startswith("KD student") and "31.520" in kd and "32.070" in kd and "0.4312" in kd and "21.0× fewer" in kd
    assert [r.split(" | ")[0].split()[0] for r in page.row_text["trials"]] == ["t1", "t2", "t0"]  # lower is better
    assert "412.5 bytes/token" in text and "divergence" in text
    assert "ONNX export skipped: the exporter cannot take &lt;this graph&gt;" in text
    assert "deploy" not in page.rows and "compute" not in page.rows and 'id="warnings"' not in text


def test_minimal_summary(tmp_path):
    """Only a name: every optional section is left out, nothing crashes."""
    path = write_page({"name": "bare", "deploy": {"pareto_png": "deploy/missing.png", "latency": []}}, tmp_path)
    text, page = _parse(path)
    assert "kd-ops report: bare" in text and page.links == [] and set(page.rows) <= {"models"}


def test_write_for_a_run_dir(tmp_path):
    """`write` (what the pipeline and `kd report` call) takes the run's --out as a string or Loc."""
    from workflows.report_page import write

    run = tmp_path / "run"
    page = write(_summary(run), str(run))
    assert page.local and Path(page.path) == run / "report.html"
    assert 'id="models"' in (run / "report.html").read_text(encoding="utf-8")
    s = _summary(run) | {"deploy": {"pareto_png": "../outside.png"}}
    (tmp_path / "outside.png").write_bytes((run / "deploy" / "pareto.png").read_bytes())
    assert "Pareto front" not in _parse(write_page(s, run))[0]  # only paths inside the run directory
