"""The end-of-run summary table (rich)."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_summary(s: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    if s.get("task") == "lm":
        return _print_lm(s, console)
    t = Table(title=f"kd-ops run: {s['name']}")
    t.add_column("model", min_width=18)
    for col in ("params", "test acc", "95% interval", "× ens.", "agreement\nw/ ens."):  # rich crops "w/ ens." on one line
        t.add_column(col, justify="right")
    ens = s["ensemble_test_accuracy"]
    for row in s["teachers"]:
        t.add_row(f"teacher {row['name']}", f"{row['params']:,}", f"{row['test_accuracy']:.4f}",
                  interval(row.get("test_accuracy_ci95")), f"{row['test_accuracy'] / ens:.3f}", "")
    t.add_row("teacher ensemble (uniform)", "", f"{ens:.4f}", interval(s.get("ensemble_test_accuracy_ci95")),
              "1.000", "")
    i8 = (s.get("deploy") or {}).get("int8")
    students = [(r["name"], r, r["params"]) for r in s.get("chain") or []]  # TAKD / born-again, in training order
    students += [("KD student", s["student"], s["student"]["params"]),
                 ("label-only student", s["label_only_student"], s["label_only_student"]["params"])]
    if i8:
        students.append((f"INT8 student ({i8['method'].upper()})", i8, s["student"]["params"]))
    for label, r, params in students:
        t.add_row(label, f"{params:,}", f"{r['test_accuracy']:.4f}", interval(r.get("test_accuracy_ci95")),
                  f"{r['test_accuracy'] / ens:.3f}", f"{r.get('test_agreement', float('nan')):.4f}")
    console.print(t)
    _print_deploy(s, console)
    c = s["student"]["config"]
    weights = ", ".join(f"{w:.2f}" for w in c["teacher_weights"])
    console.print(f"chosen: T={c['temperature']:.2f} alpha={c['alpha']:.2f} student={c['student_kwargs']} "
                  f"teacher weights=[{weights}]" + (f" method: {_method(c['method'])}" if "method" in c else ""))
    console.print(_footer(s, f"store {s['store_bytes'] / 1e6:.1f} MB"))


def interval(ci: Any) -> str:
    """A 95% interval `[lo, hi]` as `0.912–0.923` ("" where there is none)."""
    return f"{ci[0]:.3f}–{ci[1]:.3f}" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


def _method(m: dict[str, Any]) -> str:
    """The method's settings that differ from plain Hinton KD, e.g. `dkd(α=1, β=8) cosine→1.0`."""
    parts = [f"dkd(α={m['dkd_alpha']:g}, β={m['dkd_beta']:g})" if m["response"] == "dkd" else "hinton"]
    if m["schedule"] != "constant" and m["temperature_end"] is not None:
        parts.append(f"T {m['schedule']}→{m['temperature_end']:g}")
    if m["standardize"]:
        parts.append("standardized logits")
    if m["feature"] and m["feature_weight"]:
        parts.append(f"{m['feature']}×{m['feature_weight']:.2g}")
    for k in ("rkd_distance", "rkd_angle"):
        if m[k]:
            parts.append(f"{k}×{m[k]:g}")
    return " + ".join(parts)


def _print_lm(s: dict[str, Any], console: Console) -> None:
    t = Table(title=f"kd-ops LM run: {s['name']}")
    for col in ("model", "params", "val perplexity", "top-1 agreement w/ teacher"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for row in s["teachers"]:
        t.add_row(f"teacher {row['name']}", f"{row['params']:,}", f"{row['val_perplexity']:.3f}", "")
    for label, key in (("KD student", "student"), ("label-only student", "label_only_student")):
        r = s[key]
        t.add_row(label, f"{r['params']:,}", f"{r['val_perplexity']:.3f}", f"{r['top1_agreement']:.4f}")
    i8 = (s.get("deploy") or {}).get("int8")
    if i8:
        t.add_row(f"INT8 student ({i8['method'].upper()})", f"{s['student']['params']:,}",
                  f"{i8['val_perplexity']:.3f}", f"{i8.get('top1_agreement', float('nan')):.4f}")
    console.print(t)
    _print_deploy(s, console)
    c = s["student"]["config"]
    console.print(f"chosen: T={c['temperature']:.2f} alpha={c['alpha']:.2f} divergence={c['divergence']} "
                  f"tail={c['tail']} student={c['student_kwargs']}")
    console.print(_footer(s, f"store {s['store_bytes_per_token']:.1f} bytes/token"))


def int8_recipe_lines(d: dict[str, Any]) -> list[str]:
    """One line per INT8 recipe tried (its validation score, drop and weight bytes; the one shipped
    marked), and when none was within the tolerance the line saying fp32 ships."""
    i8 = d.get("int8") or d.get("int8_not_shipped")
    if not i8 or not i8.get("recipes"):
        return []
    key = i8["chosen_by"]
    out = [f"INT8 recipes tried (chosen on {key.replace('_', ' ')}, tolerance {i8['max_drop']}):"]
    for r in i8["recipes"]:
        out.append(f"  {r['recipe']}{' + QAT' if r['qat'] else ' PTQ'}: {key} {r[key]:.4f}, drop {r['drop']:.4f}, "
                   f"{r['weight_bytes']:,} B weights" + ("  <- shipped" if r.get("shipped") else ""))
    if d.get("int8_not_shipped"):
        out.append(f"no INT8 model within the tolerance {i8['max_drop']}: the student ships in fp32 "
                   f"({key} {i8['fp32_' + key]:.4f}), no INT8 file written")
    return out


def _print_deploy(s: dict[str, Any], console: Console) -> None:
    """Sizes and latencies of what ships (the deploy stage), and the teacher compute the store saved."""
    d = s.get("deploy") or {}
    if d.get("onnx_error"):
        console.print(f"ONNX export: not done ({d['onnx_error']})")
    if d.get("latency"):
        o, i8 = d["onnx"], d.get("int8")
        sizes = f"ONNX fp32 {o['fp32_file_bytes']:,} B file, {o['fp32_weight_bytes']:,} B weights"
        if i8:
            sizes += (f"; INT8 {i8['file_bytes']:,} B file ({i8['file_bytes'] / o['fp32_file_bytes']:.2f}×), "
                      f"{i8['weight_bytes']:,} B weights ({i8['weight_bytes'] / o['fp32_weight_bytes']:.2f}×)")
        console.print(sizes + f"; max |Δlogit| ONNX vs PyTorch {o['max_abs_logit_diff']:.1e}")
        for line in int8_recipe_lines(d):
            console.print(line)
        console.print(_latency_table(d))
        for note in _int8_notes(d["latency"]):
            console.print(note)
        console.print(d.get("gpu", ""))
    b = d.get("budget")
    if b:
        console.print(f"budget {b['latency_budget_ms']} ms, quality ≥ {b['quality_target']}: trial {b['chosen_trial']}, "
                      f"{b['reason']}")
    tc = s.get("teacher_compute")
    if tc and tc.get("ratio"):
        secs = (f"; {tc['online_teacher_seconds']:,.0f} teacher-s online vs {tc['precompute_teacher_seconds']:,.0f} "
                f"teacher-s precomputed" if tc.get("online_teacher_seconds") else "")
        console.print(f"teacher compute: online KD would run {tc['online_forward_rows']:,} teacher forward rows, the "
                      f"store took {tc['precompute_forward_rows']:,} ({tc['ratio']:.1f}× fewer){secs}")


def _latency_table(d: dict[str, Any]) -> Table:
    """One row per (runtime, batch), narrow enough for 80 columns (a pipe or a file): runtime names
    never wrap nor get cut; the INT8 notes go below the table (`_int8_notes`)."""
    t = Table(title=f"latency on the target: {d['target']['description']} ({d['target']['cpu']})")
    t.add_column("runtime", no_wrap=True, min_width=max(len(r["runtime"]) for r in d["latency"]))
    for col in ("batch", "median ms", "p95 ms", "vs PyTorch fp32"):
        t.add_column(col, justify="right", no_wrap=True)
    by = {(r["runtime"], r["batch"]): r for r in d["latency"]}
    for r in d["latency"]:
        ref = by.get(("pytorch-fp32", r["batch"]))
        t.add_row(r["runtime"], str(r["batch"]), f"{r['median_ms']:.3f}", f"{r['p95_ms']:.3f}",
                  f"{ref['median_ms'] / r['median_ms']:.2f}× speed" if ref else "")
    return t


def _int8_notes(latency: list[dict]) -> list[str]:
    """Whether ONNX Runtime INT8 beat ORT fp32, per batch size."""
    by = {(r["runtime"], r["batch"]): r["median_ms"] for r in latency}
    out = []
    for (runtime, batch), ms in by.items():
        f32 = by.get(("onnxruntime-fp32", batch))
        if runtime == "onnxruntime-int8" and f32 is not None:
            said = (f"{f32 / ms:.2f}× faster than ORT fp32" if ms < f32
                    else f"not faster here ({ms / f32:.2f}× ORT fp32's time)")
            out.append(f"onnxruntime-int8 at batch {batch}: {said}")
    return out


def _footer(s: dict[str, Any], store_text: str) -> str:
    failed = s.get("tune_failed_trials") or []
    tune = ""
    if s.get("tune_trials") or failed:
        tune = f"tune {len(s.get('tune_trials') or [])} trials ok, {len(failed)} failed"
        tune += f" (first: {failed[0]['error']})" if failed else ""
        tune += " · "
    m = s["mlflow"]
    reg = m["registered_model"]
    return (f"{tune}{store_text} · wall {s['wall_seconds']:.0f} s · MLflow {m['tracking_uri']} "
            f"parent run {m['parent_run_id']} · registered {reg['name']} v{reg['version']}")
