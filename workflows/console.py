"""A quiet, informative console: kd-ops' own lines (one per stage, progress with ETA, warnings,
the final table) on the terminal; everything else — Ray, Train, Tune and Ray Data output, worker
logs streamed to the driver, C++ core warnings — in `<out>/logs/kd.log`.

The redirect is at the file-descriptor level (dup2 of the log file onto 1 and 2), so output that
bypasses Python's sys.stdout (Ray's core worker, child processes) lands in the log file too; the
console writes to a duplicate of the original stdout. `--verbose` skips the redirect and streams
everything, as Ray does by default.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TextIO

from kd_ops.fsio import Loc

log = logging.getLogger("kd")

_state: dict = {"out": None, "err": None, "log": None, "upload": None, "saved": None, "handler": None}


def out() -> TextIO:
    """Where kd-ops' own lines go: the terminal (or the original stdout), never the log file."""
    return _state["out"] or sys.stdout


def err() -> TextIO:
    return _state["err"] or sys.stderr


def say(line: str) -> None:
    print(line, file=out(), flush=True)


def _keep(stream: TextIO, fd: int) -> TextIO:
    """A handle on what `stream` writes to now: a duplicate of `fd` when the stream is that fd,
    else the stream itself (e.g. pytest's capture object)."""
    try:
        if stream.fileno() == fd:
            return os.fdopen(os.dup(fd), "w", buffering=1)
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
        pass
    return stream


def setup(out_dir: Loc | str | None, verbose: bool) -> Path | None:
    """Send everything but kd-ops' own lines to `<out_dir>/logs/kd.log` (a local file, uploaded at
    `restore` when --out is object storage); returns the log file, or None with `verbose`."""
    if verbose or _state["out"] is not None:
        return None
    out_loc = Loc.of(out_dir) if out_dir is not None else None
    if out_loc is not None and out_loc.local:
        path = Path(out_loc.path) / "logs" / "kd.log"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None  # --out itself is bad: the command reports it (layout.Layout.make)
    else:
        path = Path(tempfile.mkdtemp(prefix="kd-logs-")) / "kd.log"
        _state["upload"] = (out_loc / "logs" / "kd.log") if out_loc is not None else None
    sys.stdout.flush()
    sys.stderr.flush()
    _state.update(out=_keep(sys.stdout, 1), err=_keep(sys.stderr, 2), log=path, saved=(os.dup(1), os.dup(2)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    handler = logging.StreamHandler(_state["out"])
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(lambda r: r.name == "kd" or r.name.startswith("kd."))
    root = logging.getLogger()
    _state["handler"] = handler
    root.addHandler(handler)  # kd's records: here and, through basicConfig's handler (fd 2), in the log file
    say(f"kd: Ray, Train and Tune output goes to {path} (--verbose streams it)")
    return path


def restore() -> None:
    """Put stdout and stderr back (in-process callers, tests) and upload the log file when --out
    is object storage."""
    if _state["saved"] is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    if _state["upload"] is not None:
        try:
            _state["upload"].write_bytes(Path(_state["log"]).read_bytes())
        except OSError as e:
            log.warning("could not upload the log file to %s: %s", _state["upload"], e)
    for saved, fd in zip(_state["saved"], (1, 2)):
        os.dup2(saved, fd)
        os.close(saved)
    logging.getLogger().removeHandler(_state["handler"])
    _state.update(out=None, err=None, log=None, upload=None, saved=None, handler=None)


def progress(label: str, unit: str, every_s: float = 10.0) -> Callable[[int, int], None]:
    """update(done, total): `label: done/total unit (pct, ETA)`. On a terminal one line rewritten
    in place (then left as the final line); elsewhere a line at most every `every_s` seconds and
    at the end."""
    start, last, tty = time.perf_counter(), [0.0], out().isatty()

    def update(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] < (0.2 if tty else every_s) and done < total:
            return
        last[0] = now
        rate = done / max(now - start, 1e-9)
        eta = f", ETA {(total - done) / rate:.0f} s" if 0 < done < total and rate > 0 else ""
        text = f"{label}: {done:,}/{total:,} {unit} ({100 * done / max(total, 1):.0f}%{eta}, {now - start:.0f} s)"
        if tty:
            print("\r\033[K" + text, end="\n" if done >= total else "", file=out(), flush=True)
        else:
            say(text)
    return update
