"""The walk that follows a run's config (config_walk.Walk) sees a callback: a function handed down
whose closure holds the config, called back by a lower file, directly or from a thread that file
started, is a climb back up to the file that handed it down."""
from __future__ import annotations

import importlib
import sys
import textwrap
from dataclasses import dataclass

import pytest

from config_walk import Walk


@dataclass
class Cfg:
    name: str = "c"


LOWER = '''
import threading

def run_all(fn, items, threads):
    if not threads:
        return [fn(i) for i in items]
    out = [None] * len(items)
    def one(k):
        out[k] = fn(items[k])
    ts = [threading.Thread(target=one, args=(k,)) for k in range(len(items))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out
'''

STAGE = '''
from walk_lower import run_all

def stage(cfg, threads):
    def fit(i):  # handed an int: the config comes with the closure
        return (cfg.name, i)
    return run_all(fit, [1, 2], threads)

def no_callback(cfg):
    return run_all(len, ["ab"], False)
'''


@pytest.mark.parametrize("threads", [False, True])
def test_a_callback_that_holds_the_config_is_a_climb(tmp_path, monkeypatch, threads):
    (tmp_path / "walk_lower.py").write_text(textwrap.dedent(LOWER))
    (tmp_path / "walk_stage.py").write_text(textwrap.dedent(STAGE))
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in ("walk_lower", "walk_stage"):
        sys.modules.pop(m, None)
    stage = importlib.import_module("walk_stage")
    with Walk([tmp_path], Cfg) as walk:
        assert stage.stage(Cfg(), threads) == [("c", 1), ("c", 2)]
        stage.no_callback(Cfg())
    name = tmp_path.name
    assert {(a, b, fn) for a, _, b, fn in walk.climbs} == {(f"{name}/walk_lower.py", f"{name}/walk_stage.py", "fit")}
