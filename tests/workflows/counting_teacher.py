"""A teacher that records every construction and forward pass to the file named by
$KD_TEST_COUNTER (from any Ray worker process), so tests can prove when no teacher runs."""
import os

from kd_ops.models import CNN1D


def _tick(what: str) -> None:
    path = os.environ.get("KD_TEST_COUNTER")
    if path:
        with open(path, "a") as f:
            f.write(f"{what} {os.getpid()}\n")


class CountingCNN(CNN1D):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        _tick("init")

    def forward(self, x):
        _tick("forward")
        return super().forward(x)


def make(**kwargs) -> CountingCNN:
    return CountingCNN(**kwargs)


def count(path) -> int:
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0
