"""MLflow: one parent run per `kd run`, nested child runs per stage and per trial, the student
registered. Only the driver and Ray Train's rank 0 talk to MLflow."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

import mlflow
from mlflow.tracking import MlflowClient

from kd_ops.fsio import Loc, redact, redacted


def resolve_uri(uri: str | None) -> str:
    """Absolute tracking URI. Ray Tune/Train change the working directory per trial, so a relative
    `sqlite:///mlflow.db` would point at a different database in every trial."""
    if uri is None:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a bare directory means a file store
        return Path(uri).resolve().as_uri()
    return uri


# MLflow's own variables for HTTP basic auth. Ray processes read them from their node's
# environment (a local cluster's inherit the driver's at `ray.init`), never from the runtime env,
# which Ray's job API and every node's runtime-env agent log hand out whole.
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def without_credentials(uri: str) -> str:
    """`http://user:pass@host` → `http://host`, the user and password moved into MLflow's
    MLFLOW_TRACKING_USERNAME / _PASSWORD variables (MLflow's HTTP client reads them there)."""
    u = urlsplit(uri)
    if u.scheme not in ("http", "https") or u.password is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(u.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(u.password)
    return urlunsplit((u.scheme, u.netloc.rsplit("@", 1)[1], u.path, u.query, u.fragment))


def connect_uri(shown: str) -> str:
    """The URI to connect to for a Tracker's `uri` (its secrets masked): this process's
    MLFLOW_TRACKING_URI when that is the real form of `shown` (the driver's Tracker sets it before
    Ray starts, so a local cluster's processes inherit it; a real cluster's pods get it from a
    Secret), else `shown` itself."""
    real = os.environ.get("MLFLOW_TRACKING_URI")
    return real if real and redact(real) == shown else shown


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= flatten(v, key + ".")
        else:
            out[key] = json.dumps(redacted(v)) if isinstance(v, (list, dict)) else redacted(v)
    return out


def environment_tags() -> dict[str, str]:
    """What is needed to reproduce a run: package versions and the code's git commit."""
    import pyarrow
    import ray
    import torch

    tags = {"kd.python": platform.python_version(), "kd.torch": torch.__version__, "kd.ray": ray.__version__,
            "kd.mlflow": mlflow.__version__, "kd.pyarrow": pyarrow.__version__}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip()
        if commit:
            tags["mlflow.source.git.commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """A tracking server must answer before anything starts (MLflow itself retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy or an older server without /health): reachable
    except OSError as e:
        reason = getattr(e, "reason", e)
        raise ValueError(f"MLflow tracking server {redact(uri)} does not answer ({reason}); start it, or pass another "
                         "--tracking-uri (e.g. sqlite:///mlflow.db for a local store)") from None


class Tracker:
    """Thin wrapper holding the tracking URI, the experiment and the parent run. `uri` is the URI
    with its secrets masked (`kd_ops.fsio.redact`): what is shown, stored, and handed to Ray's
    workers and Tune's callback, which find the real one with `connect_uri`."""

    def __init__(self, uri: str | None, experiment: str, artifact_root: str | None = None):
        """artifact_root: where a new experiment keeps its artifacts (e.g. s3://bucket/run/mlflow);
        an existing experiment keeps its own location."""
        self._connect_uri = without_credentials(resolve_uri(uri))  # for connecting only: may hold a secret
        self.uri = redact(self._connect_uri)  # for everything shown or stored (summary, report, workers, Tune)
        check_reachable(self._connect_uri)
        mlflow.set_tracking_uri(self._connect_uri)
        # what `connect_uri` finds in every process started from here on (MLflow sets it too; said here
        # because Ray's processes depend on it)
        os.environ["MLFLOW_TRACKING_URI"] = self._connect_uri
        self.experiment = experiment
        if artifact_root and mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=artifact_root)
        self.experiment_id = mlflow.set_experiment(experiment).experiment_id
        self.client = MlflowClient(self._connect_uri)
        self.parent_run_id: str | None = None

    def summary(self, registered: dict | None = None) -> dict[str, Any]:
        """The run summary's `mlflow` entry (summary.json, the report page, the console table)."""
        return {"tracking_uri": self.uri, "experiment": self.experiment, "parent_run_id": self.parent_run_id,
                "registered_model": registered}

    @contextmanager
    def parent(self, name: str, params: dict[str, Any], tags: dict[str, str], resume: str | None = None) -> Iterator[str]:
        """The run's parent MLflow run. `resume`: the id of an unfinished parent run of the same run
        (its driver died) to continue: its stages' child runs are reopened by name, not repeated."""
        self.resuming = resume is not None
        with mlflow.start_run(run_id=resume, run_name=None if resume else name,
                              tags=None if resume else {**environment_tags(), **tags}) as run:
            self.parent_run_id = run.info.run_id
            if not resume:
                mlflow.log_params(flatten(params))
            yield run.info.run_id

    @contextmanager
    def child(self, name: str, params: dict[str, Any] | None = None) -> Iterator[str]:
        previous = self._child_id(name) if getattr(self, "resuming", False) else None
        # a fit in another driver thread (concurrent_fits) sees no active run: MLflow's run stack is per thread
        parent = None if mlflow.active_run() else self.parent_run_id
        with mlflow.start_run(run_id=previous, run_name=None if previous else name, nested=True,
                              parent_run_id=parent) as run:
            if params and not previous:
                mlflow.log_params(flatten(params))
            yield run.info.run_id

    def _child_id(self, name: str) -> str | None:
        found = self.client.search_runs([self.experiment_id], max_results=1, filter_string=(
            f"tags.mlflow.parentRunId = '{self.parent_run_id}' and tags.mlflow.runName = '{name}'"))
        return found[0].info.run_id if found else None

    def unfinished(self, run_id: str | None) -> bool:
        """Whether `run_id` is a parent run of this experiment that never finished (its driver died)."""
        if not run_id:
            return False
        try:
            run = self.client.get_run(run_id)
        except Exception:  # deleted, or another tracking server
            return False
        return run.info.experiment_id == self.experiment_id and run.info.status in ("RUNNING", "FAILED", "KILLED")

    def close_unfinished(self, run_id: str) -> None:
        """Mark a dead driver's parent run and its still-RUNNING children KILLED (a restart)."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
        for r in [*runs, self.client.get_run(run_id)]:
            if r.info.status == "RUNNING":
                self.client.set_terminated(r.info.run_id, "KILLED")

    def log_file(self, loc, artifact_path: str, name: str | None = None) -> None:
        """Log a file that may live on object storage (through a local copy) as an artifact of the
        active run, under its own name or `name`."""
        loc = Loc.of(loc)
        if loc.local and name in (None, loc.name):
            mlflow.log_artifact(loc.path, artifact_path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / (name or loc.name)
            local.write_bytes(loc.read_bytes())
            mlflow.log_artifact(str(local), artifact_path)

    def register(self, weights, spec: dict[str, Any], name: str, input_example, code: list | None = None) -> dict[str, str]:
        """Log the student in the active run as an MLflow model from code (`workflows/mlflow_student.py`
        + its safetensors weights + {factory, kwargs}: loading it unpickles nothing) and register a
        new version, aliased `champion`. `code`: the config's user modules, for user factories."""
        import mlflow.pyfunc

        with tempfile.TemporaryDirectory() as tmp:
            w, s = Path(tmp) / "model.safetensors", Path(tmp) / "model.json"
            w.write_bytes(Loc.of(weights).read_bytes())
            s.write_text(json.dumps(spec, default=str))
            info = mlflow.pyfunc.log_model(
                name="student", python_model=str(Path(__file__).with_name("mlflow_student.py")),
                artifacts={"weights": str(w), "spec": str(s)}, input_example=input_example,
                code_paths=[str(c) for c in code or []] or None, registered_model_name=name)
        version = str(info.registered_model_version)
        self.client.set_registered_model_alias(name, "champion", version)
        return {"name": name, "version": version, "model_uri": f"models:/{name}/{version}"}
