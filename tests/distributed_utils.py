"""Run a function on W gloo ranks (torch.multiprocessing), the way the tests compare world sizes."""

import os
import socket
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, timeout, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    extra = {"timeout": timedelta(seconds=timeout)} if timeout else {}
    dist.init_process_group("gloo", rank=rank, world_size=world_size, **extra)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args, timeout: float | None = None) -> None:
    """fn(rank, world_size, *args) on each rank; `fn` must be a module-level function. `timeout` (seconds):
    a rank stuck in a collective fails after it instead of hanging."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), timeout, args), nprocs=world_size, join=True)


def average_over_ranks(tensors) -> None:
    """In place, what the engine (or DDP) does to gradients: the mean over ranks (nothing on one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)
            t /= dist.get_world_size()
