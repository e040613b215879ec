"""Follow the config of a `kd run` through the project's files as a reader would: every call from
one project file into a function of another that is handed the config (the `RunConfig`, or an
object holding it as `.cfg`), seen once per call site (a loop or a second epoch adds nothing).

- A **climb** is a call into a file that is already on the call stack below the caller: code
  going back up to a file that called it (a callback, or a lower module calling its caller).
- A **return** is a call into a file the walk had already entered and left, which is not on the
  stack: the reader opens a file they have already read a part of.

A callback counts too: a function handed down whose closure holds the config (e.g. a fit a stage
hands to `concurrent_fits.run_all`) is handed it like an argument, and a thread started by a
project file carries on that file's stack, so the lower file calling back into the stage that
started it is a climb.

Only the driver's main thread and the threads project code starts are followed (Ray workers run
in other processes; threads Ray, MLflow or Tune start, e.g. Ray Data's executor, run their own
code: following them only slows the run); files outside `roots` (Ray, MLflow, the standard
library) are looked through, not counted.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Walk:
    roots: list[Path]
    carries: type                                                       # the config's type
    climbs: set[tuple[str, int, str, str]] = field(default_factory=set)   # (caller file, line, callee file, function)
    returns: set[tuple[str, int, str, str]] = field(default_factory=set)
    calls: set[tuple[str, int, str, str]] = field(default_factory=set)
    entered: list[str] = field(default_factory=list)                    # files in the order first entered
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self._roots = tuple(str(r.resolve()) + "/" for r in self.roots)
        self._base = str(Path(self.roots[0]).resolve().parent) + "/"
        self._mine: dict[str, str | None] = {}

    def _file(self, code) -> str | None:
        f = code.co_filename
        if f not in self._mine:
            self._mine[f] = f[len(self._base):] if f.startswith(self._roots) else None
        return self._mine[f]

    def _handed_config(self, frame) -> bool:
        code = frame.f_code
        n = code.co_argcount + code.co_kwonlyargcount
        names = [*code.co_varnames[:n], *code.co_freevars]  # arguments, and what a closure captured
        args = [frame.f_locals.get(a) for a in names]
        return any(isinstance(a, self.carries) or isinstance(getattr(a, "cfg", None), self.carries)
                   for a in args if a is not None and not isinstance(a, (str, int, float, bool)))

    def _profile(self, frame, event, arg):
        if event != "call":
            return
        callee = self._file(frame.f_code)
        if callee is None or not self._handed_config(frame):
            return
        up, caller, caller_line = frame.f_back, None, 0
        while up is not None and caller is None:  # the nearest project frame above
            caller, caller_line = self._file(up.f_code), up.f_lineno
            up = up.f_back if caller is None else up
        if caller is None or caller == callee:
            if caller is None and callee not in self.entered:
                self.entered.append(callee)
            return
        stack = self._stack(up) | self._started_from.get(threading.current_thread(), set())
        key = (caller, caller_line, callee, frame.f_code.co_name)
        with self._lock:
            self.calls.add(key)
            if callee in stack - {caller}:
                self.climbs.add(key)
            elif callee in self.entered and key not in self.climbs:
                self.returns.add(key)
            if callee not in self.entered:
                self.entered.append(callee)

    def _stack(self, frame) -> set[str]:
        files = set()
        while frame is not None:
            if (f := self._file(frame.f_code)) is not None:
                files.add(f)
            frame = frame.f_back
        return files

    def __enter__(self) -> "Walk":
        # a thread a project file starts is followed, and keeps that file's stack
        self._started_from: dict[threading.Thread, set[str]] = {}
        self._start, walk = threading.Thread.start, self

        def start(thread, *a, **kw):
            caller = sys._getframe(1)
            if walk._file(caller.f_code) is not None:
                walk._started_from[thread] = walk._stack(caller) | walk._started_from.get(threading.current_thread(), set())
                run = thread.run

                def followed():
                    sys.setprofile(walk._profile)
                    try:
                        run()
                    finally:
                        sys.setprofile(None)
                thread.run = followed
            return walk._start(thread, *a, **kw)

        threading.Thread.start = start
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(None)
        threading.Thread.start = self._start

    def report(self) -> str:
        def lines(keys):
            return "\n".join(f"  {a}:{n} -> {b}:{fn}" for a, n, b, fn in sorted(keys))
        return (f"{len(self.entered)} files entered, {len(self.climbs)} climbs back up to a caller's file, "
                f"{len(self.returns)} returns to a file already left\nclimbs:\n{lines(self.climbs)}\n"
                f"returns:\n{lines(self.returns)}")
