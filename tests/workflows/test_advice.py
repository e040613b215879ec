"""What a run tells beyond its numbers (workflows.advice), Ray-free: the teacher compute the store
saved, counted from the timings precompute records, and the search-range edge warning."""
from __future__ import annotations

import pytest

from workflows import advice
from workflows.stages import soft_labels, store_pass
from workflows import precompute as pre
from workflows.config import TuneConfig
from workflows.layout import Layout

ROWS = 1200  # every split of the run, per store entry
TRAIN = 400  # the training rows the views are made of


def _entry(name: str, rows: int, view: int = 0) -> dict:
    shards = {f"train/part-{i}.parquet": {"rows": rows // 4} for i in range(4)}
    return {"teacher": name, "rows": rows, "shards": shards, **({"view": view} if view else {})}


def _pass(names: list[str], rows: int, seconds: float, views: int = 1) -> list[pre.TeacherResult]:
    """The results of one precompute call that computed every entry in one shared pass, as
    `precompute.precompute` returns them: every entry ran in the same `seconds` of wall time."""
    entries = [(n, 0) for n in names] if views == 1 else [(f"{n}.view{k}", k) for n in names for k in range(1, views)]
    return [pre.TeacherResult(e, False, _entry(e, rows, k), seconds, shards_computed=4) for e, k in entries]


def _compute(lay: Layout, teachers: int, epochs: int = 10) -> dict:
    return advice.teacher_compute(store_pass.timings(lay), teachers * ROWS, TRAIN, [], epochs, 0, teachers)


@pytest.mark.parametrize("teachers", [1, 3])
def test_one_shared_pass_counts_its_wall_time_once(tmp_path, teachers):
    """M teachers in one 10 s pass over 1,200 rows did M·1,200 teacher rows in 10 s, not M·10 s."""
    lay = Layout(tmp_path)
    names = [f"t{i}" for i in range(teachers)]
    store_pass.remember_timings(lay, _pass(names, ROWS, 10.0))
    tc = _compute(lay, teachers)
    assert tc["teacher_rows_per_second"] == pytest.approx(teachers * ROWS / 10.0)
    assert tc["precompute_teacher_seconds"] == pytest.approx(10.0)
    assert tc["precompute_forward_rows"] == teachers * ROWS
    assert tc["online_forward_rows"] == TRAIN * teachers * 10
    # online KD: 10 epochs × M teachers × 400 rows at the same M·120 teacher rows/s
    assert tc["online_teacher_seconds"] == pytest.approx(TRAIN * 10 / 120)
    assert tc["saved_teacher_seconds"] == pytest.approx(TRAIN * 10 / 120 - 10.0)


def test_views_passes_are_counted_too(tmp_path):
    """Views 1..2 of the 400 training rows for 3 teachers: 2,400 more teacher rows in a 4 s pass."""
    lay = Layout(tmp_path)
    names = ["a", "b", "c"]
    store_pass.remember_timings(lay, _pass(names, ROWS, 10.0))
    store_pass.remember_timings(lay, _pass(names, TRAIN, 4.0, views=3))
    tc = _compute(lay, 3)
    assert tc["precompute_forward_rows"] == 3 * ROWS + 3 * 2 * TRAIN
    assert tc["precompute_teacher_seconds"] == pytest.approx(14.0)
    assert tc["teacher_rows_per_second"] == pytest.approx((3 * ROWS + 3 * 2 * TRAIN) / 14.0)


def test_a_later_pass_of_one_teacher_replaces_only_its_share(tmp_path):
    """A rerun that recomputes one teacher alone (the others reused) keeps the others' part of
    the first pass: 2 of 3 teachers' 10 s, then 5 s for the third alone."""
    lay = Layout(tmp_path)
    store_pass.remember_timings(lay, _pass(["a", "b", "c"], ROWS, 10.0))
    store_pass.remember_timings(lay, _pass(["c"], ROWS, 5.0) + [pre.TeacherResult("a", True, _entry("a", ROWS), 0.0),
                                                            pre.TeacherResult("b", True, _entry("b", ROWS), 0.0)])
    assert _compute(lay, 3)["precompute_teacher_seconds"] == pytest.approx(10.0 * 2 / 3 + 5.0)


def test_a_pass_that_resumed_an_entry_is_not_timed(tmp_path):
    """A pass that computed only part of one entry (a rerun after a crash) did rows it cannot
    count: none of its entries is timed."""
    lay = Layout(tmp_path)
    results = _pass(["a", "b"], ROWS, 10.0)
    results[1].shards_computed = 1
    store_pass.remember_timings(lay, results)
    assert store_pass.timings(lay) == {}
    assert _compute(lay, 2)["precompute_teacher_seconds"] is None


@pytest.mark.parametrize("best, warned", [
    (1.0, None),    # 5% up the range linearly (0.5 + 0.05 × 19.5 = 1.475), 19% in log space: not an edge
    (17.0, "top"),  # 85% linearly, 96% in log space: at the top
    (0.55, "bottom"),
])
def test_a_loguniform_range_is_measured_in_log_space(best, warned):
    tc = TuneConfig(temperature={"loguniform": [0.5, 20]})
    out = advice._edges(tc, {"temperature": best})
    if warned is None:
        assert out == []
    else:
        assert out == [f"tune: the best temperature ({best:g}) sits at the {warned} of its range [0.5, 20]: the "
                       "optimum may lie beyond it; widen tune.temperature"]


def test_a_uniform_range_stays_linear():
    tc = TuneConfig(temperature={"uniform": [0.5, 20]})
    assert len(advice._edges(tc, {"temperature": 1.0})) == 1  # 1.0 ≤ 0.5 + 5% of 19.5
    assert advice._edges(tc, {"temperature": 17.0}) == []


def test_precompute_records_one_pass_of_its_teachers_and_views(ray_session, tmp_path):
    """Real precompute passes (Ray): every entry of one pass gets the pass's wall time, and the
    timings the stages record from them count that time once, the views' pass included."""
    from types import SimpleNamespace

    from conftest import one_teacher_split
    from workflows.config import PrecomputeConfig

    split, src, _, t = one_teacher_split(tmp_path, rows=300)
    lay = Layout(tmp_path / "out")
    lay.make()
    teachers = [t.model_copy(update={"name": n}) for n in ("a", "b", "c")]
    opts = dict(feature_columns=["x"], batch_size=64, num_actors=1, use_gpu=False)
    solo = Layout(tmp_path / "solo")
    solo.make()
    [one] = pre.precompute(teachers[:1], {"train": src}, solo.store, **opts)
    n = one.manifest["rows"]
    assert n == len(split.ids)
    store_pass.remember_timings(solo, [one])
    tc = advice.teacher_compute(store_pass.timings(solo), n, n, [], 10, 0, 1)
    assert one.seconds > 0 and tc["precompute_teacher_seconds"] == pytest.approx(one.seconds)
    results = pre.precompute(teachers, {"train": src}, lay.store, **opts)
    assert len({r.seconds for r in results}) == 1  # one pass, one wall time
    store_pass.remember_timings(lay, results)
    tc = advice.teacher_compute(store_pass.timings(lay), 3 * n, n, [], 10, 0, 3)
    assert tc["precompute_teacher_seconds"] == pytest.approx(results[0].seconds)
    assert tc["teacher_rows_per_second"] == pytest.approx(3 * n / results[0].seconds)

    task = SimpleNamespace(cfg=SimpleNamespace(precompute=PrecomputeConfig(views=3, batch_size=64)),
                           train_splits=("train",), feature_columns=["x"], precompute_options=dict)
    views = soft_labels.precompute_views(task, teachers, {"train": src}, lay, None)
    assert len(views) == 6 and len({r.seconds for r in views}) == 1
    tc = advice.teacher_compute(store_pass.timings(lay), 3 * n, n, [], 10, 0, 3)
    assert tc["precompute_forward_rows"] == 3 * n + 3 * 2 * n
    assert tc["precompute_teacher_seconds"] == pytest.approx(results[0].seconds + views[0].seconds)
