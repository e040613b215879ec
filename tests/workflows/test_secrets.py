"""A tracking URI's secret is used to connect and never shown or stored. Ray is imported, never
started: a database URI with a password (MLflow's SQL stores take postgresql://user:pw@…,
mysql+pymysql://…; the test uses sqlite, which ignores a `password` query parameter), the Tracker,
the summary, report and console table, what Ray's rank-0 workers and Tune's callback are handed.
The same on a real run against a password-protected server: tests/workflows/test_pipeline.py."""
from __future__ import annotations

import json
from types import SimpleNamespace

import mlflow
import pytest
from test_report_page import _summary

from workflows import pipeline, worker
from workflows.layout import Layout
from workflows.tracking import Tracker, connect_uri

PASSWORD = "db-pa55w0rd-4f1c"


@pytest.fixture
def db_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands in tmp_path too
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("COLUMNS", "400")  # rich would wrap the console table's footer, and a URI in it, at 80
    yield f"sqlite:///{tmp_path / 'mlflow.db'}?password={PASSWORD}"
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # MLflow's default again (the env var comes back with monkeypatch)


def _files_holding(root, secret: str) -> list:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_database_password_connects_and_is_in_nothing_shown_or_stored(db_uri, tmp_path, capsys):
    tracker = Tracker(db_uri, "secrets")
    assert tracker.uri == db_uri.replace(PASSWORD, "***")  # kd_ops.fsio.redact, as everywhere
    assert connect_uri(tracker.uri) == db_uri  # what Ray's processes started from here on find
    lay = Layout(tmp_path / "out")
    lay.make()
    config = {"tracking": {"tracking_uri": db_uri, "experiment": "secrets"}}
    with tracker.parent("secrets", config, {"kd.out": str(lay.out)}) as parent_id:
        with tracker.child("student", {"tracking_uri": db_uri}) as child_id:
            cfg = SimpleNamespace(mlflow={"tracking_uri": tracker.uri, "run_id": child_id}, label="student")
            client = worker._mlflow_client(cfg)  # what rank 0 of a Train fit does with what stages hands it
            assert worker._log_epoch(client, cfg, {"epoch": 1, "val_accuracy": 0.5}, 1) is client
        summary = _summary(lay.local("the test")) | {"deploy": None,  # a run without the deploy stage
                                                    "mlflow": tracker.summary({"name": "m", "version": "1"})}
        mlflow.log_dict(summary, "summary.json")
        page = pipeline.write_summary(summary, lay)
        tracker.log_file(page, "report")
    printed = capsys.readouterr().out
    assert "warning: MLflow" not in printed and f"MLflow {tracker.uri}" in printed  # the table's footer
    assert PASSWORD not in printed
    assert summary["mlflow"]["tracking_uri"] == tracker.uri
    assert json.loads((lay.out / "summary.json").read_text())["mlflow"]["tracking_uri"] == tracker.uri
    assert tracker.uri in (lay.out / "report.html").read_text()

    runs = [tracker.client.get_run(parent_id), tracker.client.get_run(child_id)]
    assert runs[1].data.metrics["val_accuracy"] == 0.5  # the worker's client reached the run
    assert runs[0].data.params["tracking.tracking_uri"] == runs[1].data.params["tracking_uri"] == tracker.uri
    assert not [v for r in runs for v in (*r.data.params.values(), *r.data.tags.values()) if PASSWORD in v]
    logged = mlflow.artifacts.download_artifacts(run_id=parent_id, dst_path=str(tmp_path / "downloaded"))
    assert {p.name for p in (tmp_path / "downloaded").rglob("*")} >= {"summary.json", "report.html"}, logged
    # nothing on disk: --out, the artifacts, their download, the MLflow store itself
    assert _files_holding(tmp_path, PASSWORD) == []


def test_tunes_callback_is_saved_without_the_secret_and_connects_with_it(db_uri):
    from ray import cloudpickle  # what Tune pickles its state with

    from workflows import tune

    tracker = Tracker(db_uri, "secrets")
    callback = tune._MLflowLogger(tracking_uri=tracker.uri, experiment_name="secrets", save_artifact=False)
    assert PASSWORD.encode() not in cloudpickle.dumps(callback)  # Tune writes it into tuner.pkl under --out
    callback.setup()
    assert mlflow.get_tracking_uri() == db_uri  # it connected with the real URI ...
    assert callback.tracking_uri == tracker.uri and PASSWORD.encode() not in cloudpickle.dumps(callback)  # ... kept none


def test_a_worker_that_cannot_reach_mlflow_trains_on_with_one_warning(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = SimpleNamespace(mlflow={"tracking_uri": "http://127.0.0.1:9", "run_id": "r"}, label="student")
    assert worker._mlflow_client(cfg) is None
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[student] warning: MLflow at http://127.0.0.1:9 failed"), lines

    class Refusing:  # a server that stops answering, or stops taking these credentials, mid-fit
        def log_batch(self, *a, **k):
            raise PermissionError("401 Unauthorized")

    assert worker._log_epoch(Refusing(), cfg, {"epoch": 1, "val_accuracy": 0.5}, 1) is None
    assert worker._log_epoch(None, cfg, {"epoch": 2, "val_accuracy": 0.6}, 2) is None  # off for this fit
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "PermissionError: 401 Unauthorized" in lines[0], lines
