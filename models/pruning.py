"""SDCLR's pruned branch: the same network with a global magnitude mask on its conv and linear weights.

`PrunedBranch(backbone, ratio)` computes `backbone` with every conv/linear weight `w` replaced by
`w * mask`. The masks are bool buffers, chosen by global unstructured magnitude pruning: over all those
weights together, the `N - round(ratio * N)` largest |w| are kept (N = their total number of elements).
Among weights equal to the threshold the first ones are kept, in a fixed order (layers as `named_modules`
lists them, then each weight's flat index), so the count is exact and every rank computes the same masks
from the same weights. The masks are computed at construction, then recomputed from the current weights
by `refresh()` only (SDCLR: once per epoch); as buffers they are saved and restored with checkpoints.

What the branch shares and what it owns:
- conv/linear weights are the backbone's own parameters: the branch keeps no copy (during a pruned
  forward the masked weight `w * mask` is a temporary, saved for backward like any activation). Both
  branches' gradients reach the same parameters and add up; a pruned backward gives zero where the mask
  is 0.
- every BatchNorm layer has a copy in the branch (`bn`, trainable affine and separate running
  statistics, initialised from the backbone's at construction), as SDCLR gives the pruned branch its own.
- everything else (biases, LayerNorm, position embeddings, ...) is shared unmasked.

Which weights count: the `weight` of every `nn.Conv*d` and `nn.Linear` (and subclasses) in the backbone,
the ViT patch embedding (a Conv2d) included. Backbones built with `num_classes=0` have no classifier
(their head is an `nn.Identity`), so none is pruned. `ratio=0` keeps every weight: a branch that differs
from the dense one only by its own BatchNorm (e.g. the projector of the pruned branch).

The backbone is held, not registered: its parameters belong to the caller (the method), so they are not
listed, saved or optimised twice. The branch's state is its masks and BatchNorm layers; register the
branch in the method so that they are moved, saved, converted to SyncBatchNorm and optimised with it.
The pruned forward runs the backbone's modules, so it follows the backbone's train/eval mode.

Limits: parameters must be whole on every rank (plain, DDP, ZeRO 0-2): under ZeRO-3 a rank holds only
a partition, so neither the masked weights nor the global ranking could be formed. Activation
checkpointing is refused: its recomputation in backward would run with the dense weights and BatchNorm.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

PRUNED = (nn.modules.conv._ConvNd, nn.Linear)


def _container(root: nn.Module, path: list[str]) -> nn.Module:
    """The module at `path` under `root`, creating empty containers on the way (mirrors the backbone's
    names, so that the branch's tensors are named exactly like the backbone's)."""
    for part in path:
        if part not in root._modules:
            root.add_module(part, nn.Module())
        root = root._modules[part]
    return root


class PrunedBranch(nn.Module):
    """`forward(x)` is `backbone(x)` with conv/linear weights multiplied by their masks and BatchNorm from `bn`."""

    def __init__(self, backbone: nn.Module, ratio: float):
        super().__init__()
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio
        self.__dict__["backbone"] = backbone  # held, not registered (see the module docstring)
        self.masks = nn.Module()  # bool buffers named like the weights they mask
        self.bn = nn.Module()  # BatchNorm copies named like the layers they replace
        seen: set[int] = set()
        for name, module in backbone.named_modules():
            path = name.split(".") if name else []
            if isinstance(module, _BatchNorm):
                if not path:
                    raise ValueError("the backbone itself is a BatchNorm layer: nothing to prune")
                _container(self.bn, path[:-1]).add_module(path[-1], copy.deepcopy(module))
            elif isinstance(module, PRUNED) and id(module.weight) not in seen:
                seen.add(id(module.weight))
                mask = torch.ones_like(module.weight, dtype=torch.bool)
                _container(self.masks, path).register_buffer("weight", mask)
        self.total = sum(m.numel() for m in self.masks.buffers())
        if self.total == 0:
            raise ValueError(f"{type(backbone).__name__} has no conv or linear weights to prune")
        self.kept = self.total - round(ratio * self.total)
        self._checkpointing = [m for m in backbone.modules() if hasattr(m, "grad_checkpointing")]
        self.refresh()

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, kept={self.kept} of {self.total} conv/linear weights"

    def weights(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, backbone weight, mask) of every masked weight, in the order ties are broken."""
        return [(name, self.backbone.get_parameter(name), mask) for name, mask in self.masks.named_buffers()]

    @torch.no_grad()
    def refresh(self) -> torch.Tensor:
        """Recompute the masks from the backbone's current weights, in place; returns the magnitude
        threshold (a 0-dim tensor on the weights' device, for logging).

        The threshold T is the `kept`-th largest |w| over all masked weights (from one fp32 vector of
        their magnitudes, freed on return). Everything >= T is kept, less the last weights equal to T (in
        the fixed order) that would exceed `kept`. One host synchronisation: this runs once per epoch.
        """
        entries = self.weights()
        mags = torch.cat([w.detach().float().flatten() for _, w, _ in entries]).abs_()
        threshold = torch.kthvalue(mags, self.total - self.kept + 1).values
        keep = mags >= threshold
        surplus = int(keep.sum()) - self.kept  # weights equal to the threshold beyond the count
        if surplus:
            keep[torch.nonzero(mags == threshold).squeeze(1)[-surplus:]] = False
        for part, (_, _, mask) in zip(keep.split([m.numel() for _, _, m in entries]), entries):
            mask.copy_(part.view(mask.shape))
        return threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(m.grad_checkpointing for m in self._checkpointing):
            raise RuntimeError("PrunedBranch cannot run a backbone with activation checkpointing: the "
                               "recomputation in backward would use the dense weights (disable grad_checkpointing)")
        tensors = {name: w * mask for name, w, mask in self.weights()}
        tensors.update(self.bn.named_parameters())
        tensors.update(self.bn.named_buffers())
        return functional_call(self.backbone, tensors, (x,))
