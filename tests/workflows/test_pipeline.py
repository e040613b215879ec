"""End to end on real Ray, real MLflow (a server on 127.0.0.1) and real Parquet, on a tiny config."""
from __future__ import annotations

import contextlib
import io
import json
import re
import time
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import counting_teacher
from config_walk import Walk
from conftest import COUNTER, MLFLOW_PASSWORD, MLFLOW_USER, TINY_DEPLOY, assert_ddp_split, ddp_fits, tiny_config
from kd_ops import data, evaluate, models, store
from workflows import commands, console, pipeline, tasks
from workflows.stages import store_pass
from workflows.config import RunConfig, load_config
from workflows.layout import Layout
from workflows.tracking import CREDENTIAL_ENV


@pytest.fixture(scope="module")
def tiny_run(ray_session, mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny-run")
    # the server refuses requests without its credentials: here the driver has them only in the URI
    # (Ray's workers from their node's environment, see conftest); they must not be shown or stored
    with_secret = mlflow_server.replace("http://", f"http://{MLFLOW_USER}:{SECRET}@")
    # a budget both trials meet: the smaller student is chosen
    cfg = load_config(tiny_config(tmp, tracking={"tracking_uri": with_secret, "experiment": "tiny",
                                                 "registered_model": "tiny-student"},
                                  deploy={**TINY_DEPLOY, "latency_budget_ms": 1000.0, "quality_target": 0.01}))
    out = tmp / "out"
    shown = io.StringIO()  # the console, as `kd run` sets it up: kd's lines here, the rest in logs/kd.log
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stdout(shown):
        for k in CREDENTIAL_ENV:
            env.delenv(k, raising=False)
        console.setup(out, verbose=False)
        try:
            with Walk([ROOT / "workflows", ROOT / "kd_ops"], RunConfig) as WALK["tiny"]:
                summary = pipeline.run(cfg, out)
        finally:
            console.restore()
    CONSOLE["tiny"] = shown.getvalue()
    return cfg, out, summary, mlflow_server


ROOT = Path(__file__).resolve().parents[2]
WALK: dict[str, Walk] = {}  # how the tiny run's config went through the files
CONSOLE: dict[str, str] = {}  # what the tiny run printed on the console


SECRET = MLFLOW_PASSWORD


def test_summary_has_every_field_and_matches_disk(tiny_run):
    cfg, out, summary, _ = tiny_run
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary, default=str))
    assert [t["name"] for t in summary["teachers"]] == ["t1", "t2"]
    teacher_params = models.num_params(models.cnn(width=16))
    assert all(t["params"] == teacher_params for t in summary["teachers"])
    assert summary["student"]["config"]["student_kwargs"]["width"] in (4, 6)
    assert summary["student"]["params"] == models.num_params(models.cnn(**summary["student"]["config"]["student_kwargs"]))
    assert summary["label_only_student"]["params"] == summary["student"]["params"]
    for acc in [summary["ensemble_test_accuracy"], summary["student"]["test_accuracy"],
                summary["label_only_student"]["test_accuracy"], *(t["test_accuracy"] for t in summary["teachers"])]:
        assert 0.0 <= acc <= 1.0
    assert sum(summary["student"]["config"]["teacher_weights"]) == pytest.approx(1.0)
    assert summary["store_bytes"] == store.size_bytes(out / "store") > 0
    assert len(summary["tune_trials"]) == 2
    assert summary["mlflow"]["registered_model"]["name"] == "tiny-student"
    assert summary["mlflow"]["tracking_uri"] == tiny_run[3]  # without the credentials
    stored = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".log", ".txt", ".yaml")]
    assert stored and not [p for p in stored if SECRET in p.read_text(errors="replace")]


def test_the_tracking_password_reaches_mlflow_and_is_shown_or_stored_nowhere(tiny_run, tmp_path):
    """The server refuses requests without the password, so the run used it: the driver took it out
    of the URI, rank 0 of each fit found it in its node's environment (its epochs are logged). It
    is in no file under --out (summary.json, report.html, logs/kd.log, Tune's tuner.pkl ...), on
    the console, in any MLflow param, tag or artifact of the run or its registered model, or in
    the Ray job's runtime env and entrypoint as Ray's job API hands them out."""
    import ray
    from ray.util.state import list_jobs

    cfg, out, summary, uri = tiny_run
    secret = SECRET.encode()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {out / "summary.json", out / "report.html", out / "logs" / "kd.log"} <= set(files)
    assert [p for p in files if secret in p.read_bytes()] == []
    printed = CONSOLE["tiny"]
    assert "==> tune" in printed and uri in printed  # the stage lines and the table's footer
    assert SECRET not in printed
    # no fit lost MLflow (a rank 0 without the credentials warns and logs no epochs)
    assert "warning: MLflow at" not in printed + (out / "logs" / "kd.log").read_text(errors="replace")

    client = MlflowClient(uri)  # conftest's MLFLOW_TRACKING_USERNAME / _PASSWORD
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    runs = client.search_runs([parent.info.experiment_id])  # the parent, its children and theirs
    assert {parent.info.run_name, "student", "deploy", "teacher-t1"} <= {r.info.run_name for r in runs}
    assert not [(r.info.run_name, k) for r in runs for k, v in (*r.data.params.items(), *r.data.tags.items())
                if SECRET in v]
    downloaded = tmp_path / "artifacts"
    for r in runs:
        mlflow.artifacts.download_artifacts(run_id=r.info.run_id, dst_path=str(downloaded / r.info.run_id),
                                            tracking_uri=uri)
    reg = summary["mlflow"]["registered_model"]
    mlflow.artifacts.download_artifacts(reg["model_uri"], dst_path=str(downloaded / "model"), tracking_uri=uri,
                                        registry_uri=uri)
    assert {"config.json", "summary.json", "report.html", "MLmodel"} <= {p.name for p in downloaded.rglob("*")}
    assert [p for p in downloaded.rglob("*") if p.is_file() and secret in p.read_bytes()] == []

    job_id = ray.get_runtime_context().get_job_id()
    (job,) = [j for j in list_jobs(detail=True, limit=10_000) if j.job_id == job_id]
    assert job.runtime_env["env_vars"]["RAY_ADDRESS"]  # the driver's runtime env, as the dashboard shows it
    assert not set(job.runtime_env["env_vars"]) & {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    handed_out = json.dumps([job.runtime_env, job.entrypoint, job.metadata, ray.get_runtime_context().runtime_env],
                            default=str)
    assert SECRET not in handed_out


def test_the_config_goes_down_through_the_files_never_back_up_to_a_caller(tiny_run):
    """Followed from `pipeline.run` (tune and deploy on): no call hands the config back up to a
    file on the call stack but the fits a stage hands down to run side by side, and few re-enter
    a file already left (see config_walk)."""
    walk = WALK["tiny"]
    assert {"workflows/pipeline.py", "workflows/tasks.py", "workflows/stages/student.py",
            "workflows/stages/ship.py"} <= set(walk.entered)
    # the only calls back up: the fits a stage hands down to be run side by side (concurrent_fits)
    assert {(a, b, fn) for a, _, b, fn in walk.climbs} == {
        ("workflows/concurrent_fits.py", "workflows/stages/teachers.py", "fit"),
        ("workflows/concurrent_fits.py", "workflows/stages/student.py", "fit_and_score")}, walk.report()
    # 21: deploy returns to the task once more since INT8 is chosen on validation scores (task.choice_score)
    assert len(walk.returns) <= 21, walk.report()


def test_store_holds_the_teachers_raw_logits_keyed_by_id(tiny_run):
    cfg, out, _, _ = tiny_run
    test = data.read_inputs(out / "data" / "test", ["x"])
    for t in cfg.teachers:
        m = store.read_manifest(out / "store", t.name)
        assert m["rows"] == 400 + 100 + 100 + 600 and m["columns"] == {"logits": {"dtype": "float16", "shape": [10]}}
        weights = out / "teachers" / f"{t.name}.safetensors"
        assert m["teacher_fingerprint"] == models.teacher_fingerprint(t.factory, t.kwargs, weights)
        assert set(m["inputs"]) == {"train", "val", "test", "transfer"}
        # co-partitioned: one shard per input file, each with that file's row count
        for split, files in m["inputs"].items():
            for name, key in files.items():
                assert m["shards"][f"{split}/{name}"]["rows"] == key["rows"]
        teacher = models.load_weights(models.cnn(width=16), weights)
        expected = evaluate.predict_logits(teacher, test.x)  # in our id order; the store was written by Ray in its own
        stored = store.soft_labels(out / "store", [t.name], test.ids[::-1])["logits"][0][::-1]
        np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_mlflow_records_parent_nested_runs_and_a_loadable_student(tiny_run):
    cfg, out, summary, uri = tiny_run
    client = MlflowClient(uri)
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["tune.num_samples"] == "2"
    assert parent.data.params["tracking.tracking_uri"] == uri.replace("http://", "http://kd:***@")
    mlflow.set_tracking_uri(uri)
    config_json = mlflow.artifacts.load_dict(f"{parent.info.artifact_uri}/config.json")
    assert config_json["tracking"]["tracking_uri"] == uri.replace("http://", "http://kd:***@")
    assert not [k for k, v in parent.data.params.items() if SECRET in v]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = sorted(r.info.run_name for r in children)
    assert [n for n in names if not n.startswith("_trial")] == [
        "deploy", "label-only-student", "precompute", "student", "teacher-t1", "teacher-t2"]
    trials = [r for r in children if r.data.tags.get("kd.stage") == "trial"]
    assert len(trials) == 2 and all("val_accuracy" in r.data.metrics for r in trials)
    student_run = next(r for r in children if r.info.run_name == "student")
    history = client.get_metric_history(student_run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    artifacts = [a.path for a in client.list_artifacts(next(r for r in children if r.info.run_name == "precompute").info.run_id, "manifests")]
    assert artifacts == ["manifests/t1.json", "manifests/t2.json"]

    reg = summary["mlflow"]["registered_model"]
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(reg["model_uri"])  # model from code: nothing unpickled
    test = data.read_inputs(out / "data" / "test", ["x"])
    acc = evaluate.accuracy(model.predict(test.x), test.y)
    assert acc == pytest.approx(summary["student"]["test_accuracy"], abs=1e-9)
    assert type(model.unwrap_python_model().module).__name__ == "CNN1D"
    files = [f.path for f in client.list_artifacts(student_run.info.run_id)]
    logged = mlflow.artifacts.download_artifacts(f"runs:/{student_run.info.run_id}/")
    assert not list(Path(logged).rglob("*.pkl")) and not list(Path(logged).rglob("*.pth")), files
    assert client.get_model_version_by_alias("tiny-student", "champion").version == reg["version"]


def test_tuning_and_reused_precompute_never_run_a_teacher(tiny_run, tmp_path):
    cfg, out, _, uri = tiny_run
    before = counting_teacher.count(COUNTER)
    assert before > 0  # the counter sees teachers: they were trained and run by precompute
    layout, task = Layout(out), tasks.for_config(cfg)
    results = store_pass.precompute_logits(task, [t.model_copy(update={"weights": layout.teacher_weights(t)})
                                                  for t in cfg.teachers], task.data(layout), layout, None)
    assert [r.reused for r in results] == [True, True]
    assert commands.tune(cfg, out, tracking_uri=uri) == 0
    assert counting_teacher.count(COUNTER) == before


def test_a_rerun_into_the_same_out_returns_the_student_it_trained(tiny_run, capsys):
    """Ray Train V2 reloads checkpoint bookkeeping from the run folder it is given: `kd train` after
    `kd run` on the same --out must return its own checkpoint, although the old student scored better."""
    cfg, out, _, uri = tiny_run
    stalled = cfg.train.fit.model_copy(update={"lr": 1e-9, "epochs": 1})  # stays at its initialisation
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"fit": stalled})})
    capsys.readouterr()
    started = time.time()
    assert commands.train(cfg, out, tracking_uri=uri) == 0
    printed = capsys.readouterr().out
    result, _ = json.JSONDecoder().raw_decode(printed[printed.rindex('{\n  "student"'):])
    weights = Path(result["weights"])
    assert weights.is_relative_to(out / "ray" / "student") and weights.stat().st_mtime >= started
    assert all(c.stat().st_mtime >= started for c in (out / "ray" / "student").glob("checkpoint_*"))


def test_two_train_workers_split_each_epoch_and_hold_the_same_weights(tiny_run, tmp_path):
    """DDP on the streaming ingest: each epoch the workers see disjoint ids whose union is the training
    split (train + transfer, an even 1,000 rows: Ray's equal split drops at most workers − 1 rows of an
    odd count), they end with identical weights, and the 2-worker student scores within noise of the
    1-worker one."""
    cfg, out, _, _ = tiny_run
    fit = cfg.train.fit.model_copy(update={"epochs": 2, "batch_size": 64})
    fits, expected = ddp_fits(cfg, out, tmp_path, fit, {"width": 6})
    assert len(expected) == 1000
    assert_ddp_split(fits, expected, 2)
    one, two = fits[1][0].metrics, fits[2][0].metrics
    assert one["train_rows"] == two["train_rows"] == 1000
    # 100 validation rows: the difference of two accuracies has a standard deviation of at most
    # sqrt(2 · 0.25 / 100) ≈ 0.071; 3σ
    assert abs(one["val_accuracy"] - two["val_accuracy"]) <= 0.21, (one["val_accuracy"], two["val_accuracy"])


def test_the_student_ships_as_onnx_and_int8_timed_on_the_target(tiny_run):
    import onnx

    from kd_ops import deploy as dp

    cfg, out, summary, _ = tiny_run
    d = summary["deploy"]
    assert d["onnx"]["opset"] >= 18 and d["onnx"]["max_abs_logit_diff"] < 1e-3
    test = data.read_inputs(out / "data" / "test", ["x"])
    # the shipped files score exactly what the summary says, on the whole test split
    for name, acc in (("student.onnx", summary["student"]["test_accuracy"]),
                      ("student.int8.onnx", d["int8"]["test_accuracy"])):
        logits = dp.onnx_logits(dp.onnx_session(str(out / "deploy" / name)), test.x)
        assert evaluate.accuracy(logits, test.y) == pytest.approx(acc, abs=1e-9), name
    graph = onnx.load(str(out / "deploy" / "student.int8.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    assert 0 < d["int8"]["weight_bytes"] < d["onnx"]["fp32_weight_bytes"]
    # deploy.qat: always — QAT ran; its INT8 model ships only when it lost less than PTQ's on the
    # validation split: the choice reads validation only, the test split scores what ships
    i8 = d["int8"]
    assert i8["calibration_rows"] == 64 and i8["qat_epochs"] == 1 and 0 <= i8["qat_val_accuracy"] <= 1
    assert i8["chosen_by"] == "val_accuracy" and not {"ptq_test_accuracy", "qat_test_accuracy"} & set(i8)
    val = data.read_inputs(out / "data" / "val", ["x"])
    # drops are measured between ONNX files (fp32 and INT8): what quantization alone changed
    fp32_val = evaluate.accuracy(dp.onnx_logits(dp.onnx_session(str(out / "deploy" / "student.onnx")), val.x), val.y)
    assert i8["fp32_val_accuracy"] == pytest.approx(fp32_val, abs=1e-9)
    assert i8["ptq_drop"] == pytest.approx(i8["fp32_val_accuracy"] - i8["ptq_val_accuracy"], abs=1e-12)
    assert i8["qat_drop"] == pytest.approx(i8["fp32_val_accuracy"] - i8["qat_val_accuracy"], abs=1e-12)
    assert i8["method"] == ("qat" if i8["qat_drop"] < i8["ptq_drop"] else "ptq")
    shipped = dp.onnx_logits(dp.onnx_session(str(out / "deploy" / "student.int8.onnx")), val.x)
    assert evaluate.accuracy(shipped, val.y) == pytest.approx(i8[i8["method"] + "_val_accuracy"], abs=1e-9)
    assert i8["test_drop"] == pytest.approx(summary["student"]["test_accuracy"] - i8["test_accuracy"], abs=1e-12)
    assert (out / "deploy" / "student.qat.onnx").exists() == (i8["method"] == "qat")
    timed = {(r["runtime"], r["batch"]) for r in d["latency"]}
    assert timed == {(rt, b) for rt in ("teacher-pytorch-fp32", "pytorch-fp32", "onnxruntime-fp32", "onnxruntime-int8")
                     for b in (1, 16)}
    assert all(0 < r["median_ms"] <= r["p95_ms"] and r["runs"] == 10 for r in d["latency"])
    assert d["gpu"].startswith("GPU latency: not measured")
    tc = summary["teacher_compute"]
    trial_epochs = sum(t["epochs"] for t in summary["tune_trials"])
    epochs = trial_epochs + cfg.train.fit.epochs + (d["int8"]["qat_epochs"] or 0)
    assert tc["online_forward_rows"] == 2 * epochs * (400 + 600)  # 2 teachers × epochs × (train + transfer rows)
    assert tc["precompute_forward_rows"] == 2 * (400 + 100 + 100 + 600)  # every split once per teacher
    assert tc["saved_teacher_seconds"] > 0


def test_a_budget_several_trials_meet_picks_the_smallest(tiny_run):
    cfg, out, summary, _ = tiny_run
    trials = summary["tune_trials"]
    assert all({"latency_ms", "params", "quality"} <= set(t) for t in trials)
    # two trials may draw the same width: then the better one (the picker's last tie-break)
    smallest = min(trials, key=lambda t: (t["params"], t["latency_ms"], -t["quality"]))
    assert summary["deploy"]["budget"]["chosen_trial"] == smallest["trial_id"]
    assert summary["deploy"]["budget"]["met"] == len(trials) == 2
    assert summary["student"]["config"]["student_kwargs"]["width"] == smallest["student_width"]
    import matplotlib.image

    assert matplotlib.image.imread(out / summary["deploy"]["pareto_png"]).shape[2] in (3, 4)


def test_a_budget_no_trial_meets_exits_2_naming_the_closest(tiny_run, tmp_path, capsys):
    """Last in this module: the failed rerun deletes the run's summary (a summary only describes a
    finished run); the test puts it back."""
    import yaml

    from workflows import cli

    cfg, out, summary, uri = tiny_run
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    capsys.readouterr()
    code = cli.main(["run", str(path), "--out", str(out), "--tracking-uri", uri, "--set", "deploy.quality_target=5.0"])
    # the session's Ray workers also print on this process's stderr: kd's own lines start with "kd:"
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kd:")]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("kd: error: no tune trial meets"), err
    assert "deploy.quality_target=5.0" in err[0] and "(target ≥ 5.0)" in err[0], err
    # the trial named is one of this search's (which one is closest: tests/workflows/test_budget.py)
    named = re.search(r"the closest, trial (\S+) \(([\d,]+) params\)", err[0])
    trials = {p.name for p in (out / "ray" / "tune").iterdir() if p.is_dir()}
    assert named and any(named.group(1) in t for t in trials), (err[0], trials)
    assert not (out / "summary.json").exists()
    (out / "summary.json").write_text(json.dumps(summary, default=str))

