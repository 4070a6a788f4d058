"""SDMP: soft targets by global index, the loss against a dense direct computation, and gradients at
world size 2 against one process."""

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from distributed_utils import spawn
from pipeline.data.mixing import mix
from pipeline.methods import build_method
from pipeline.methods.sdmp import mixing_targets, soft_contrast

HEADS = ["model.predictor={hidden_dim: 32, out_dim: 16, layers: 1}"]


def _targets_worker(rank, world, out):
    lam = torch.tensor([0.9, 0.3, 0.6, 0.5]) + 0.01 * rank
    targets, clean, mixed = mixing_targets(lam, lam)
    save_file({"targets": targets, "clean": clean, "mixed": mixed}, f"{out}-{rank}.safetensors")


def test_targets_point_at_the_image_and_its_partner_by_global_index(tmp_path):
    spawn(_targets_worker, 2, str(tmp_path / "t"))
    for rank in range(2):
        got = load_file(tmp_path / f"t-{rank}.safetensors")
        own = torch.arange(4) + 4 * rank
        assert torch.equal(got["targets"], torch.stack([own, 4 * rank + 3 - torch.arange(4)], 1))
        for key in ("clean", "mixed"):
            torch.testing.assert_close(got[key].sum(1), torch.ones(4))
        lam = torch.tensor([0.9, 0.3, 0.6, 0.5]) + 0.01 * rank
        torch.testing.assert_close(got["clean"][:, 0], lam)
        lam_p = lam.flip(0)
        c = torch.minimum(lam, 1 - lam_p) + torch.minimum(1 - lam, lam_p)
        torch.testing.assert_close(got["mixed"][:, 1], c / (1 + c))


@pytest.mark.parametrize("form", ["soft_ce", "log_mixture"])
def test_soft_contrast_equals_a_dense_computation(form):
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(10, 8, generator=g, dtype=torch.float64), dim=1)
    targets = torch.randint(0, 10, (6, 2), generator=g)
    lam = torch.rand(6, generator=g, dtype=torch.float64)
    weights = torch.stack([lam, 1 - lam], 1)
    got = soft_contrast(q, keys, targets, weights, 0.2, form, "reference")
    log_p = torch.log_softmax(q @ keys.T / 0.2, 1).gather(1, targets)
    if form == "soft_ce":
        expected = -(weights * log_p).sum(1).mean()
    else:
        expected = -torch.log((weights * log_p.exp()).sum(1)).mean()
    torch.testing.assert_close(got, expected)


def test_mixed_targets_reduce_to_infonce_without_mixing():
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    targets, clean, _ = mixing_targets(torch.ones(4), torch.ones(4))
    plain = torch.nn.functional.cross_entropy(q @ keys.T / 0.2, torch.arange(4))
    for form in ("soft_ce", "log_mixture"):
        torch.testing.assert_close(soft_contrast(q, keys, targets, clean, 0.2, form, "reference"), plain)


# --- gradients: world size 2 against one process ---------------------------------------------------------

LAM = torch.tensor([0.7, 0.2, 0.55, 0.9, 0.35, 0.6, 0.8, 0.1])


def views(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]


def fixed_mixing(rows_per_rank: int):
    """Mixup with fixed λ and each rank's own partners, for any split of the global batch: a run on the
    whole batch mixes each rank's rows exactly as that rank does."""

    def mixed_pair(x1, x2):
        offset = dist.get_rank() * x1.shape[0] if dist.is_initialized() else 0
        parts = [range(s, s + rows_per_rank) for s in range(0, x1.shape[0], rows_per_rank)]
        m1 = torch.cat([mix(x1[p.start : p.stop], "mixup", lam=LAM[offset + p.start : offset + p.stop])[0] for p in parts])
        m2 = torch.cat([mix(x2[p.start : p.stop], "mixup", lam=LAM[offset + p.start : offset + p.stop])[0] for p in parts])
        lam = LAM[offset : offset + x1.shape[0]]
        if dist.is_initialized():
            return m1, m2, *mixing_targets(lam, lam)
        # one process: targets of each virtual rank's rows, by global index
        pieces = []
        for r, p in enumerate(parts):
            t, c, m = mixing_targets(lam[p.start : p.stop], lam[p.start : p.stop])
            pieces.append((t + r * rows_per_rank, c, m))
        return m1, m2, *(torch.cat(x) for x in zip(*pieces))

    return mixed_pair


def sdmp_gradients(name: str, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    method = build_method(tiny_config(name, *HEADS))
    method.mixed_pair = fixed_mixing(4)
    rows = 8 // world
    loss, _ = method([v[rank * rows : (rank + 1) * rows] for v in views()])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    if world > 1:
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
    return grads


def _sdmp_worker(rank, world, name, out):
    grads = sdmp_gradients(name, rank, world)
    if rank == 0:
        save_file(grads, out)


@pytest.mark.parametrize("name", ["sdmp_mocov3", "sdmp_simclr"])
def test_sdmp_gradients_at_world_size_2_equal_one_process(tmp_path, name):
    spawn(_sdmp_worker, 2, name, str(tmp_path / "g.safetensors"))
    got, expected = load_file(tmp_path / "g.safetensors"), sdmp_gradients(name, 0, 1)
    assert got.keys() == expected.keys()
    for key in expected:
        error = (got[key] - expected[key]).norm() / expected[key].norm().clamp_min(1e-12)
        assert error < 1e-5, f"{key}: {error:.2e}"
