"""Deep InfoMax's local-global mutual-information estimators (Hjelm et al., ICLR 2019; rdevon/DIM).

Scores s = g_b·l_{j,m}: the encoded global vector of image b against the encoded local feature m of image
j, for every image of the global batch (locals gathered from all ranks, gradients back to their owners).
A pair is positive when j = b (M per query), negative otherwise ((W·B − 1)·M per query).

- "jsd" (the official default): E_neg − E_pos with E_pos the mean of log 2 − softplus(−s) over positive
  pairs and E_neg the mean of softplus(−s) + s − log 2 over negative pairs, as `fenchel_dual_loss` averages
  them (every image has the same number of locals, so a mean over pairs is a mean over images of their
  means). Dense: B × W·B·M scores per rank (8 MiB at 64 images × 8 ranks × 64 locals).
- "infonce": each positive its own softmax over itself and the query's negatives,
  −mean_{b,m}[s_{b,bm} − logaddexp(s_{b,bm}, LSE_neg(b))], LSE_neg over the locals of the other images
  only (the official `nce_loss` keeps the image's other locals in the denominator at score −10: we mask
  them out, as the paper's estimator has it). LSE_neg is the fused masked row log-sum-exp
  (`row_lse.row_log_sum_exp`): never the B × W·B·M logits.
- "dv" (Donsker-Varadhan): E_neg − E_pos with E_pos the mean positive score and E_neg the log of the mean
  of exp(s) over every negative pair of the global batch, as `donsker_varadhan_loss` pools them: the
  per-query masked LSEs gathered across ranks (with gradient), so W ranks equal one process.

Loss scaling across ranks is `gathered_info_nce`'s: each rank means over its own queries, the gathers'
backward sums over ranks, and the engine's averaging gives the gradient of the global mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.distributed import gather_with_grad, rank, world_size

from . import checks
from .logits import ScaledLogits
from .row_lse import pair_dots, row_log_sum_exp

ESTIMATORS = ("jsd", "infonce", "dv")
LOG_2 = math.log(2.0)


def dim_loss(g: torch.Tensor, l: torch.Tensor, estimator: str = "jsd", impl: str = "auto") -> torch.Tensor:
    """Local-global DIM loss of this rank's encoded globals g [B, D] and encoded locals l [B, M, D].

    impl (infonce, dv): "reference" (dense masked logits, the definition), "chunked", "triton" or "auto"
    (Triton on CUDA, chunked otherwise); jsd is always dense. The loss is fp32 (fp64 for fp64 inputs).
    """
    checks.check_choice("estimator", estimator, ESTIMATORS)
    checks.check_queries_and_locals("g", g, l, "DIM")
    impl = checks.resolve_impl(impl, g)
    rows, locals_per_image = l.shape[:2]
    work = torch.promote_types(g.dtype, torch.float32)
    g = g.to(work)
    keys = gather_with_grad(l.flatten(0, 1)).to(work)  # [W·B·M, D], image-major: image i owns rows i·M..i·M+M-1
    first = (rank() * rows + torch.arange(rows, device=g.device)) * locals_per_image
    own = first[:, None] + torch.arange(locals_per_image, device=g.device)  # [B, M]: the query's own locals
    positive = pair_dots(g, keys, own)  # [B, M]
    if estimator == "jsd":
        return _jsd(g, keys, own, positive)
    negative_lse = _negative_lse(g, keys, own, impl)  # [B]
    if estimator == "infonce":
        return -(positive - torch.logaddexp(positive, negative_lse[:, None])).mean()
    negatives = keys.shape[0] - locals_per_image  # per query
    pooled = torch.logsumexp(gather_with_grad(negative_lse), 0) - math.log(world_size() * rows * negatives)
    return pooled - positive.mean()


def _negative_lse(g, keys, own, impl) -> torch.Tensor:
    """log Σ exp(s) over the keys of the other images, per query [B]."""
    if impl != "reference":
        return row_log_sum_exp(g, keys, None, own, ScaledLogits(1.0), impl)
    scores = (g @ keys.T).scatter(1, own, float("-inf"))
    return torch.logsumexp(scores, 1)


def _jsd(g, keys, own, positive) -> torch.Tensor:
    # softplus(−s) + s = softplus(s); the positives' columns are zeroed, not subtracted (no cancellation).
    negatives = keys.shape[0] - own.shape[1]
    negative_sum = F.softplus(g @ keys.T).scatter(1, own, 0.0).sum(1)
    e_negative = (negative_sum / negatives).mean() - LOG_2
    e_positive = LOG_2 - F.softplus(-positive).mean()
    return e_negative - e_positive
