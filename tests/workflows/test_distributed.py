"""Data-parallel training on two Ray Train workers (gloo, 1 CPU each): the loss is normalised by
the global row (classification) or token (LM) count, so gradients over an uneven split of a batch
equal the one-process gradient of the whole batch. (The fits themselves: test_pipeline and
test_lm_pipeline run 1- and 2-worker fits on the streamed store.)"""
from __future__ import annotations

import ray.train
import ray.train.torch
import torch
from safetensors.torch import load_file, save_file

from kd_ops import lm, models
from kd_ops.method_loss import Distill
from workflows import worker
from workflows.loop import Loop

ROWS = 8
SPLIT = [(0, 6), (6, 8)]  # uneven: with per-worker means the 2 rows of rank 1 would weigh as much as rank 0's 6


def _case(task: str):
    """(model, a batch of ROWS, loop, teacher weights), the same on every process."""
    torch.manual_seed(0)
    if task == "classification":
        model = models.cnn(width=4)
        batch = {"x": torch.randn(ROWS, 40), "y": torch.randint(0, 10, (ROWS,)), "logits": torch.randn(ROWS, 2, 10)}
        loop = Loop(factory="kd_ops.models:cnn", kwargs={"width": 4}, epochs=1, batch_size=ROWS, lr=1e-3,
                    weight_decay=0.0, seed=0, train_rows=ROWS,
                    distill=Distill((0.5, 0.5), temperature=2.0, alpha=0.5))
    else:
        model = lm.new_causal_lm(32, 8, 1, 16, 2).eval()  # no dropout: the same function on every process
        batch = {"x": torch.randint(0, 32, (ROWS, 8)), "logits": torch.randn(ROWS, 1, 8, 32)}
        loop = Loop(factory="kd_ops.lm:new_causal_lm", kwargs={}, epochs=1, batch_size=ROWS, lr=1e-3,
                    weight_decay=0.0, seed=0, train_rows=ROWS, task="lm",
                    distill=Distill((1.0,), temperature=2.0, alpha=0.5))
    return model, batch, loop, torch.tensor(loop.distill.teacher_weights)


def _gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in models.unwrap(model).named_parameters() if p.grad is not None}


def _ddp_worker(config):
    rank = ray.train.get_context().get_world_rank()
    lo, hi = SPLIT[rank]
    for task in ("classification", "lm"):
        model, batch, loop, weights = _case(task)
        ddp = ray.train.torch.prepare_model(model)  # DistributedDataParallel: gradients averaged over workers
        loss, rows = worker._losses(ddp, {k: v[lo:hi] for k, v in batch.items()}, loop, weights)
        loss.backward()
        assert rows == hi - lo
        if rank == 0:
            save_file(_gradients(ddp), f"{config['out']}/{task}.safetensors")


def test_ddp_gradients_over_an_uneven_split_equal_the_whole_batch_gradient(ray_session, tmp_path):
    ray.train.torch.TorchTrainer(
        _ddp_worker, train_loop_config={"out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="ddp-gradients", storage_path=str(tmp_path / "ray")),
    ).fit()
    for task in ("classification", "lm"):
        model, batch, loop, weights = _case(task)
        loss, _ = worker._losses(model, batch, loop, weights)  # one process, the whole batch
        loss.backward()
        whole, ddp = _gradients(model), load_file(tmp_path / f"{task}.safetensors")
        assert whole.keys() == ddp.keys() and whole
        for name, g in whole.items():
            torch.testing.assert_close(ddp[name], g, rtol=1e-4, atol=1e-6, msg=f"{task} {name}")
