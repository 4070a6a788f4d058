"""World size W against one process: gradients, ShuffleBN, and the MoCo queue under ZeRO-2 and resume."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from distributed_utils import average_over_ranks, spawn
from pipeline import checkpoint
from pipeline.distributed import shuffle_across_ranks, shuffled_order, unshuffle_across_ranks
from pipeline.methods import build_method

GLOBAL_BATCH = 8


def assert_close_norm(got: torch.Tensor, expected: torch.Tensor, name: str, rel: float = 1e-5) -> None:
    """Relative error of the whole tensor: summation order across ranks moves single tiny entries."""
    error = (got - expected).norm() / expected.norm().clamp_min(1e-12)
    assert error <= rel, f"{name}: relative error {error:.2e}"


def global_views(seed: int, sizes=(16, 16)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(GLOBAL_BATCH, 3, size, size, generator=g) for size in sizes]


def local(views, rank, world):
    rows = GLOBAL_BATCH // world
    return [v[rank * rows : (rank + 1) * rows] for v in views]


FEATURE_AUG = "method.feature_aug={prototypes: 4, heads: 2, memory: 32}"
MULTICROP = "data.views=[{size: 32}, {size: 32}, {size: 16}, {size: 16}]"  # 2 global + 2 local views


def one_step_gradients(name: str, rank: int = 0, world: int = 1, *extra: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the same initial weights on every rank
    cfg = tiny_config(name, *extra)
    method = build_method(cfg)
    if method.contrast_keys.cfg is not None:  # give the attention weights a non-trivial start
        with torch.no_grad():
            for p in method.contrast_keys.attention.parameters():
                p.add_(0.1 * torch.randn_like(p))
    loss, _ = method(local(global_views(1, [r.size for r in cfg.data.view_recipes()]), rank, world))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    average_over_ranks(grads.values())
    return grads


def _gradients_worker(rank, world, name, out, *extra):
    grads = one_step_gradients(name, rank, world, *extra)
    if rank == 0:
        save_file(grads, out)


@pytest.mark.parametrize(
    "world, name, extra",
    [(2, "simclr", ()), (4, "simclr", ()), (2, "mocov3", ()), (4, "mocov3", ()),
     (2, "simclr", (FEATURE_AUG,)), (2, "mocov3", (FEATURE_AUG,)), (2, "simclr", (MULTICROP,)), (2, "mocov3", (MULTICROP,))],
    ids=["simclr-2", "simclr-4", "mocov3-2", "mocov3-4", "simclr-feature_aug-2", "mocov3-feature_aug-2",
         "simclr-multicrop-2", "mocov3-multicrop-2"],
)
def test_gradients_equal_one_process_on_the_whole_batch(tmp_path, world, name, extra):
    spawn(_gradients_worker, world, name, str(tmp_path / "grads.safetensors"), *extra)
    got, expected = load_file(tmp_path / "grads.safetensors"), one_step_gradients(name, 0, 1, *extra)
    assert got.keys() == expected.keys() and len(expected) > 10
    for key in expected:
        assert_close_norm(got[key], expected[key], key)


def _shuffle_worker(rank, world, out):
    x = torch.arange(GLOBAL_BATCH, dtype=torch.float32)[:, None] * 10
    mine = x[rank * 4 : (rank + 1) * 4]
    perm = shuffled_order(GLOBAL_BATCH, mine.device, torch.Generator().manual_seed(rank))  # rank 0's wins
    shuffled = shuffle_across_ranks(mine, perm)
    back = unshuffle_across_ranks(shuffled + 1, perm)
    save_file({"perm": perm, "shuffled": shuffled, "back": back}, f"{out}-{rank}.safetensors")


def test_shuffle_across_ranks_round_trips(tmp_path):
    spawn(_shuffle_worker, 2, str(tmp_path / "s"))
    r0, r1 = (load_file(tmp_path / f"s-{r}.safetensors") for r in range(2))
    assert torch.equal(r0["perm"], r1["perm"])
    assert torch.equal(torch.cat([r0["shuffled"], r1["shuffled"]])[:, 0], r0["perm"].float() * 10)
    assert torch.equal(torch.cat([r0["back"], r1["back"]])[:, 0], torch.arange(8.0) * 10 + 1)


# --- the MoCo v2 queue under ZeRO-2 ----------------------------------------------------------------------


def mocov2_engine(world: int, optimizer: str, load: Path | None = None):
    import deepspeed

    from pipeline.train import deepspeed_config

    torch.manual_seed(0)
    cfg = tiny_config("mocov2", "engine.zero_stage=2", f"data.batch_size={GLOBAL_BATCH // world}", f"optim.name={optimizer}")
    method = build_method(cfg)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3) if optimizer == "adamw" else torch.optim.SGD(params, lr=0.5, momentum=0.9)
    ds, module_only = deepspeed_config(cfg), False
    if load is not None:
        load, module_only = checkpoint.plan_reshard(load, cfg, dist.get_rank())
        if not module_only:
            ds["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=method, optimizer=opt, config=ds)
    return cfg, method, engine, load, module_only


def train_steps(engine, method, rank, world, steps, first=0):
    for t in range(first, first + steps):
        loss, _ = engine(local(global_views(t), rank, world))
        engine.backward(loss)
        engine.step()
        method.after_step(0.0)


def state(method) -> dict[str, torch.Tensor]:
    return {"queue": method.queue.keys.clone(), "position": method.queue.position.clone(),
            "weight": method.projector[0].weight.detach().clone()}


def _queue_worker(rank, world, steps, optimizer, out):
    cfg, method, engine, *_ = mocov2_engine(world, optimizer)
    train_steps(engine, method, rank, world, steps)
    save_file(state(method), f"{out}/w{world}-r{rank}.safetensors")
    if world == 2:
        meta = {"world_size": world, "fingerprint": checkpoint.fingerprint(method, cfg)}
        checkpoint.save(engine, Path(out) / "ckpt", steps, rank, {"data": None}, meta, None, keep=1)
    else:
        train_steps(engine, method, rank, world, 1, first=steps)
        save_file(state(method), f"{out}/w{world}-plus1-r{rank}.safetensors")


def _resume_worker(rank, world, steps, optimizer, out):
    path = checkpoint.complete_checkpoints(Path(out) / "ckpt")[-1]
    cfg, method, engine, source, module_only = mocov2_engine(world, optimizer, load=path)
    engine.load_checkpoint(str(source), tag=path.name, load_lr_scheduler_states=False, load_module_only=module_only)
    if not module_only:
        checkpoint.restore_untrained_state(engine.module, path)
    save_file(state(method), f"{out}/resumed-r{rank}.safetensors")
    train_steps(engine, method, rank, world, 1, first=steps)
    save_file(state(method), f"{out}/resumed-plus1-r{rank}.safetensors")


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_queue_is_the_same_on_every_rank_and_survives_a_world_size_change(tmp_path, optimizer):
    steps = 3
    spawn(_queue_worker, 2, steps, optimizer, str(tmp_path))
    spawn(_queue_worker, 1, steps, optimizer, str(tmp_path))
    r0, r1, single = (load_file(tmp_path / f"w{w}-r{r}.safetensors") for w, r in ((2, 0), (2, 1), (1, 0)))
    assert torch.equal(r0["queue"], r1["queue"]) and int(r0["position"]) == steps * GLOBAL_BATCH % 16
    assert_close_norm(r0["queue"], single["queue"], "queue")
    meta = json.loads((checkpoint.complete_checkpoints(tmp_path / "ckpt")[-1] / "meta.json").read_text())
    assert meta["world_size"] == 2

    spawn(_resume_worker, 1, steps, optimizer, str(tmp_path))
    resumed = load_file(tmp_path / "resumed-r0.safetensors")
    assert torch.equal(resumed["queue"], r0["queue"]) and torch.equal(resumed["position"], r0["position"])
    after, uninterrupted = load_file(tmp_path / "resumed-plus1-r0.safetensors"), load_file(tmp_path / "w1-plus1-r0.safetensors")
    assert_close_norm(after["queue"], uninterrupted["queue"], "queue")  # keys come from the restored weights
    if optimizer == "adamw":  # Adam's state re-cut by DeepSpeed's universal checkpoint: the step matches
        assert_close_norm(after["weight"], uninterrupted["weight"], "weight")


# --- the momentum encoder under ZeRO-3 ---------------------------------------------------------------------


def _momentum_worker(rank, world, stage, out):
    import deepspeed

    from pipeline.train import deepspeed_config

    torch.manual_seed(0)
    cfg = tiny_config("mocov3", f"engine.zero_stage={stage}", f"data.batch_size={GLOBAL_BATCH // world}", "method.momentum=0.9")
    method = build_method(cfg)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    engine, *_ = deepspeed.initialize(model=method, optimizer=optimizer, config=deepspeed_config(cfg))
    train_steps(engine, method, rank, world, 3)
    params = list(method.momentum_encoder.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        weights = {n: p.detach().clone() for n, p in method.momentum_encoder.named_parameters()}
    if rank == 0:
        save_file(weights, out)


def test_momentum_encoder_under_zero3_matches_unpartitioned(tmp_path):
    for stage in (0, 3):
        spawn(_momentum_worker, 2, stage, str(tmp_path / f"stage{stage}.safetensors"))
    plain, partitioned = (load_file(tmp_path / f"stage{s}.safetensors") for s in (0, 3))
    torch.manual_seed(0)
    initial = dict(build_method(tiny_config("mocov3")).momentum_encoder.named_parameters())
    moved = 0
    for key in plain:
        assert_close_norm(partitioned[key], plain[key], key)
        moved += not torch.equal(plain[key], initial[key].detach())
    assert moved > len(plain) // 2  # the EMA actually moved the weights
