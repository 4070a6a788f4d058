"""method.feature_aug: prototype attention (AugF) over k-means prototypes of a feature memory gives each
InfoNCE key an augmented twin, a second positive. Off, every loss is the plain InfoNCE bit for bit."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import pipeline.methods.feature_aug as feature_aug
from conftest import tiny_config
from distributed_utils import spawn
from models.kmeans import kmeans
from pipeline.config import ConfigError
from pipeline.losses import info_nce
from pipeline.methods import build_method

AUG = "method.feature_aug={prototypes: 4, heads: 2, memory: 32, weight: 0.3}"
TRAINED = ["simclr", "mocov2", "mocov3", "sdmp_mocov3", "sdmp_simclr", "sdclr"]


def views(seed: int = 1, rows: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 3, 16, 16, generator=g) for _ in range(2)]


def make(name: str, *extra: str):
    torch.manual_seed(0)
    return build_method(tiny_config(name, *extra))


# --- off: nothing changes ----------------------------------------------------------------------------------


def test_off_simclr_is_nt_xent_bit_for_bit():
    method, v = make("simclr"), views()
    loss, _ = method(v)
    z1, z2 = method.embed(torch.cat(v)).chunk(2)
    own = torch.arange(4)
    expected = info_nce(torch.cat([z1, z2]), torch.cat([z1, z2]), method.temperature,
                        targets=torch.cat([own + 4, own]), mask_self=torch.cat([own, own + 4]))
    assert torch.equal(loss, expected)
    assert method.contrast_keys.cfg is None and not any("feature" in k or "prototypes" in k for k in method.state_dict())


def test_off_mocov3_is_infonce_bit_for_bit():
    method, (x1, x2) = make("mocov3"), views()
    loss, _ = method([x1, x2])
    unit = lambda t: F.normalize(t.float(), dim=1)  # noqa: E731
    q1, q2, k1, k2 = unit(method.query(x1)), unit(method.query(x2)), unit(method.key(x1)), unit(method.key(x2))
    tau = method.temperature
    expected = 2 * tau * info_nce(q1, k2, tau, targets=torch.arange(4)) + 2 * tau * info_nce(q2, k1, tau, targets=torch.arange(4))
    assert torch.equal(loss, expected)


def test_off_mocov2_is_infonce_bit_for_bit():
    method, (xq, xk) = make("mocov2"), views()
    queue = method.queue.keys.clone()
    loss, _ = method([xq, xk])
    q = F.normalize(method.online()(xq).float(), dim=1)
    k = F.normalize(method.momentum_encoder(xk).float(), dim=1)
    expected = info_nce(q, k, method.temperature, queue=queue, in_batch_negatives=False)
    assert torch.equal(loss, expected)


@pytest.mark.parametrize("kwargs", [dict(targets=torch.arange(4) + 2, mask_self=torch.arange(4)), dict(queue=torch.eye(6, 8))])
def test_off_contrast_keys_is_info_nce(kwargs):
    method = make("simclr")
    g = torch.Generator().manual_seed(3)
    q, k = F.normalize(torch.randn(4, 8, generator=g), dim=1), F.normalize(torch.randn(8, 8, generator=g), dim=1)
    assert torch.equal(method.contrast_keys(q, k, 0.2, **kwargs), info_nce(q, k, 0.2, **kwargs))


# --- on -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRAINED)
def test_training_steps_reach_augf(name):
    method = make(name, AUG)
    method.start_epoch(0)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        loss, _ = method(views(step))
        assert torch.isfinite(loss)
        loss.backward()
        grads = {n: p.grad for n, p in method.contrast_keys.attention.named_parameters()}
        assert grads["residual.weight"] is not None and grads["residual.weight"].abs().sum() > 0
        if step == 1:  # once φᵣ has moved off zero, the whole module learns
            assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), name
        opt.step()
        method.after_step(0.5)
    assert int(method.contrast_keys.memory.position) != 0


def test_metaug_refuses_feature_aug():
    with pytest.raises(ConfigError, match="method.feature_aug: not a setting of method.name=metaug"):
        tiny_config("metaug", AUG)
    tiny_config("simclr", AUG).check(1)


def test_config_checks_memory():
    with pytest.raises(ConfigError, match="memory=2 must be >= prototypes=4"):
        tiny_config("simclr", "method.feature_aug={prototypes: 4, memory: 2}")
    cfg = tiny_config("simclr", AUG)  # 32 rows, batch 4 per rank: 2 x 16 fits at 4 ranks, not at 8
    cfg.check(4)
    with pytest.raises(ValueError, match="feature_aug.memory=32"):
        cfg.check(8)


def capture_info_nce(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return info_nce(*args, **kwargs)

    monkeypatch.setattr(feature_aug, "info_nce", spy)
    return calls


def test_targets_point_at_the_twins_and_weights_sum_to_one(monkeypatch):
    method = make("simclr", AUG)
    with torch.no_grad():  # AugF away from its zero start, so twins differ from their keys
        method.contrast_keys.attention.residual.weight.normal_()
    calls = capture_info_nce(monkeypatch)
    g = torch.Generator().manual_seed(5)
    q, k = F.normalize(torch.randn(4, 16, generator=g), dim=1), F.normalize(torch.randn(8, 16, generator=g), dim=1)
    targets, selves = torch.tensor([5, 4, 7, 6]), torch.tensor([1, 0, 3, 2])
    method.contrast_keys(q, k, 0.2, targets=targets, mask_self=selves)
    (args, kwargs), = calls
    keys = args[1]
    assert keys.shape == (16, 16) and torch.equal(keys[:8], k)
    assert torch.allclose(keys[8:], F.normalize(method.contrast_keys.attention(k, method.contrast_keys.prototypes), dim=1))
    assert not torch.allclose(keys[8:], k)
    assert torch.equal(kwargs["targets"], torch.stack([targets, targets + 8], 1))
    assert torch.equal(kwargs["mask_self"], torch.stack([selves, selves + 8], 1))
    weights = kwargs["target_weights"]
    assert torch.allclose(weights, torch.tensor([0.7, 0.3]).expand(4, 2)) and torch.allclose(weights.sum(1), torch.ones(4))
    assert torch.equal(method.contrast_keys.memory.keys[:8], k) and int(method.contrast_keys.memory.position) == 8


@pytest.mark.parametrize("name", ["simclr", "mocov3"])
def test_zero_init_twins_duplicate_their_keys(name):
    """AugF starts as the identity: each key appears twice (twin masked with its key), so the loss is the
    plain one plus log 2."""
    off, on = make(name), make(name, AUG)
    on.load_state_dict(off.state_dict(), strict=False)
    v = views()
    scale = 2 if name == "mocov3" else 1  # mocov3: 2τ·InfoNCE per direction, two directions
    shift = scale * 2 * on.temperature * math.log(2) if name == "mocov3" else math.log(2)
    assert torch.allclose(on(v)[0], off(v)[0] + shift, atol=1e-5)


def test_multi_column_mask_self_matches_the_dense_definition():
    g = torch.Generator().manual_seed(7)
    q, k = F.normalize(torch.randn(5, 8, generator=g), dim=1), F.normalize(torch.randn(12, 8, generator=g), dim=1)
    targets, mask = torch.arange(5)[:, None] + torch.tensor([0, 6]), torch.arange(5)[:, None] + torch.tensor([1, 7])
    logits = q @ k.T / 0.2
    logits[torch.arange(5)[:, None], mask] = float("-inf")
    expected = (logits.logsumexp(1) - 0.5 * logits.gather(1, targets).sum(1)).mean()
    for impl in ("reference", "chunked"):
        got = info_nce(q, k, 0.2, targets=targets, mask_self=mask, impl=impl)
        assert torch.allclose(got, expected, atol=1e-6), impl


def test_prototypes_refresh_only_in_start_epoch_at_the_interval():
    method = make("mocov3", AUG.replace("}", ", refresh_epochs: 2, kmeans_iters: 5}"))
    expected = lambda epoch: kmeans(method.contrast_keys.memory.keys, 4, iters=5, seed=epoch, metric="cosine")[0]  # noqa: E731
    method.start_epoch(0)
    assert torch.equal(method.contrast_keys.prototypes, expected(0))
    first = method.contrast_keys.prototypes.clone()
    method(views())  # pushes keys; prototypes stay
    assert torch.equal(method.contrast_keys.prototypes, first)
    method.start_epoch(1)
    assert torch.equal(method.contrast_keys.prototypes, first)
    method.start_epoch(2)
    assert torch.equal(method.contrast_keys.prototypes, expected(2)) and not torch.equal(method.contrast_keys.prototypes, first)


def test_sdclr_start_epoch_refreshes_both():
    method = make("sdclr", AUG)
    before = method.contrast_keys.prototypes.clone()
    values = method.start_epoch(0)
    assert "sdclr/mask_threshold" in values and not torch.equal(method.contrast_keys.prototypes, before)


# --- distributed --------------------------------------------------------------------------------------------


def _memory_worker(rank, world, out):
    state = {}
    for name in ("simclr", "mocov2"):
        method = make(name, AUG)
        method.start_epoch(0)
        opt = torch.optim.SGD(method.parameters(), lr=0.1)
        for step in range(2):
            opt.zero_grad()
            loss, _ = method([v[rank * 2 : rank * 2 + 2] for v in views(step)])
            loss.backward()
            for p in method.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
            opt.step()
        state[f"{name}.memory"] = method.contrast_keys.memory.keys.contiguous()
        state[f"{name}.prototypes"] = method.contrast_keys.prototypes.contiguous()
    save_file(state, f"{out}.{rank}")


def test_memory_is_identical_on_every_rank(tmp_path):
    out = str(tmp_path / "memory")
    spawn(_memory_worker, 2, out)
    r0, r1 = load_file(f"{out}.0"), load_file(f"{out}.1")
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    for name in ("simclr", "mocov2"):
        assert not torch.equal(r0[f"{name}.memory"], make(name, AUG).contrast_keys.memory.keys)  # it was written
