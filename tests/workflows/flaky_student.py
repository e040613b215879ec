"""A student factory for Tune failure tests: width 5 always raises; any other width raises on
the very first build in this test session (the marker file named by $KD_TEST_FLAKY), then builds."""
import os

from kd_ops.models import CNN1D


def make(width: int, **kwargs) -> CNN1D:
    if width == 5:
        raise ValueError("flaky_student: width 5 always fails")
    marker = os.environ["KD_TEST_FLAKY"]
    try:
        with open(marker, "x") as f:  # the first build anywhere creates it and fails
            f.write(f"{os.getpid()}\n")
    except FileExistsError:
        return CNN1D(width=width, **kwargs)
    raise RuntimeError("flaky_student: the first attempt fails")
