"""`ray job submit` for real: a local head (`ray start --head` on 127.0.0.1 in a temp dir, stopped by
the test), a small `kd run` submitted with a working directory holding its config and user code."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

import counting_teacher
from conftest import HERE, _free_port, tiny_config
from test_data_plane import _env
from kd_ops import models

RAY = str(Path(sys.executable).parent / "ray")


def _of_cluster(proc: Path, temp: str, client_port: str) -> bool:
    """Whether a process belongs to the head started in `temp`: by its command line (the client
    server by its port), or by the log files it holds open there (Ray's agents rename themselves,
    e.g. `ray::DashboardAgent`, and a missed one lives on, orphaned, taking CPU from later tests)."""
    cmdline = (proc / "cmdline").read_bytes()
    if temp.encode() in cmdline or (b"ray.util.client.server" in cmdline and f"--port={client_port}".encode() in cmdline):
        return True
    for fd in (proc / "fd").iterdir():
        try:
            if os.readlink(fd).startswith(temp):
                return True
        except OSError:
            pass
    return False


def _stop_cluster(temp: str, client_port: str) -> None:
    """Stop only this head's processes (`ray stop` would stop every Ray on the machine)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and int(d.name) != os.getpid() and _of_cluster(d, temp, client_port):
                    os.kill(int(d.name), sig)
            except OSError:
                pass
        time.sleep(2)
    left = [d.name for d in Path("/proc").iterdir() if d.name.isdigit() and _alive_in(d, temp, client_port)]
    assert not left, f"processes of the job-submit head still alive: {left}"


def _alive_in(proc: Path, temp: str, client_port: str) -> bool:
    try:
        return int(proc.name) != os.getpid() and _of_cluster(proc, temp, client_port) and b"zombie" not in (
            proc / "status").read_bytes().lower()
    except OSError:  # gone while looking
        return False


def _cmdline(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_ray_job_submit_runs_a_kd_run_with_working_dir_and_user_code(tmp_path):
    temp = tempfile.mkdtemp(prefix="kdjob-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard = _free_port()
    env = _env()
    env.pop("PYTHONPATH")  # the job gets its code from its working dir and the config's `code`, nothing else
    env["PYTHONPATH"] = str(HERE.parent.parent)
    # every port of its own: the session's Ray (and others) already hold the defaults, and a job agent
    # that cannot bind its port leaves the head answering "No available agent to submit job"
    ports = [f"--{name}={_free_port()}" for name in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port",
                                                     "node-manager-port", "object-manager-port",
                                                     "ray-client-server-port")]
    start = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", *ports,
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}",
                            "--num-cpus=2", "--disable-usage-stats"], env=env, capture_output=True, text=True,
                           timeout=180)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        work = tmp_path / "job"
        work.mkdir()
        shutil.copy(HERE / "counting_teacher.py", work / "user_teachers.py")
        cfg = yaml.safe_load(tiny_config(tmp_path).read_text())
        # its weights beside the config in the working dir (a relative path): the job trains no teacher
        models.save_weights(counting_teacher.make(**cfg["teachers"][0]["kwargs"]), work / "teacher.safetensors")
        cfg["teachers"] = [cfg["teachers"][0] | {"factory": "user_teachers:make", "weights": "teacher.safetensors"}]
        cfg |= {"code": ["user_teachers.py"], "tune": {"enabled": False},
                "train": {"fit": {"epochs": 1}, "label_only_fit": {"epochs": 1}}}
        (work / "job.yaml").write_text(yaml.safe_dump(cfg))
        out, db = tmp_path / "out", tmp_path / "mlflow.db"
        argv = [RAY, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--submission-id", "kd-test-job",
                "--working-dir", str(work), "--no-wait", "--runtime-env-json",
                json.dumps({"env_vars": {"RAY_AUTH_MODE": "disabled"}}), "--",
                sys.executable, "-m", "workflows.cli", "run", "job.yaml", "--out", str(out),
                "--tracking-uri", f"sqlite:///{db}", "--ray-address", "auto"]
        deadline = time.time() + 180
        while True:  # the head's job agent starts a little after `ray start` returns (longer on a loaded machine)
            submit = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
            if submit.returncode == 0 or "No available agent" not in submit.stderr + submit.stdout \
                    or time.time() > deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        # the job server's REST API for the status (the CLI's wording of a finished job varies), the
        # CLI for the logs, in a process of its own: this test process is connected to the session's Ray
        job = ["job", f"--address=http://127.0.0.1:{dashboard}"]
        deadline, status, answer = time.time() + 600, "", ""
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/jobs/kd-test-job", timeout=30) as r:
                    answer = r.read().decode()
                status = json.loads(answer).get("status", "")
            except (OSError, ValueError) as e:
                answer = repr(e)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(3)
        q = subprocess.run([RAY, job[0], "logs", job[1], "kd-test-job"], env=env, capture_output=True, text=True,
                           timeout=60)
        logs = q.stdout + q.stderr
        entry = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p).count("job.yaml")]
        assert status == "SUCCEEDED", (f"last status answer: {answer[-1500:]}\nentrypoint processes alive: "
                                       f"{[(p.name, _cmdline(p)[:200]) for p in entry]}\nlogs: {logs[-3000:]}")
    finally:
        _stop_cluster(temp, ports[-1].split("=")[1])
        shutil.rmtree(temp, ignore_errors=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["name"] == "tiny" and [t["name"] for t in summary["teachers"]] == ["t1"]
    assert 0 <= summary["student"]["test_accuracy"] <= 1 and summary["student"]["params"] > 0
    assert "==> student" in logs
