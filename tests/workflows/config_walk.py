"""Follow the config of a `kd run` through the project's files as a reader would: every call from
one project file into a function of another that is handed the config (the `RunConfig`, or an
object holding it as `.cfg`), seen once per call site (a loop or a second epoch adds nothing).

- A **climb** is a call into a file that is already on the call stack below the caller: code
  going back up to a file that called it (a callback, or a lower module calling its caller).
- A **return** is a call into a file the walk had already entered and left, which is not on the
  stack: the reader opens a file they have already read a part of.

Only the driver's threads are followed (Ray workers run in other processes); files outside
`roots` (Ray, MLflow, the standard library) are looked through, not counted.
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
        args = [frame.f_locals.get(a) for a in code.co_varnames[:n]]
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
        stack = set()
        while up is not None:
            if (f := self._file(up.f_code)) is not None:
                stack.add(f)
            up = up.f_back
        key = (caller, caller_line, callee, frame.f_code.co_name)
        with self._lock:
            self.calls.add(key)
            if callee in stack - {caller}:
                self.climbs.add(key)
            elif callee in self.entered and key not in self.climbs:
                self.returns.add(key)
            if callee not in self.entered:
                self.entered.append(callee)

    def __enter__(self) -> "Walk":
        threading.setprofile(self._profile)
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(None)
        threading.setprofile(None)

    def report(self) -> str:
        def lines(keys):
            return "\n".join(f"  {a}:{n} -> {b}:{fn}" for a, n, b, fn in sorted(keys))
        return (f"{len(self.entered)} files entered, {len(self.climbs)} climbs back up to a caller's file, "
                f"{len(self.returns)} returns to a file already left\nclimbs:\n{lines(self.climbs)}\n"
                f"returns:\n{lines(self.returns)}")
