"""One self-contained HTML page for a finished run (`kd report RUN`), built from its summary.json.

Pure HTML and inline CSS, no scripts and no external resources: every chart is drawn with
matplotlib into an in-memory PNG and embedded as a data: URI, so the file opens offline and can be
mailed or attached as it is. Every optional summary key is read with `.get`: a section whose data is
absent is left out; a cell whose value is unknown shows "—".
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from kd_ops.fsio import Loc
from workflows.summary_table import interval

DASH = "—"
LATENCY_RUNTIMES = ("teacher-pytorch-fp32", "pytorch-fp32", "onnxruntime-fp32", "onnxruntime-int8")
REFERENCE_RUNTIME = "pytorch-fp32"  # the deploy latency table's ratios are to this, at the same batch

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
  color:#1f2328;margin:24px auto;max-width:1320px;padding:0 20px}
h1{font-size:23px;margin:0 0 6px}
h2{font-size:17px;margin:30px 0 8px;padding-bottom:4px;border-bottom:1px solid #d0d7de}
h3{font-size:15px;margin:18px 0 6px}
p{margin:6px 0}
.meta{color:#59636e}
.meta b{color:#1f2328;font-weight:600}
table{border-collapse:collapse;margin:8px 0 4px}
th,td{border:1px solid #d0d7de;padding:4px 9px;vertical-align:top}
th{background:#f6f8fa;text-align:left;font-weight:600}
th.n{text-align:right}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td:first-child{white-space:nowrap}
.scroll{overflow-x:auto;max-width:100%}
tr.group td{background:#fbfcfd}
tr.chosen td{background:#fff8c5;font-weight:600}
tr.slow td.note{color:#9a6700;font-weight:600}
#warnings{background:#fff8e6;border:1px solid #d4a72c;border-left:6px solid #d4a72c;border-radius:4px;
  padding:8px 16px;margin:14px 0}
#warnings h2{border:0;margin:4px 0;padding:0;color:#7d4e00}
#warnings ul{margin:4px 0 6px;padding-left:22px}
.note{color:#59636e;font-size:13px}
.error{color:#cf222e}
img{max-width:100%;height:auto;border:1px solid #eaeef2;margin:6px 0}
code{font:13px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f6f8fa;padding:1px 4px;border-radius:3px}
footer{margin:36px 0 12px;padding-top:8px;border-top:1px solid #d0d7de;color:#59636e;font-size:13px}
"""


# -- entry points ---------------------------------------------------------------------------------

def write_page(summary: dict[str, Any], run_dir: Path, path: Path | None = None) -> Path:
    """Write the run's page to `path` (default `run_dir/report.html`) atomically and return its path."""
    run_dir = Path(run_dir)
    path = Path(path) if path is not None else run_dir / "report.html"
    text = render_page(summary, run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a report is meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write(summary: dict[str, Any], out) -> Loc:
    """The page of a run whose --out is a local path or a URI (s3://…): <out>/report.html."""
    out = Loc.of(out)
    if out.local:
        return Loc.of(write_page(summary, Path(out.path)))
    (out / "report.html").write_text(render_page(summary, out))  # a Loc object is written whole
    return out / "report.html"


def write_run_page(run_dir: Path, path: Path | None = None) -> Path:
    """`write_page` for a finished run directory: reads its summary.json."""
    run_dir = Path(run_dir)
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise FileNotFoundError(f"{summary_file} not found: the run did not finish (or the directory is wrong)")
    return write_page(json.loads(summary_file.read_text()), run_dir, path)


def render_page(s: dict[str, Any], run_dir: Path) -> str:
    """The page's HTML text."""
    deploy = s.get("deploy") if isinstance(s.get("deploy"), dict) else {}
    name = s.get("name", "(unnamed run)")
    parts = [_header(s), _warnings(s), _models(s, deploy), _deployment(deploy), _budget(deploy),
             _pareto(deploy, run_dir), _trials(s, deploy), _per_class(s), _settings(s),
             _compute(s), _footer(s)]
    body = "\n".join(p for p in parts if p)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>kd-ops report: {_e(name)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


# -- formatting -----------------------------------------------------------------------------------

def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _list(v: Any) -> list:
    """v if it is a list (or tuple), else [] (missing, None, or the wrong type)."""
    return list(v) if isinstance(v, (list, tuple)) else []


def _real(v: Any) -> float | None:
    """v as a finite float, or None (missing, None, NaN, not a number)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _f(v: Any, spec: str = ".4f") -> str:
    r = _real(v)
    return DASH if r is None else format(r, spec)


def _int(v: Any) -> str:
    r = _real(v)
    return DASH if r is None else f"{int(round(r)):,}"


def _bytes(v: Any) -> str:
    r = _real(v)
    if r is None:
        return DASH
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(r) >= size:
            return f"{r / size:.1f} {unit}" if r / size < 100 else f"{r / size:.0f} {unit}"
    return f"{int(r)} B"


def _ratio(num: Any, den: Any) -> float | None:
    a, b = _real(num), _real(den)
    return None if a is None or b is None or b == 0 else a / b


def _times(r: float | None, less: str, more: str) -> str:
    """A ratio as `10.6× fewer` (r ≥ 1) or `2.0× more` (r < 1)."""
    if r is None or r <= 0:
        return DASH
    return f"{r:.1f}× {less}" if r >= 1 else f"{1 / r:.1f}× {more}"


def _cell(text: str, numeric: bool = True, cls: str = "") -> str:
    classes = " ".join(c for c in ("n" if numeric else "", cls) if c)
    return f"<td class=\"{classes}\">{text}</td>" if classes else f"<td>{text}</td>"


def _table(table_id: str | None, headers: Iterable[tuple[str, bool]], rows: Iterable[str], caption: str = "") -> str:
    """headers: (text, numeric); rows: ready `<tr>…</tr>` strings."""
    ident = f' id="{_e(table_id)}"' if table_id else ""
    head = "".join(f'<th class="n">{_e(h)}</th>' if n else f"<th>{_e(h)}</th>" for h, n in headers)
    cap = f"<caption class=\"note\" style=\"caption-side:bottom;text-align:left\">{caption}</caption>" if caption else ""
    return (f'<div class="scroll"><table{ident}>{cap}<thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows)
            + "\n</tbody></table></div>")


def _tr(cells: Iterable[str], cls: str = "") -> str:
    return (f'<tr class="{cls}">' if cls else "<tr>") + "".join(cells) + "</tr>"


def _section(title: str, inner: str) -> str:
    return f"<section>\n<h2>{_e(title)}</h2>\n{inner}\n</section>"


# -- images ---------------------------------------------------------------------------------------

def _figure(width: float, height: float):
    # matplotlib's object API renders through Agg without touching pyplot's global backend/state
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _fig_img(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return f'<img alt="{_e(alt)}" src="{_png_uri(buf.getvalue())}">'


# -- sections -------------------------------------------------------------------------------------

def _header(s: dict[str, Any]) -> str:
    m = s.get("mlflow") if isinstance(s.get("mlflow"), dict) else {}
    reg = m.get("registered_model") if isinstance(m.get("registered_model"), dict) else {}
    meta = [f"task <b>{_e(s.get('task') or 'classification')}</b>"]
    if _real(s.get("wall_seconds")) is not None:
        meta.append(f"wall <b>{_f(s['wall_seconds'], '.0f')} s</b>")
    if m.get("parent_run_id"):
        meta.append(f"MLflow parent run <code>{_e(m['parent_run_id'])}</code>")
    if reg.get("name"):
        version = f" v{_e(reg['version'])}" if reg.get("version") is not None else ""
        meta.append(f"registered model <b>{_e(reg['name'])}</b>{version}")
    lines = [f"<h1>kd-ops report: {_e(s.get('name', '(unnamed run)'))}</h1>", f'<p class="meta">{" · ".join(meta)}</p>']
    if m.get("tracking_uri") or m.get("experiment"):
        lines.append(f'<p class="meta">MLflow tracking <code>{_e(m.get("tracking_uri", DASH))}</code>'
                     f' · experiment <b>{_e(m.get("experiment", DASH))}</b></p>')
    return "<header>\n" + "\n".join(lines) + "\n</header>"


def _warnings(s: dict[str, Any]) -> str:
    warnings = [s["warnings"]] if isinstance(s.get("warnings"), str) else _list(s.get("warnings"))
    if not warnings:
        return ""
    items = "\n".join(f"<li>{_e(w)}</li>" for w in warnings)
    return f'<div id="warnings" role="alert">\n<h2>Warnings ({len(warnings)})</h2>\n<ul>\n{items}\n</ul>\n</div>'


def _latency(deploy: dict[str, Any], runtime: str, batch: int) -> dict[str, Any] | None:
    for row in _list(deploy.get("latency")):
        if isinstance(row, dict) and row.get("runtime") == runtime and row.get("batch") == batch:
            return row
    return None


def _models(s: dict[str, Any], deploy: dict[str, Any]) -> str:
    lm = s.get("task") == "lm"
    teachers = [t for t in _list(s.get("teachers")) if isinstance(t, dict)]
    ref_params = teachers[0].get("params") if teachers else None
    ens = s.get("ensemble_test_accuracy")
    onnx = deploy.get("onnx") if isinstance(deploy.get("onnx"), dict) else {}
    int8 = deploy.get("int8") if isinstance(deploy.get("int8"), dict) else None
    teacher_bytes = deploy.get("teacher_file_bytes")
    teacher_ms = (_latency(deploy, "teacher-pytorch-fp32", 1) or {}).get("median_ms")
    student = s.get("student") if isinstance(s.get("student"), dict) else None

    # (label, metrics, params, file bytes, latency ms, is teacher, row class)
    rows: list[tuple[str, dict, Any, Any, Any, bool, str]] = []
    for i, t in enumerate(teachers):  # the deploy step sizes and times the first (reference) teacher
        rows.append((f"teacher {t.get('name', '?')}", t, t.get("params"), teacher_bytes if i == 0 else None,
                     teacher_ms if i == 0 else None, True, ""))
    if not lm and ens is not None:
        rows.append(("teacher ensemble (uniform)", {"test_accuracy": ens, "test_ece": s.get("ensemble_test_ece"),
                                                    "test_accuracy_ci95": s.get("ensemble_test_accuracy_ci95")},
                     None, None, None, True, "group"))
    for r in _list(s.get("chain")):
        if isinstance(r, dict):
            rows.append((str(r.get("name", "chain stage")), r, r.get("params"), None, None, False, ""))
    if student:
        fbytes = deploy.get("student_file_bytes", onnx.get("fp32_file_bytes"))  # weights file, like the teacher's
        rows.append(("KD student", student, student.get("params"), fbytes,
                     (_latency(deploy, "pytorch-fp32", 1) or {}).get("median_ms"), False, ""))
    lo = s.get("label_only_student")
    if isinstance(lo, dict):
        rows.append(("label-only student", lo, lo.get("params"), None, None, False, ""))
    if int8:
        rows.append(("INT8 student", int8, (student or {}).get("params"), int8.get("file_bytes"),
                     (_latency(deploy, "onnxruntime-int8", 1) or {}).get("median_ms"), False, ""))

    if lm:
        quality = [("val perplexity", True), ("test perplexity", True), ("top-1 agreement w/ teacher", True)]
    else:
        quality = [("test accuracy", True), ("95% interval", True), ("vs ensemble", True), ("agreement w/ ensemble", True),
                   ("calibration error (ECE)", True)]
    headers = [("model", False), *quality, ("params", True), ("params ×", True), ("file size", True),
               ("file size ×", True), ("latency batch 1 (ms)", True), ("latency × vs teacher", True)]
    out = []
    for label, r, params, fbytes, ms, teacher, cls in rows:
        if lm:
            q = [_cell(_f(r.get("val_perplexity"), ".3f")), _cell(_f(r.get("test_perplexity"), ".3f")),
                 _cell(_f(r.get("top1_agreement", r.get("test_agreement"))))]
        else:
            q = [_cell(_f(r.get("test_accuracy"))), _cell(_e(interval(r.get("test_accuracy_ci95")))),
                 _cell(_f(_ratio(r.get("test_accuracy"), ens), ".3f")),
                 _cell(_f(r.get("test_agreement"))), _cell(_f(r.get("test_ece")))]
        params_x = "" if teacher else _times(_ratio(ref_params, params), "fewer", "more")
        bytes_x = "" if teacher else (_times(_ratio(teacher_bytes, fbytes), "smaller", "larger") if fbytes is not None else DASH)
        ms_x = "" if teacher else (_times(_ratio(teacher_ms, ms), "faster", "slower") if ms is not None else DASH)
        out.append(_tr([_cell(_e(label), numeric=False), *q, _cell(_int(params)), _cell(params_x),
                        _cell(_bytes(fbytes)), _cell(bytes_x), _cell(_f(ms, ".3f")), _cell(ms_x)], cls))
    ref = teachers[0].get("name", "?") if teachers else "?"
    caption = (f"Ratios (×) are to teacher <b>{_e(ref)}</b>: its params, its file size and its latency. "
               "Latency is the batch-1 median on the deploy target: teacher and KD student in PyTorch fp32, "
               "the INT8 student in ONNX Runtime. File size: the teacher's and KD student's weights files, "
               "the INT8 student's ONNX file. 95% interval: the Wilson interval of the test accuracy on the "
               "test split's rows.")
    title = "Models (LM: perplexity, lower is better)" if lm else "Models"
    return _section(title, _table("models", headers, out, caption))


def _deployment(deploy: dict[str, Any]) -> str:
    if not deploy:
        return ""
    parts = []
    onnx = deploy.get("onnx") if isinstance(deploy.get("onnx"), dict) else None
    int8 = deploy.get("int8") if isinstance(deploy.get("int8"), dict) else None
    if deploy.get("onnx_error"):
        parts.append(f'<p class="error">ONNX export skipped: {_e(deploy["onnx_error"])}</p>')
    if onnx:
        parts.append(f"<p>ONNX export: opset <b>{_e(onnx.get('opset', DASH))}</b>, max |Δlogit| vs PyTorch "
                     f"<b>{_f(onnx.get('max_abs_logit_diff'), '.2e')}</b>.</p>")
    if int8:
        method = str(int8.get("method") or "ptq")
        recipe = str(int8.get("recipe") or "static")
        how = (f"quantization-aware distillation, {recipe}" if method == "qat"
               else f"post-training {recipe} quantization")
        # chosen on validation (`chosen_by`); the test split scores only the model that ships
        key = str(int8.get("chosen_by") or "val_accuracy")
        shipped = key.replace("val_", "test_")
        what, spec = key.replace("_", " "), (".3f" if "perplexity" in key else ".4f")
        text = (f"INT8: <b>{_e(method.upper())}</b> ({how}), chosen on the validation split. "
                f"PTQ {what} <b>{_f(int8.get('ptq_' + key), spec)}</b>")
        if _real(int8.get("ptq_drop")) is not None:
            text += f" (drop {_f(int8['ptq_drop'])}, tolerance {_f(int8.get('max_drop'))})"
        if int8.get("qat_" + key) is not None:
            text += (f"; QAT {what} <b>{_f(int8.get('qat_' + key), spec)}</b> after "
                     f"{_e(int8.get('qat_epochs') if int8.get('qat_epochs') is not None else '?')} epoch(s)")
        text += f". Shipped INT8 {shipped.replace('_', ' ')} <b>{_f(int8.get(shipped), spec)}</b>."
        parts.append(f"<p>{text}</p>")
    elif deploy.get("int8_error"):
        parts.append(f'<p class="error">INT8 quantization failed: {_e(deploy["int8_error"])}</p>')
    tried = int8 or (deploy.get("int8_not_shipped") if isinstance(deploy.get("int8_not_shipped"), dict) else None)
    recipes = [r for r in _list((tried or {}).get("recipes")) if isinstance(r, dict)]
    if recipes:
        key = str(tried.get("chosen_by") or "val_accuracy")
        spec = ".3f" if "perplexity" in key else ".4f"
        if not int8:
            parts.append(f'<p class="error">No INT8 recipe within the tolerance {_f(tried.get("max_drop"))} on '
                         f"validation: the student ships in fp32 and no INT8 file is written.</p>")
        rows = [_tr([_cell(_e(f"{r.get('recipe')} {'+ QAT' if r.get('qat') else 'PTQ'}"), numeric=False),
                     _cell(_f(r.get(key), spec)), _cell(_f(r.get("drop"))), _cell(_int(r.get("weight_bytes"))),
                     _cell("shipped" if r.get("shipped") else "", numeric=False)], "chosen" if r.get("shipped") else "")
                for r in recipes]
        parts.append(_table("int8-recipes", [("INT8 recipe", False), (key.replace("_", " "), True), ("drop", True),
                                             ("weight bytes", True), ("", False)], rows,
                            "every INT8 recipe tried, scored on the validation split"))
    if onnx or int8:
        size_rows = []
        for label, fp, q in (("weights", (onnx or {}).get("fp32_weight_bytes"), (int8 or {}).get("weight_bytes")),
                             ("file", (onnx or {}).get("fp32_file_bytes"), (int8 or {}).get("file_bytes"))):
            size_rows.append(_tr([_cell(label, numeric=False), _cell(_bytes(fp)), _cell(_int(fp)),
                                  _cell(_bytes(q)), _cell(_int(q)), _cell(_times(_ratio(fp, q), "smaller", "larger"))]))
        parts.append(_table("sizes", [("student", False), ("fp32", True), ("fp32 bytes", True), ("int8", True),
                                      ("int8 bytes", True), ("int8 vs fp32", True)], size_rows))
    target = deploy.get("target") if isinstance(deploy.get("target"), dict) else None
    if target:
        threads = f" · {_e(target['threads'])} thread(s)" if target.get("threads") is not None else ""
        parts.append(f"<p>Target: <b>{_e(target.get('description', DASH))}</b>{threads}</p>")
    lat = [r for r in _list(deploy.get("latency")) if isinstance(r, dict)]
    if lat:
        order = {r: i for i, r in enumerate(LATENCY_RUNTIMES)}
        lat.sort(key=lambda r: (r.get("batch") if isinstance(r.get("batch"), int) else 0,
                                order.get(r.get("runtime"), len(order)), str(r.get("runtime"))))
        rows = []
        for r in lat:
            ref = _latency(deploy, REFERENCE_RUNTIME, r.get("batch")) or {}
            note, cls = "", ""
            if r.get("runtime") == "onnxruntime-int8":
                fp = _latency(deploy, "onnxruntime-fp32", r.get("batch")) or {}
                a, b = _real(r.get("median_ms")), _real(fp.get("median_ms"))
                if a is not None and b is not None:
                    if a >= b:
                        note, cls = f"INT8 not faster here ({a:.3f} ms vs {b:.3f} ms fp32)", "slow"
                    else:
                        note = f"INT8 {b / a:.2f}× faster than ONNX Runtime fp32"
            rows.append(_tr([_cell(_e(r.get("runtime", "?")), numeric=False), _cell(_int(r.get("batch"))),
                             _cell(_f(r.get("median_ms"), ".3f")), _cell(_f(r.get("p95_ms"), ".3f")),
                             _cell(_f(r.get("rss_added_mb"), ".1f")),
                             _cell(_f(_ratio(r.get("median_ms"), ref.get("median_ms")), ".2f")),
                             _cell(_f(_ratio(r.get("p95_ms"), ref.get("p95_ms")), ".2f")),
                             _cell(_f(_ratio(r.get("rss_added_mb"), ref.get("rss_added_mb")), ".2f")),
                             _cell(_int(r.get("runs"))), _cell(_e(note), numeric=False, cls="note")], cls))
        parts.append("<h3>Latency</h3>")
        parts.append(_table("deploy", [("runtime", False), ("batch", True), ("median ms", True), ("p95 ms", True),
                                       ("RSS added MB", True), (f"median ÷ {REFERENCE_RUNTIME}", True),
                                       (f"p95 ÷ {REFERENCE_RUNTIME}", True), (f"RSS ÷ {REFERENCE_RUNTIME}", True),
                                       ("runs", True), ("note", False)], rows,
                            f"Ratios are to {REFERENCE_RUNTIME} (the student in PyTorch) at the same batch size; "
                            "below 1 is faster / smaller."))
    if isinstance(deploy.get("gpu"), str) and deploy["gpu"]:
        parts.append(f"<p>{_e(deploy['gpu'])}</p>")
    return _section("Deployment", "\n".join(parts)) if parts else ""


def _budget(deploy: dict[str, Any]) -> str:
    b = deploy.get("budget")
    if not isinstance(b, dict):
        return ""
    lines = [f"<p>Budget: latency <b>{_f(b.get('latency_budget_ms'), '.3g')} ms</b>, quality target "
             f"<b>{_f(b.get('quality_target'), '.4g')}</b>.</p>"]
    if b.get("chosen_trial") is not None:
        lines.append(f"<p>Chosen trial: <code>{_e(b['chosen_trial'])}</code></p>")
    else:
        lines.append("<p>No trial met the budget.</p>")
    if b.get("reason"):
        lines.append(f"<p>Why: {_e(b['reason'])}</p>")
    return _section("Smallest student under the budget", "\n".join(lines))


def _pareto(deploy: dict[str, Any], run_dir: Path) -> str:
    rel = deploy.get("pareto_png")
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) \
            or any(part in ("", ".", "..") for part in rel.replace("\\", "/").split("/")):
        return ""  # only a plain relative path inside the run directory is read
    p = run_dir / rel
    try:
        data = p.read_bytes() if p.is_file() else b""
    except (OSError, ValueError):
        data = b""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ""
    return _section("Pareto front", f'<img alt="Pareto front: quality vs latency" src="{_png_uri(data)}">')


def _score_key(trials: list[dict]) -> tuple[str | None, bool]:
    """(the trials' score key, higher is better)."""
    for key, higher in (("val_accuracy", True), ("val_perplexity", False)):
        if any(_real(t.get(key)) is not None for t in trials):
            return key, higher
    return None, True


def _trials(s: dict[str, Any], deploy: dict[str, Any]) -> str:
    trials = [t for t in _list(s.get("tune_trials")) if isinstance(t, dict)]
    if not trials:
        return ""
    key, higher = _score_key(trials)
    chosen = s.get("chosen_trial")  # recorded by the run: the budget's pick, else Tune's best
    weights = list(dict.fromkeys(k for t in trials for k in t if str(k).startswith("teacher_weight.")))
    cols: list[tuple[str, str]] = [("trial_id", ".0f"), ("temperature", ".3g"), ("alpha", ".3g"), ("student_width", "d")]
    cols += [(w, ".3f") for w in weights] + [("epochs", "d")]
    if key:
        cols.append((key, ".4f" if higher else ".3f"))
    for extra, spec in (("val_agreement", ".4f"), ("latency_ms", ".3f"), ("params", "d")):
        if any(t.get(extra) is not None for t in trials):
            cols.append((extra, spec))

    def sort_key(t):
        v = _real(t.get(key)) if key else None
        return (v is None, -(v or 0) if higher else (v or 0))

    rows = []
    for t in sorted(trials, key=sort_key):
        cells = []
        for col, spec in cols:
            v = t.get(col)
            if col == "trial_id" or not isinstance(v, (int, float)) or isinstance(v, bool):
                cells.append(_cell(_e(v) if v is not None else DASH, numeric=col != "trial_id" and v is not None))
            elif spec == "d":
                cells.append(_cell(_int(v)))
            else:
                cells.append(_cell(_f(v, spec)))
        is_chosen = chosen is not None and t.get("trial_id") == chosen
        if is_chosen:
            cells[0] = _cell(_e(t.get("trial_id")) + " ★ chosen", numeric=False)
        rows.append(_tr(cells, "chosen" if is_chosen else ""))
    failed = _list(s.get("tune_failed_trials"))
    caption = (f"{len(trials)} trial(s) sorted by {_e(key or 'score')} ({'higher' if higher else 'lower'} is better)"
               + (f"; {len(failed)} failed" if failed else "") + "; the chosen trial is highlighted.")
    inner = _table("trials", [(_trial_header(c), c != "trial_id") for c, _ in cols], rows, caption)
    if failed:
        items = "".join(f"<li><code>{_e(f.get('trial_id'))}</code>: {_e(f.get('error', ''))}</li>"
                        for f in failed if isinstance(f, dict))
        inner += f'\n<p class="note">Failed trials:</p><ul class="note">{items}</ul>'
    inner += "\n" + _trials_figure(trials, key, chosen)
    return _section("Tune trials", inner)


def _trial_header(key: str) -> str:
    """`teacher_weight.cnn-a` → `teacher weight cnn-a`, `val_accuracy` → `val accuracy` (wraps in a narrow column)."""
    if key == "trial_id":
        return "trial"
    return key.replace("teacher_weight.", "teacher weight ", 1).replace("_", " ")


def _trials_figure(trials: list[dict], key: str | None, chosen: Any) -> str:
    if not key:
        return ""
    dims = [d for d in ("temperature", "alpha", "student_width")
            if any(_real(t.get(d)) is not None and _real(t.get(key)) is not None for t in trials)]
    if not dims:
        return ""
    fig = _figure(3.6 * len(dims), 3.0)
    axes = fig.subplots(1, len(dims), squeeze=False)[0]
    for ax, d in zip(axes, dims):
        pts = [(t[d], t[key], t.get("trial_id") == chosen) for t in trials
               if _real(t.get(d)) is not None and _real(t.get(key)) is not None]
        ax.scatter([p[0] for p in pts if not p[2]], [p[1] for p in pts if not p[2]], s=28, color="#4c72b0",
                   alpha=0.85, label="trial")
        sel = [p for p in pts if p[2]]
        if sel:
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], s=90, marker="*", color="#d62728", zorder=3,
                       label="chosen")
        ax.set_xlabel(d.replace("_", " "))
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
        if d == "student_width":  # the widths tried, as ticks
            ax.set_xticks(sorted({p[0] for p in pts}))
    if chosen is not None:
        axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"tune: {key.replace('_', ' ')} per trial", fontsize=10)
    return _fig_img(fig, f"tune trials: {key} vs " + ", ".join(dims))


def _per_class(s: dict[str, Any]) -> str:
    pca = s.get("per_class_accuracy")
    if not isinstance(pca, dict) or not pca:
        return ""
    series = {str(k): [(_real(v) if _real(v) is not None else float("nan")) for v in vals]
              for k, vals in pca.items() if isinstance(vals, (list, tuple)) and vals}
    if not series:
        return ""
    n = max(len(v) for v in series.values())
    fig = _figure(min(13.0, 3.0 + 0.9 * n), 3.4)
    ax = fig.subplots()
    k = len(series)
    width = 0.8 / k
    for i, (label, vals) in enumerate(series.items()):
        ax.bar([c - 0.4 + width * (i + 0.5) for c in range(len(vals))], vals, width=width, label=label)
    ax.set_xticks(range(n))
    ax.set_xlabel("class")
    ax.set_ylabel("test accuracy")
    finite = [v for vals in series.values() for v in vals if math.isfinite(v)]
    ax.set_ylim(max(0.0, min(finite, default=0.0) - 0.1), 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(k, 4), loc="lower right")
    img = _fig_img(fig, "per-class test accuracy")
    headers = [("model", False)] + [(str(c), True) for c in range(n)] + [("mean", True), ("worst", True)]
    rows = []
    for label, vals in series.items():
        ok = [v for v in vals if math.isfinite(v)]
        rows.append(_tr([_cell(_e(label), numeric=False)] + [_cell(_f(v, ".3f")) for v in vals]
                        + [_cell(DASH)] * (n - len(vals))
                        + [_cell(_f(sum(ok) / len(ok) if ok else None, ".3f")), _cell(_f(min(ok) if ok else None, ".3f"))]))
    return _section("Per-class accuracy", img + "\n" + _table("per-class", headers, rows))


def _method_text(m: dict[str, Any]) -> str:
    try:
        from workflows.summary_table import _method

        return _method(m)
    except (KeyError, TypeError, ValueError, ImportError):
        return ""


def _settings(s: dict[str, Any]) -> str:
    student = s.get("student") if isinstance(s.get("student"), dict) else {}
    c = student.get("config") if isinstance(student.get("config"), dict) else {}
    chain = [r for r in _list(s.get("chain")) if isinstance(r, dict)]
    if not c and not chain:
        return ""
    parts = []
    if c:
        rows = []
        names = _list(c.get("teachers")) or [t.get("name") for t in _list(s.get("teachers")) if isinstance(t, dict)]
        for k in ("temperature", "alpha", "divergence", "tail"):
            if k in c:
                rows.append((k, _f(c[k], ".4g") if _real(c[k]) is not None else _e(c[k])))
        tw = c.get("teacher_weights")
        if isinstance(tw, (list, tuple)):
            shown = ", ".join(f"{_e(n)}={_f(w, '.3f')}" if n is not None else _f(w, ".3f")
                              for n, w in zip(list(names) + [None] * len(tw), tw))
            rows.append(("teacher_weights", shown))
        elif tw is not None:
            rows.append(("teacher_weights", _e(tw)))
        if "student_kwargs" in c:
            rows.append(("student_kwargs", f"<code>{_e(json.dumps(c['student_kwargs'], default=str))}</code>"))
        if c.get("teachers"):
            rows.append(("teachers", _e(", ".join(map(str, _list(c["teachers"]))) or c["teachers"])))
        m = c.get("method")
        if isinstance(m, dict):
            text = _method_text(m)
            rows.append(("method", (f"<b>{_e(text)}</b><br>" if text else "")
                         + "; ".join(f"{_e(k)}={_e(v)}" for k, v in m.items())))
        shown_keys = {"temperature", "alpha", "divergence", "tail", "teacher_weights", "student_kwargs", "teachers", "method"}
        for k, v in c.items():
            if k not in shown_keys:
                rows.append((str(k), _e(json.dumps(v, default=str)) if not isinstance(v, str) else _e(v)))
        parts.append("<h3>Final student</h3>")
        parts.append(_table("settings", [("setting", False), ("value", False)],
                            [_tr([_cell(_e(k), numeric=False), _cell(v, numeric=False)]) for k, v in rows]))
    if chain:
        metric_cols = [k for k in ("test_accuracy", "test_agreement", "val_perplexity", "test_perplexity", "top1_agreement")
                       if any(k in r for r in chain)]
        rows = [_tr([_cell(_e(i), numeric=True), _cell(_e(r.get("name", "?")), numeric=False), _cell(_int(r.get("params")))]
                    + [_cell(_f(r.get(k), ".4f")) for k in metric_cols]) for i, r in enumerate(chain, 1)]
        parts.append("<h3>Chain (training order; the student distils from the last)</h3>")
        parts.append(_table("chain", [("#", True), ("stage", False), ("params", True)] + [(k, True) for k in metric_cols], rows))
    return _section("Chain and method settings", "\n".join(parts))


def _compute(s: dict[str, Any]) -> str:
    tc = s.get("teacher_compute")
    if not isinstance(tc, dict) or not tc:
        return ""
    pre_rows, on_rows = tc.get("precompute_forward_rows"), tc.get("online_forward_rows")
    pre_s, on_s, saved = tc.get("precompute_teacher_seconds"), tc.get("online_teacher_seconds"), tc.get("saved_teacher_seconds")
    ratio = _real(tc.get("ratio"))
    if ratio is None:
        ratio = _ratio(on_rows, pre_rows)
    text = [f"Precomputing soft labels once ran the teachers over <b>{_int(pre_rows)}</b> rows; distilling online "
            f"(teachers in every epoch of every trial) would have run them over <b>{_int(on_rows)}</b> rows"
            + (f", <b>{ratio:.1f}×</b> as many." if ratio is not None else ".")]
    if _real(saved) is not None:
        text.append(f"That saved about <b>{_f(saved, ',.0f')} s</b> of teacher compute "
                    f"({_f(pre_s, ',.1f')} s spent instead of {_f(on_s, ',.1f')} s).")
    rows = [_tr([_cell("precompute (this run)", numeric=False), _cell(_int(pre_rows)), _cell(_f(pre_s, ",.1f"))]),
            _tr([_cell("online distillation (estimate)", numeric=False), _cell(_int(on_rows)), _cell(_f(on_s, ",.1f"))])]
    return _section("Teacher compute saved", "<p>" + " ".join(text) + "</p>\n"
                    + _table("compute", [("teacher forward passes", False), ("rows", True), ("teacher seconds", True)], rows))


def _footer(s: dict[str, Any]) -> str:
    bits = []
    if _real(s.get("store_bytes")) is not None:
        bits.append(f"soft-label store {_bytes(s['store_bytes'])} ({_int(s['store_bytes'])} bytes)")
    if _real(s.get("store_bytes_per_token")) is not None:
        bits.append(f"store {_f(s['store_bytes_per_token'], '.1f')} bytes/token")
    failed = _list(s.get("tune_failed_trials"))
    if s.get("tune_trials") or failed:
        bits.append(f"tune {len(_list(s.get('tune_trials')))} trials ok, {len(failed)} failed")
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    bits.append(f"generated {now} by kd-ops")
    return f"<footer>{' · '.join(bits)}</footer>"
