"""Gathered InfoNCE at world size 2 (gloo, CPU): after one backward and DDP-style gradient averaging,
the parameter gradients equal those of one process on the concatenated batch (METHODS.md's test)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from distributed_utils import average_over_ranks
from pipeline.losses import gathered_info_nce

WORLD = 2
LOCAL = 6  # images per rank
DIM_IN, DIM = 12, 16


def _data(seed: int = 0):
    """Global data, identical on every rank: two views, partner mixing weights and a queue."""
    g = torch.Generator().manual_seed(seed)
    views = torch.randn(2, WORLD * LOCAL, DIM_IN, generator=g)
    lam = torch.rand(WORLD * LOCAL, generator=g)
    queue = F.normalize(torch.randn(9, DIM, generator=g), dim=1)
    return views, lam, queue


def _encoder() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(DIM_IN, 32), torch.nn.GELU(), torch.nn.Linear(32, DIM))


def _loss(method: str, encoder, views, lam, queue, rank: int, world: int):
    """One method's loss on the rows of `rank` (world=1: the whole batch in one process).

    Global row r·B + i of the batch belongs to rank r; targets address keys in that (gathered) order.
    """
    rows = views.shape[1] // world
    own = slice(rank * rows, (rank + 1) * rows)
    encode = lambda x: F.normalize(encoder(x), dim=1)  # noqa: E731
    z1, z2 = encode(views[0, own]), encode(views[1, own])
    base = rank * rows
    if method == "cross-view":  # SimCLR/MoCo v3 style: view-1 queries against gathered view-2 keys
        return gathered_info_nce(z1, z2, 0.2)
    if method == "NT-Xent":  # both views as anchors and keys, own similarity masked
        z = torch.cat([z1, z2])
        local = torch.arange(2 * rows)
        targets = (local + rows) % (2 * rows) + 2 * base
        return gathered_info_nce(z, z, 0.5, targets=targets, mask_self=True)
    if method == "soft targets + queue":  # SDMP: partner p(i) = B - 1 - i within each rank's batch of B
        with torch.no_grad():
            keys = encode(views[1, own])  # keys without gradient, like a momentum encoder's
        batch_rows = torch.arange(rows) + base
        partners = batch_rows // LOCAL * LOCAL + LOCAL - 1 - batch_rows % LOCAL
        targets = torch.stack([batch_rows, partners], 1)
        weights = torch.stack([lam[own], 1 - lam[own]], 1)
        return gathered_info_nce(z1, keys, 0.2, targets=targets, target_weights=weights, queue=queue)
    raise ValueError(method)


METHODS = ("cross-view", "NT-Xent", "soft targets + queue")


def _gradients(method: str, rank: int, world: int):
    encoder = _encoder()
    loss = _loss(method, encoder, *_data(), rank, world)
    loss.backward()
    grads = [p.grad for p in encoder.parameters()]
    loss = loss.detach().clone()
    average_over_ranks([*grads, loss])
    return loss, grads


def _worker(rank: int, init_file: str, expected: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for method in METHODS:
            loss, grads = _gradients(method, rank, WORLD)
            expected_loss, expected_grads = expected[method]
            torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0, msg=f"{method}: loss")
            for got, want in zip(grads, expected_grads):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=f"{method}: gradients on rank {rank}")
    finally:
        dist.destroy_process_group()


def test_gradients_equal_one_process_on_the_concatenated_batch(tmp_path):
    # This process has no process group: gathered_info_nce is its single-process twin here.
    expected = {method: _gradients(method, 0, 1) for method in METHODS}
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), expected), nprocs=WORLD, join=True)
