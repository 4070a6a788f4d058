"""SDCLR's pruned branch: the global magnitude mask (exact count, ties, refresh only on request), the pruned
forward against a masked deep copy, no copy of the weights, its own BatchNorm, gradients through both
branches; fp32 and bf16 autocast on the CPU, the same on a GPU when there is one."""

import copy

import pytest
import timm
import torch
import torch.nn as nn

from models.pruning import PrunedBranch

CUDA = pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])


def backbone(name: str, seed: int = 0, device: str = "cpu") -> nn.Module:
    """A small timm backbone without classifier; BatchNorm with random affine parameters and statistics
    (timm zero-initialises the last BatchNorm of each ResNet block, which would hide its conv's gradient)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=0, **({"img_size": 16} if "vit" in name else {}))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    return model.to(device)


def images(name: str, n: int = 4, seed: int = 1, device: str = "cpu", size: int = 32) -> torch.Tensor:
    size = 16 if "vit" in name else size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)


def reference_masks(weights: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Keep the N - round(ratio N) largest |w| over all weights; among equal ones the earliest (a stable sort)."""
    mags = torch.cat([w.detach().float().abs().flatten() for w in weights])
    kept = mags.numel() - round(ratio * mags.numel())
    flat = torch.zeros_like(mags, dtype=torch.bool)
    flat[torch.sort(mags, descending=True, stable=True).indices[:kept]] = True
    return [m.view(w.shape) for m, w in zip(flat.split([w.numel() for w in weights]), weights)]


def masked_copy(model: nn.Module, branch: PrunedBranch) -> nn.Module:
    """A deep copy of the dense model with its weights multiplied by the masks and the branch's BatchNorm."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, _, mask in branch.weights():
            ref.get_parameter(name).mul_(mask)
    _, unexpected = ref.load_state_dict(branch.bn.state_dict(), strict=False)
    assert not unexpected
    return ref


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("name, ratio", [("resnet18", 0.9), ("test_resnet", 0.5), ("test_vit", 0.3)])
def test_mask_keeps_exact_top_fraction(name, ratio):
    model = backbone(name)
    branch = PrunedBranch(model, ratio)
    names, weights, masks = zip(*branch.weights())
    expected = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {n.removesuffix(".weight") for n in names} == expected  # every conv/linear weight, nothing else
    if "vit" in name:
        assert "patch_embed.proj.weight" in names and not any(n.startswith("head") for n in names)
    total = sum(w.numel() for w in weights)
    assert branch.total == total and branch.kept == total - round(ratio * total)
    assert sum(int(m.sum()) for m in masks) == branch.kept
    kept = torch.cat([w.detach().abs()[m] for w, m in zip(weights, masks)])
    pruned = torch.cat([w.detach().abs()[~m] for w, m in zip(weights, masks)])
    threshold = branch.refresh()
    assert kept.min() == threshold and pruned.max() <= threshold
    assert all(m.dtype == torch.bool for m in masks)
    # The same masks as a stable sort. Skipped on resnet18, where the sort of 11M weights takes seconds: there
    # the separation above decides the masks, barring ties (which have a test of their own).
    if total < 10**6:
        assert all(torch.equal(m, r) for m, r in zip(masks, reference_masks(weights, ratio)))


def test_ties_keep_an_exact_count_in_a_fixed_order():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Linear(4, 5, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(-0.5)
        model[0].weight[0, 0, 0, 0] = 2.0
        model[1].weight.fill_(0.5)  # 73 of the 74 weights have the magnitude 0.5; 37 are kept
    branch = PrunedBranch(model, 0.5)
    conv, linear = branch.masks.get_buffer("0.weight"), branch.masks.get_buffer("1.weight")
    assert int(conv.sum()) + int(linear.sum()) == 37
    assert conv.flatten()[:37].all() and not conv.flatten()[37:].any() and not linear.any()
    expected = reference_masks([model[0].weight, model[1].weight], 0.5)
    assert torch.equal(conv, expected[0]) and torch.equal(linear, expected[1])


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_pruned_forward_equals_a_masked_copy(name):
    model = backbone(name)
    branch = PrunedBranch(model, 0.6)
    x = images(name)
    with torch.no_grad():  # give the branch's BatchNorm a state of its own (affine and statistics)
        for p in branch.bn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.train()
        branch(images(name, seed=2))
    ref = masked_copy(model, branch)
    for train in (False, True):
        model.train(train), ref.train(train)
        torch.testing.assert_close(branch(x), ref(x), rtol=1e-5, atol=1e-5)
    if "resnet" in name:  # the train-mode forward moved the branch's statistics exactly as the copy's
        ref_stats = batchnorm_state(ref)
        for k, v in batchnorm_state(branch.bn).items():
            torch.testing.assert_close(v, ref_stats[k])
    ratio0 = PrunedBranch(model.eval(), 0.0)  # nothing pruned and the same BatchNorm state: the dense model
    assert all(m.all() for m in ratio0.masks.buffers())
    torch.testing.assert_close(ratio0(x), model(x), rtol=0, atol=0)


def test_no_copy_of_the_weights():
    model = backbone("test_resnet")
    params = dict(model.named_parameters())
    branch = PrunedBranch(model, 0.5)
    for name, w, _ in branch.weights():
        assert w is params[name]
    # The branch's own state: bool masks and BatchNorm layers, nothing else; no storage shared with the model.
    bn_numel = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert sum(p.numel() for p in branch.parameters()) == bn_numel
    state = branch.state_dict()
    assert all(k.startswith(("masks.", "bn.")) for k in state)
    assert all(v.dtype == torch.bool for k, v in state.items() if k.startswith("masks."))
    model_ptrs = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not model_ptrs & {t.untyped_storage().data_ptr() for t in state.values()}
    # The backbone is not registered a second time in a module that holds both.
    holder = nn.ModuleDict({"backbone": model, "pruned": branch})
    assert sum(p.numel() for p in holder.parameters()) == sum(p.numel() for p in model.parameters()) + bn_numel
    # A change of the dense weights shows in the pruned forward at once.
    x = images("test_resnet")
    model.eval()
    before = branch(x)
    with torch.no_grad():
        model.get_parameter(branch.weights()[-1][0]).mul_(2)
    assert not torch.allclose(branch(x), before)
    torch.testing.assert_close(branch(x), masked_copy(model, branch)(x))


def test_mask_changes_only_at_refresh():
    model = backbone("test_resnet")
    branch = PrunedBranch(model, 0.7)
    optimizer = torch.optim.SGD(list(model.parameters()) + list(branch.parameters()), lr=0.5)
    masks = [m.clone() for m in branch.masks.buffers()]
    weights = [w.detach().clone() for _, w, _ in branch.weights()]
    model.train()
    for step in range(3):
        x = images("test_resnet", seed=step)
        loss = model(x).square().mean() + branch(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert all(torch.equal(a, b) for a, b in zip(masks, branch.masks.buffers()))
    assert not all(torch.equal(a, w) for a, (_, w, _) in zip(weights, branch.weights()))
    branch.refresh()
    now = list(branch.masks.buffers())
    assert all(torch.equal(m, r) for m, r in zip(now, reference_masks([w for _, w, _ in branch.weights()], 0.7)))
    assert not all(torch.equal(a, b) for a, b in zip(masks, now))
    assert sum(int(m.sum()) for m in now) == branch.kept
    # Saved with the branch (a resumed run continues with the same masks, not ones of its fresh weights).
    fresh = PrunedBranch(backbone("test_resnet", seed=5), 0.7)
    fresh.load_state_dict(branch.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.masks.buffers(), now))


def test_own_batchnorm_statistics():
    model = backbone("test_resnet").train()
    branch = PrunedBranch(model, 0.5)
    dense_before, pruned_before = batchnorm_state(model), batchnorm_state(branch.bn)
    branch(images("test_resnet"))
    assert all(torch.equal(v, dense_before[k]) for k, v in batchnorm_state(model).items())
    pruned_after = batchnorm_state(branch.bn)
    assert all(not torch.equal(v, pruned_before[k]) for k, v in pruned_after.items())
    model(images("test_resnet"))
    assert all(torch.equal(v, pruned_after[k]) for k, v in batchnorm_state(branch.bn).items())
    assert all(not torch.equal(v, dense_before[k]) for k, v in batchnorm_state(model).items())
    # Affine parameters are the branch's own too, and trainable.
    own = {id(p) for p in branch.bn.parameters()}
    assert own and all(p.requires_grad for p in branch.bn.parameters())
    assert not own & {id(p) for p in model.parameters()}


def grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g if g is not None else torch.zeros_like(p) for g, p in
            zip(torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True), params)]


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_gradient_reaches_the_shared_weights_through_both_branches(name):
    model = backbone(name).train()
    branch = PrunedBranch(model, 0.5)
    ref = masked_copy(model, branch)
    # 8 images of 96x96: 3x3 maps in the ResNet's last stage, so every kept weight meets some non-zero input
    x1, x2 = images(name, n=8, seed=1, size=96), images(name, n=8, seed=2, size=96)
    target = torch.randn(8, model.num_features, generator=torch.Generator().manual_seed(3))
    dense_loss, pruned_loss = (model(x1) * target).sum(), (branch(x2) * target).sum()
    names, weights, masks = zip(*branch.weights())
    g_pruned = grads(pruned_loss, list(weights))
    g_ref = grads((ref(x2) * target).sum(), [ref.get_parameter(n) for n in names])
    for n, g, m, r in zip(names, g_pruned, masks, g_ref):
        assert torch.equal(g != 0, m), n  # non-zero exactly where the mask keeps the weight
        torch.testing.assert_close(g, r * m)  # d/dw L(w * m) = m * L'(w * m)
    g_dense = grads(dense_loss, list(weights))
    g_sum = grads(dense_loss + pruned_loss, list(weights))
    for gd, gp, gs in zip(g_dense, g_pruned, g_sum):
        torch.testing.assert_close(gs, gd + gp)
    if "resnet" in name:  # each branch's BatchNorm learns from its own branch only
        dense_bn = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
        own_bn = list(branch.bn.parameters())
        assert all(g.abs().sum() > 0 for g in grads(pruned_loss, own_bn))
        assert all(g.abs().sum() == 0 for g in grads(pruned_loss, dense_bn))
        assert all(g.abs().sum() == 0 for g in grads(dense_loss, own_bn))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_bf16_autocast(name, device):
    model = backbone(name, device=device).train()
    branch = PrunedBranch(model, 0.8)
    ref = masked_copy(model, branch)
    x = images(name, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, expected = branch(x), ref(x)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    out.float().square().sum().backward()
    assert all(torch.equal(w.grad[~m], torch.zeros_like(w.grad[~m])) and w.grad[m].abs().sum() > 0
               for _, w, m in branch.weights())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_masks_equal_cpu_masks():
    model = backbone("resnet18")
    on_cpu = [m.clone() for m in PrunedBranch(model, 0.9).masks.buffers()]
    on_gpu = PrunedBranch(model.cuda(), 0.9)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(on_cpu, on_gpu.masks.buffers()))


def test_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="ratio"):
        PrunedBranch(backbone("test_resnet"), 1.0)
    with pytest.raises(ValueError, match="no conv or linear"):
        PrunedBranch(nn.Sequential(nn.ReLU()), 0.5)
    model = backbone("test_resnet")
    branch = PrunedBranch(model, 0.5)
    model.set_grad_checkpointing(True)
    with pytest.raises(RuntimeError, match="checkpointing"):
        branch(images("test_resnet"))
