"""FeatMatch's losses (Kuo et al., ECCV 2020) in two forms.

`released` (GT-RIPL/FeatMatch train/featmatch.py, `train2`; the default of launch/finetune.py), MixMatch-style:
    q        = sharpen(softmax(clf(g(weak view))), T)   no gradient; unlabeled rows (one-hot y on labeled ones)
    x̃, q̃     = mixup of every view of every image with a permutation of the batch, λ' = max(λ, 1 − λ),
               λ ~ Beta(α, α), targets mixed alike and renormalised
    L_clf    = soft CE(clf(g(x̃)), q̃)     over the rows whose un-mixed image is labeled
    L_con-g  = soft CE(clf(g(x̃)), q̃)     over the other rows (config "mix", weight 0.5)
    L_con-f  = soft CE(clf(f(x̃)), q̃)     over the other rows, without AugF (config "graph", weight 2.0)
    L        = L_clf + r(step) · (λ_g · L_con-g + λ_f · L_con-f),  r linear from 0 to 1 over the ramp-up
with soft CE(z, q) = −Σ_c q_c log softmax(z)_c (the code's `log_loss`), T = 0.75, α = 0.75, no threshold.

`fixmatch` (this project's first form), with g = AugF(f) and `clf` the linear classifier:
    L_clf    = CE(clf(g(weak view)), y)                     over the labeled rows
    ŷ, conf  = argmax / max of softmax(clf(g(weak view)))   no gradient; the pseudo-label
    L_con-g  = Σ_u 1[conf ≥ τ] · CE(clf(g(strong view)), ŷ) / U   over the U unlabeled rows
    L_con-f  = Σ_u 1[conf ≥ τ] · CE(clf(f(strong view)), ŷ) / U   (the strong view without AugF)
    L        = L_clf + λ_g · L_con-g + λ_f · L_con-f
Consistency terms are averaged over all unlabeled rows, those under the threshold counting 0 (as
FixMatch does), so their weight does not jump with the share of confident rows.

Labels are the loader's convention: a class index, or -1 for an unlabeled row. A batch without labeled (or
unlabeled) rows gives 0 for that term, without a host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_THRESHOLD = 0.95  # FixMatch's τ
DEFAULT_LAMBDA_G = 1.0
DEFAULT_LAMBDA_F = 1.0
# The released CIFAR configs (config/cifar10/*.json): transform.data_augment.T, loss.mix, loss.graph; and the
# Beta(0.75, 0.75) of `data_mixup`.
RELEASED_TEMPERATURE = 0.75
RELEASED_LAMBDA_G = 0.5
RELEASED_LAMBDA_F = 2.0
RELEASED_MIXUP_ALPHA = 0.75


class FeatMatchLoss(NamedTuple):
    total: torch.Tensor
    clf: torch.Tensor  # L_clf
    con_g: torch.Tensor  # L_con-g (strong view through AugF)
    con_f: torch.Tensor  # L_con-f (strong view without AugF)
    pseudo_labels: torch.Tensor  # [B] argmax of the weak view through AugF (every row)
    confidence: torch.Tensor  # [B] its probability
    mask: torch.Tensor  # [B] bool: unlabeled and confident, the rows the consistency terms train on


def pseudo_labels(weak_logits: torch.Tensor, threshold: float = DEFAULT_THRESHOLD):
    """(hard pseudo-labels [B], confidence [B], confident [B] bool) from weak-view logits, without gradient."""
    probs = weak_logits.detach().float().softmax(dim=1)
    confidence, labels = probs.max(dim=1)
    return labels, confidence, confidence >= threshold


def masked_mean_ce(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Σ weight·CE(logits, targets) / max(count, 1); targets may hold -1 where weight is 0."""
    ce = F.cross_entropy(logits.float(), targets.clamp(min=0), reduction="none")
    return (ce * weight).sum() / count.clamp(min=1)


def featmatch_loss(
    weak_g: torch.Tensor,
    strong_g: torch.Tensor,
    strong_f: torch.Tensor,
    labels: torch.Tensor,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    lambda_g: float = DEFAULT_LAMBDA_G,
    lambda_f: float = DEFAULT_LAMBDA_F,
) -> FeatMatchLoss:
    """The FeatMatch objective from class logits [B, C] of one batch.

    weak_g: weak view through AugF (classifies the labeled rows and gives pseudo-labels);
    strong_g / strong_f: strong view with / without AugF; labels [B]: class index or -1 (unlabeled).
    """
    if not (weak_g.shape == strong_g.shape == strong_f.shape) or weak_g.ndim != 2:
        raise ValueError(f"logits must all be [B, C], got {tuple(weak_g.shape)}, {tuple(strong_g.shape)}, {tuple(strong_f.shape)}")
    if labels.shape != weak_g.shape[:1]:
        raise ValueError(f"labels must be [B={weak_g.shape[0]}], got {tuple(labels.shape)}")
    labels = labels.to(weak_g.device)
    labeled = labels >= 0
    unlabeled = ~labeled
    l_clf = masked_mean_ce(weak_g, labels, labeled.float(), labeled.sum())

    targets, confidence, confident = pseudo_labels(weak_g, threshold)
    mask = confident & unlabeled
    weight, count = mask.float(), unlabeled.sum()
    l_con_g = masked_mean_ce(strong_g, targets, weight, count)
    l_con_f = masked_mean_ce(strong_f, targets, weight, count)
    total = l_clf + lambda_g * l_con_g + lambda_f * l_con_f
    return FeatMatchLoss(total, l_clf, l_con_g, l_con_f, targets, confidence, mask)


# ------------------------------------------------------------------------------------------- released


class ReleasedLoss(NamedTuple):
    total: torch.Tensor
    clf: torch.Tensor  # L_clf (mixed rows whose un-mixed image is labeled)
    con_g: torch.Tensor  # L_con-g (the other mixed rows, through AugF)
    con_f: torch.Tensor  # L_con-f (the other mixed rows, without AugF)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits in float32; float32 and float64 ones as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T), renormalised over the classes (dim 1)."""
    sharp = probs ** (1.0 / temperature)
    return sharp / sharp.sum(dim=1, keepdim=True)


def soft_targets(weak_logits: torch.Tensor, labels: torch.Tensor, temperature: float = RELEASED_TEMPERATURE) -> torch.Tensor:
    """[B, C] (float32, or float64 logits' float64), no gradient: one-hot labels on labeled rows, the sharpened softmax of the weak view's
    logits on unlabeled ones."""
    probs = sharpen(_at_least_fp32(weak_logits.detach()).softmax(dim=1), temperature)
    onehot = F.one_hot(labels.clamp(min=0), weak_logits.shape[1]).to(probs.dtype)
    return torch.where((labels >= 0).unsqueeze(1), onehot, probs)


def draw_mixup(n: int, rng: np.random.Generator, alpha: float = RELEASED_MIXUP_ALPHA) -> tuple[float, torch.Tensor]:
    """(λ' = max(λ, 1 − λ) with λ ~ Beta(α, α), a random permutation of n rows), as `data_mixup` draws them."""
    lam = float(rng.beta(alpha, alpha))
    return max(lam, 1.0 - lam), torch.from_numpy(rng.permutation(n))


def mixup(x: torch.Tensor, targets: torch.Tensor, lam: float, perm: torch.Tensor):
    """(λ·x + (1 − λ)·x[perm], the same of the targets, renormalised): every row mixed with a partner."""
    perm = perm.to(x.device)
    mixed = lam * targets + (1.0 - lam) * targets[perm]
    return lam * x + (1.0 - lam) * x[perm], mixed / mixed.sum(dim=1, keepdim=True)


def soft_ce(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over `rows` (bool) of −Σ_c targets·log softmax(logits); 0 when no row is selected."""
    per_row = -(targets * F.log_softmax(_at_least_fp32(logits), dim=1)).sum(dim=1)
    return (per_row * rows).sum() / rows.sum().clamp(min=1)


def rampup(step: int, steps: int) -> float:
    """The released consistency weight: step / steps, 1 from `steps` on (and with no ramp-up)."""
    return 1.0 if step >= steps else step / steps


def featmatch_released_loss(
    mixed_g: torch.Tensor,
    mixed_f: torch.Tensor,
    mixed_targets: torch.Tensor,
    labeled: torch.Tensor,
    *,
    coeff: float,
    lambda_g: float = RELEASED_LAMBDA_G,
    lambda_f: float = RELEASED_LAMBDA_F,
) -> ReleasedLoss:
    """The released objective from logits [N, C] of the mixed batch with (`mixed_g`) and without (`mixed_f`)
    AugF, its mixed targets [N, C] and `labeled` [N] (bool: the row's un-mixed image is labeled)."""
    if not (mixed_g.shape == mixed_f.shape == mixed_targets.shape) or mixed_g.ndim != 2:
        raise ValueError(f"logits and targets must all be [N, C], got {tuple(mixed_g.shape)}, "
                         f"{tuple(mixed_f.shape)}, {tuple(mixed_targets.shape)}")
    if labeled.shape != mixed_g.shape[:1]:
        raise ValueError(f"labeled must be [N={mixed_g.shape[0]}], got {tuple(labeled.shape)}")
    labeled = labeled.to(mixed_g.device)
    l_clf = soft_ce(mixed_g, mixed_targets, labeled)
    l_con_g = soft_ce(mixed_g, mixed_targets, ~labeled)
    l_con_f = soft_ce(mixed_f, mixed_targets, ~labeled)
    return ReleasedLoss(l_clf + coeff * (lambda_g * l_con_g + lambda_f * l_con_f), l_clf, l_con_g, l_con_f)
