"""A one-worker fit's cached dataset served from memory: every row once per epoch, a new seeded
permutation each epoch for training, the read order for validation."""
import numpy as np
import torch

from workflows.in_memory import InMemory


def _epoch(shard, seed, batch=128):
    return list(shard.iter_torch_batches(batch_size=batch, device="cpu", local_shuffle_seed=seed))


def test_training_rows_come_once_per_epoch_in_a_new_seeded_order(ray_session):
    ds = ray_session.data.from_items([{"id": i, "x": np.array([i, -i], np.float32)} for i in range(1000)],
                                     override_num_blocks=7).materialize()
    shard = InMemory(ds, shuffle=True)
    one, two, again = _epoch(shard, 1), _epoch(shard, 2), _epoch(InMemory(ds, shuffle=True), 1)
    assert [len(b["id"]) for b in one] == [128] * 7 + [1000 - 7 * 128]
    ids = [torch.cat([b["id"] for b in e]).numpy() for e in (one, two, again)]
    assert all(sorted(i.tolist()) == list(range(1000)) for i in ids)
    assert not np.array_equal(ids[0], ids[1]) and np.array_equal(ids[0], ids[2])
    # x travels with its id
    assert all(torch.equal(b["x"][:, 0].long(), b["id"]) and b["x"].dtype == torch.float32 for b in one)


def test_validation_rows_keep_the_order_read(ray_session):
    ds = ray_session.data.from_items([{"id": i} for i in range(300)], override_num_blocks=3).materialize()
    shard = InMemory(ds, shuffle=False)
    first = torch.cat([b["id"] for b in _epoch(shard, 1, 64)]).numpy()
    second = torch.cat([b["id"] for b in _epoch(shard, 2, 64)]).numpy()
    assert np.array_equal(first, second) and sorted(first.tolist()) == list(range(300))
