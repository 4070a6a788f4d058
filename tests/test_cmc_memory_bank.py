"""CMC's memory bank (method.memory_bank): its initialisation and update against a hand computation, the
loss against a float64 definition (NCESoftmaxLoss over NCEAverage's scores), two ranks against one
process (the same banks on both, the same loss and gradients), a state round-trip, and runs through the
loop, which passes the samples' indices and saves and restores the bank with the checkpoint."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from data_shards.shards import read_manifest
from distributed_utils import average_over_ranks, spawn
from pipeline.checkpoint import fingerprint
from pipeline.config import ConfigError, load_config
from pipeline.methods import build_method
from pipeline.methods.cmc import lab_views
from pipeline.methods.memory_bank import MemoryBank, MemoryBankConfig
from test_cmc import assert_gradients_match

RAW_VIEWS = "data.views=[{size: 16, color_jitter: null, grayscale: 0.0, mean: [0, 0, 0], std: [1, 1, 1]}]"
BANK = "method.memory_bank={negatives: 6, momentum: 0.5}"
N_DATA, GLOBAL_BATCH, T = 20, 8, 0.07


def bank_method(*extra):
    method = build_method(tiny_config("cmc", RAW_VIEWS, BANK, *extra))
    method.set_data_size(N_DATA)
    return method


def images(rows=GLOBAL_BATCH, seed=0):
    return torch.rand(rows, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


INDICES = torch.tensor([3, 17, 0, 9, 12, 5, 19, 8])  # distinct, as an epoch's samples are


def recording_draws(bank):
    """Keep what `bank.sample` returns (the negatives a forward pass used)."""
    drawn, sample = [], bank.sample
    bank.sample = lambda *a: drawn.append(sample(*a)) or drawn[-1]
    return drawn


def test_rows_start_uniform_in_cmcs_range_and_alike_on_every_seeded_build():
    bank = MemoryBank(MemoryBankConfig(), 2, 128, seed=3)
    bank.allocate(5000)
    scale = 1 / math.sqrt(128 / 3)
    assert bank.rows.shape == (2, 5000, 128) and bank.rows.abs().max() <= scale
    torch.testing.assert_close(bank.rows.var(), torch.tensor(scale**2 / 3), rtol=0.02, atol=0)  # U(-s, s)
    again = MemoryBank(MemoryBankConfig(), 2, 128, seed=3)
    again.allocate(5000)
    assert torch.equal(bank.rows, again.rows)


def test_the_update_is_the_hand_computation():
    bank = MemoryBank(MemoryBankConfig(momentum=0.5), 2, 4, seed=0)
    bank.allocate(6)
    before = bank.rows.clone().double()
    f = [torch.randn(2, 4), torch.randn(2, 4)]
    bank.update(torch.tensor([4, 1]), f)
    for view in range(2):
        for row, i in enumerate([4, 1]):
            mixed = 0.5 * before[view, i] + 0.5 * f[view][row].double()
            torch.testing.assert_close(bank.rows[view, i].double(), mixed / mixed.norm(), rtol=1e-6, atol=1e-7)
        for i in (0, 2, 3, 5):
            assert torch.equal(bank.rows[view, i].double(), before[view, i])


def test_draws_are_uniform_indices_that_follow_the_step():
    bank = MemoryBank(MemoryBankConfig(negatives=4000), 1, 4, seed=0)
    bank.allocate(10)
    bank.begin_step(7)
    first = bank.sample(3, torch.device("cpu"))
    assert first.shape == (3, 4000) and first.min() == 0 and first.max() == 9
    counts = torch.bincount(first.flatten(), minlength=10).double()
    assert (counts / counts.mean() - 1).abs().max() < 0.1
    assert not torch.equal(bank.sample(3, torch.device("cpu")), first)  # the next forward pass: new draws
    bank.begin_step(7)
    assert torch.equal(bank.sample(3, torch.device("cpu")), first)  # a resumed step draws the same


def reference_loss(z_l, z_ab, rows, indices, negatives):
    """float64, from NCEAverage + NCESoftmaxLoss: out_l[i] = [mem_ab[y_i], mem_ab[n_i1..n_iK]]·l_i / T (and
    out_ab with mem_l and ab_i), each the cross-entropy of column 0, averaged over rows, summed."""
    def ce(q, memory):
        total = 0.0
        for i in range(q.shape[0]):
            keys = torch.cat([indices[i:i + 1], negatives[i]])
            logits = torch.stack([memory[k] @ q[i] for k in keys]) / T
            total = total - torch.log_softmax(logits, 0)[0]
        return total / q.shape[0]
    return ce(z_l, rows[1]), ce(z_ab, rows[0])


def embeddings(method, x):
    with torch.no_grad():
        l, ab = lab_views(x)
        z_l = F.normalize(method.l_projector(method.l_backbone(l)), dim=1)
        z_ab = F.normalize(method.ab_projector(method.ab_backbone(ab)), dim=1)
    return z_l, z_ab


def test_loss_is_the_float64_definition_and_the_rows_move_after_it():
    torch.manual_seed(0)
    method = bank_method()
    x = images()
    rows = method.bank.rows.clone().double()
    drawn = recording_draws(method.bank)
    loss, parts = method([x], indices=INDICES)
    (negatives,) = drawn
    assert negatives.shape == (GLOBAL_BATCH, 6)
    z_l, z_ab = (z.double() for z in embeddings(method, x))
    l_to_ab, ab_to_l = reference_loss(z_l, z_ab, rows, INDICES, negatives)
    close = dict(rtol=1e-5, atol=1e-6)  # the method's fp32 against float64
    torch.testing.assert_close(parts["loss/l_to_ab"].double(), l_to_ab, **close)
    torch.testing.assert_close(parts["loss/ab_to_l"].double(), ab_to_l, **close)
    torch.testing.assert_close(loss.double(), l_to_ab + ab_to_l, **close)
    for view, z in enumerate((z_l, z_ab)):
        expected = F.normalize(0.5 * rows[view, INDICES] + 0.5 * z, dim=1)
        torch.testing.assert_close(method.bank.rows[view, INDICES].double(), expected, **close)
    untouched = torch.ones(N_DATA, dtype=torch.bool)
    untouched[INDICES] = False
    assert torch.equal(method.bank.rows[:, untouched].double(), rows[:, untouched])
    loss.backward()  # the rows were updated in place after the loss: its graph holds its own copies
    assert method.l_backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_the_bank_is_module_state_in_the_fingerprint_and_round_trips():
    trained = bank_method()
    trained([images()], indices=INDICES)
    assert list(fingerprint(trained, trained.cfg)["shapes"]["bank.rows"]) == [2, N_DATA, 16]
    fresh = bank_method("train.seed=5")
    assert not torch.equal(fresh.bank.rows, trained.bank.rows)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.bank.rows, trained.bank.rows)


def test_the_bank_and_moco_style_queues_are_refused_together():
    with pytest.raises(ConfigError, match="method.memory .* and method.memory_bank .* set one"):
        load_config(None, ["method.name=cmc", RAW_VIEWS, BANK, "method.memory={size: 16}"], world_size=1)


# --- two ranks against one process ----------------------------------------------------------------------------

def one_step(rank=0, world=1):
    torch.manual_seed(0)  # the same initial weights on every rank
    method = bank_method()
    method.before_step(4)
    rows = GLOBAL_BATCH // world
    mine = slice(rank * rows, (rank + 1) * rows)
    loss, _ = method([images()[mine]], indices=INDICES[mine])
    loss.backward()
    out = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    average_over_ranks(out.values())
    out["loss"] = loss.detach().reshape(1)
    average_over_ranks([out["loss"]])
    out["rows"] = method.bank.rows.clone()
    return out


def _ranks_worker(rank, world, folder):
    save_file(one_step(rank, world), f"{folder}/rank{rank}.safetensors")


def assert_step_matches(got, expected):
    """One rank's step (`one_step(rank, world)`) against one process's on the whole batch."""
    # Unit rows in fp32: 1e-6 is a few ulps (batches of 2 at world size 4 round differently from 8 at once).
    torch.testing.assert_close(got["rows"], expected["rows"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["loss"], expected["loss"], rtol=1e-6, atol=1e-7)
    grads = lambda step: {k: v for k, v in step.items() if k not in ("loss", "rows")}  # noqa: E731
    assert_gradients_match(grads(got), grads(expected))


def test_two_ranks_keep_identical_banks_and_equal_one_process_on_the_whole_batch(tmp_path):  # 4: tests/test_four_ranks.py
    spawn(_ranks_worker, 2, str(tmp_path), timeout=60)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert torch.equal(ranks[0]["rows"], ranks[1]["rows"])
    assert_step_matches(ranks[0], one_step())


# --- through the loop ---------------------------------------------------------------------------------------

def _train(rank, world, shards, out, steps):
    from pipeline.train import train

    train(load_config(None, [
        "method.name=cmc", BANK, f"train.data={shards}", f"train.output={out}", RAW_VIEWS, "data.eval_size=16",
        "data.eval_resize=16", "data.batch_size=8", "data.num_threads=1", "model.backbone=test_vit",
        "model.projector={hidden_dim: 32, out_dim: 16, layers: 1}", "engine.precision=fp32",
        f"train.max_steps={steps}", "train.log_every=1", "train.knn_every=0", "train.resume=auto",
        "optim.name=sgd", "optim.lr=0.03",
    ]))


def saved_rows(run):
    from pipeline.checkpoint import complete_checkpoints

    ckpt = complete_checkpoints(run / "checkpoints")[-1]
    return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]["bank.rows"]


@pytest.mark.slow
def test_the_loop_passes_indices_and_the_checkpoint_keeps_the_bank(digits, tmp_path):
    run = tmp_path / "run"
    init = MemoryBank(MemoryBankConfig(), 2, 16, seed=0)  # train.seed's default, as the method builds it
    init.allocate(read_manifest(digits / "train").num_samples)
    spawn(_train, 1, str(digits / "train"), str(run), 2)
    after_two = saved_rows(run)
    moved = (after_two != init.rows).any(2)  # [views, N]: the rows of the samples the two steps saw
    assert torch.equal(moved[0], moved[1]) and int(moved[0].sum()) == 2 * 8
    torch.testing.assert_close(after_two[moved].norm(dim=1), torch.ones(2 * 2 * 8))
    spawn(_train, 1, str(digits / "train"), str(run), 3)  # resumed: one more step on the restored bank
    after_three = saved_rows(run)
    again = (after_three != after_two).any(2)
    assert int(again[0].sum()) == 8 and not (again[0] & moved[0]).any()  # a new epoch's samples only
    assert torch.equal(after_three[:, ~again[0]], after_two[:, ~again[0]])
