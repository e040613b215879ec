"""A teacher that records every construction and forward pass (with its row count) to the file
named by $KD_TEST_COUNTER (from any Ray worker process), so tests can prove when no teacher runs
and count the rows it ran. `delay` seconds per forward pass keep a run alive long enough to kill."""
import os
import time

from kd_ops.models import CNN1D


def _tick(what: str) -> None:
    path = os.environ.get("KD_TEST_COUNTER")
    if path:
        with open(path, "a") as f:
            f.write(f"{what} {os.getpid()}\n")


class CountingCNN(CNN1D):
    def __init__(self, delay: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay
        _tick("init")

    def forward(self, x):
        _tick(f"forward {len(x)}")
        if self.delay:
            time.sleep(self.delay)
        return super().forward(x)


def make(**kwargs) -> CountingCNN:
    return CountingCNN(**kwargs)


def count(path) -> int:
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0


def rows(path) -> list[int]:
    """Rows of every forward pass recorded so far."""
    if not os.path.exists(path):
        return []
    return [int(line.split()[1]) for line in open(path).read().splitlines() if line.startswith("forward")]
