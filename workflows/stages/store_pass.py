"""The layer under the soft-label and chain stages: one precompute pass of teachers' raw logits
into the store, recorded in MLflow, and the teacher-seconds each pass took (kept under --out so a
rerun that reuses the store can still say what it saved)."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow

from kd_ops import store
from workflows import console
from workflows import precompute as pre
from workflows.config import TeacherConfig
from workflows.layout import Layout
from workflows.ray_session import progress_bars
from workflows.stages.fit import child_run
from workflows.tracking import Tracker


def precompute_logits(task, teachers: list[TeacherConfig], dirs: dict[str, Path], lay: Layout,
                     tracker: Tracker | None) -> list[pre.TeacherResult]:
    """Every teacher's raw logits on every split into the store (reused where already stored)."""
    pc = task.cfg.precompute
    with child_run(tracker, "precompute", pc.model_dump()), progress_bars():
        results = pre.precompute(teachers, dirs, lay.store, feature_columns=task.feature_columns, **pre.options(pc),
                                 **task.precompute_options(), progress=console.progress("precompute", "rows"))
        if tracker:
            for r in results:
                mlflow.log_dict(r.manifest, f"manifests/{r.name}.json")
                mlflow.log_metric(f"{r.name}.seconds", r.seconds)
                mlflow.log_metric(f"{r.name}.shards_computed", r.shards_computed)
            mlflow.log_metric("store_bytes", store.size_bytes(lay.store))
            mlflow.set_tag("kd.reused", ",".join(r.name for r in results if r.reused) or "none")
    remember_timings(lay, results)
    return results


# {store entry: {rows, seconds, pass_seconds, view}} of the last full pass that computed it
TIMINGS = "precompute-timings.json"


def remember_timings(lay: Layout, results: list[pre.TeacherResult]) -> None:
    """Keep what each entry's precompute pass measured, so a rerun that reuses the store can still
    say what the store saved in teacher-seconds. A pass runs all its entries at once in one wall
    time: each entry keeps its share of it by rows, so a pass of M teachers counts its wall time
    once (not M times), and a later pass of some entries replaces only their shares. A pass that
    computed only part of an entry (resumed after a crash) is not timed: it ran rows no entry counts."""
    ran = [r for r in results if not r.reused]
    if not ran or any(r.shards_computed != len(r.manifest.get("shards", {})) for r in ran):
        return
    wall, rows = max(r.seconds for r in ran), sum(r.manifest["rows"] for r in ran)
    if wall <= 0 or rows <= 0:
        return
    known = timings(lay)
    for r in ran:
        known[r.name] = {"rows": r.manifest["rows"], "seconds": wall * r.manifest["rows"] / rows,
                         "pass_seconds": wall, "view": r.manifest.get("view", 0)}
    (lay.out / TIMINGS).write_text(json.dumps(known))


def timings(lay: Layout) -> dict[str, dict[str, float]]:
    """The recorded passes (`remember_timings`) by store entry. Records without `pass_seconds`
    (an older kd) are left out: each held the whole wall time of a pass it shared."""
    path = lay.out / TIMINGS
    known = json.loads(path.read_text()) if path.is_file() else {}
    return {k: v for k, v in known.items() if "pass_seconds" in v}
