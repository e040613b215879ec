"""A student factory for the kill-during-tune test: the built-in CNN, 0.2 s slower per training
batch, so a search lasts long enough to be killed between its trials whatever the machine."""
import time

from kd_ops.models import CNN1D


class SlowCNN(CNN1D):
    def forward(self, x):
        if self.training:
            time.sleep(0.2)
        return super().forward(x)


def make(**kwargs) -> SlowCNN:
    return SlowCNN(**kwargs)
