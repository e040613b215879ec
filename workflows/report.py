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
    for col in ("model", "params", "test acc", "vs ensemble", "agreement w/ ensemble"):
        t.add_column(col, justify="left" if col == "model" else "right")
    ens = s["ensemble_test_accuracy"]
    for row in s["teachers"]:
        t.add_row(f"teacher {row['name']}", f"{row['params']:,}", f"{row['test_accuracy']:.4f}",
                  f"{row['test_accuracy'] / ens:.3f}", "")
    t.add_row("teacher ensemble (uniform)", "", f"{ens:.4f}", "1.000", "")
    for r in s.get("chain") or []:  # TAKD assistants / born-again generations, in training order
        t.add_row(r["name"], f"{r['params']:,}", f"{r['test_accuracy']:.4f}", f"{r['test_accuracy'] / ens:.3f}",
                  f"{r.get('test_agreement', float('nan')):.4f}")
    for label, key in (("KD student", "student"), ("label-only student", "label_only_student")):
        r = s[key]
        t.add_row(label, f"{r['params']:,}", f"{r['test_accuracy']:.4f}", f"{r['test_accuracy'] / ens:.3f}",
                  f"{r.get('test_agreement', float('nan')):.4f}")
    console.print(t)
    c = s["student"]["config"]
    weights = ", ".join(f"{w:.2f}" for w in c["teacher_weights"])
    console.print(f"chosen: T={c['temperature']:.2f} alpha={c['alpha']:.2f} student={c['student_kwargs']} "
                  f"teacher weights=[{weights}]" + (f" method: {_method(c['method'])}" if "method" in c else ""))
    console.print(_footer(s, f"store {s['store_bytes'] / 1e6:.1f} MB"))


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
    console.print(t)
    c = s["student"]["config"]
    console.print(f"chosen: T={c['temperature']:.2f} alpha={c['alpha']:.2f} divergence={c['divergence']} "
                  f"tail={c['tail']} student={c['student_kwargs']}")
    console.print(_footer(s, f"store {s['store_bytes_per_token']:.1f} bytes/token"))


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
