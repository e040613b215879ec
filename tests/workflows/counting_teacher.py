"""A teacher that records every construction and forward pass (with its row count) to the file
named by $KD_TEST_COUNTER (from any Ray worker process), so tests can prove when no teacher runs
and count the rows it ran. `delay` seconds per forward pass keep a run alive long enough to kill."""
import os
import time

from kd_ops.models import CNN1D


def _tick(what: str) -> None:
    """One line: what, pid, Ray node id (`-` outside Ray)."""
    path = os.environ.get("KD_TEST_COUNTER")
    if path:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"
        with open(path, "a") as f:
            f.write(f"{what} {os.getpid()} {node}\n")


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


def nodes(path, what: str = "forward", not_pid: int | None = None) -> list[str]:
    """The Ray node id of every `what` line recorded so far (except those of process `not_pid`)."""
    if not os.path.exists(path):
        return []
    lines = [line.split() for line in open(path).read().splitlines() if line.startswith(what)]
    return [p[-1] for p in lines if int(p[-2]) != not_pid]


def rows(path) -> list[int]:
    """Rows of every forward pass recorded so far."""
    if not os.path.exists(path):
        return []
    return [int(line.split()[1]) for line in open(path).read().splitlines() if line.startswith("forward")]
