"""Benchmarks have the console `kd run` has: kd-ops' own lines (stages, progress with an ETA) on the
terminal, Ray's output in the bench's log file, and with --json one JSON object as the last line."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from test_data_plane import _env


def test_kd_bench_ingest_shows_progress_keeps_ray_output_in_its_log_and_ends_with_json(tmp_path):
    p = subprocess.run([sys.executable, "-m", "workflows.cli", "bench", "ingest", "--store-gb", "0.01",
                        "--rows-per-file", "2048", "--batch-size", "256", "--memory-rows", "4096",
                        "--student-width", "4", "--json"],
                       env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["store_fed_rows"] == result["rows"] > 0 and result["store_fed_over_in_memory"] > 0
    log = tmp_path / "runs" / "bench-ingest" / "logs" / "kd.log"
    assert lines[0] == f"kd: Ray, Train and Tune output goes to {log} (--verbose streams it)"
    assert any(line.startswith("==> building a 0.01 GB synthetic store") for line in lines)
    assert any(re.match(r"store: \d+/\d+ input files \+ shards \(100%", line) for line in lines), lines
    assert any(line.startswith("==> store-fed fit:") for line in lines)
    assert "\x1b[" not in p.stdout and "(pid=" not in p.stdout  # Ray's worker lines stay out of stdout
    assert log.stat().st_size > 0
