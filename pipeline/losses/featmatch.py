"""FeatMatch's three losses (Kuo et al., ECCV 2020), in the FixMatch form of pseudo-labelling.

With g = AugF(f) the prototype-refined feature and `clf` the linear classifier, per batch:
    L_clf    = CE(clf(g(weak view)), y)                     over the labeled rows
    ŷ, conf  = argmax / max of softmax(clf(g(weak view)))   no gradient; the pseudo-label
    L_con-g  = Σ_u 1[conf ≥ τ] · CE(clf(g(strong view)), ŷ) / U   over the U unlabeled rows
    L_con-f  = Σ_u 1[conf ≥ τ] · CE(clf(f(strong view)), ŷ) / U   (the strong view without AugF)
    L        = L_clf + λ_g · L_con-g + λ_f · L_con-f
Consistency terms are averaged over all unlabeled rows, those under the threshold counting 0 (as
FixMatch does), so their weight does not jump with the share of confident rows. Labels are the loader's
convention: a class index, or -1 for an unlabeled row. A batch without labeled (or unlabeled) rows gives
0 for that term, without a host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

DEFAULT_THRESHOLD = 0.95  # FixMatch's τ
DEFAULT_LAMBDA_G = 1.0
DEFAULT_LAMBDA_F = 1.0


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
