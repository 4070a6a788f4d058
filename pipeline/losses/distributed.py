"""InfoNCE of local queries against keys gathered from all ranks, gradients returned to each key's owner.

Loss scaling: each rank takes the mean over its own B rows; every rank's loss reaches every key, so the
gather's backward (`pipeline.distributed.gather_with_grad`) sums the key gradients over ranks and keeps
the owner's rows. With the gradient averaging of DDP or DeepSpeed on top, parameter gradients equal those
of one process taking the mean over the concatenated batch (W·B rows against W·N keys). Averaging in the
gather's backward, or returning only the local part of the key gradient, are the classic mistakes
(open_clip issues 616, 894). Without a process group this is `info_nce`: the single-process twin.
"""

from __future__ import annotations

import torch

from pipeline.distributed import gather_with_grad, rank

from .infonce import info_nce


def gathered_info_nce(q, k, temperature, targets=None, target_weights=None, queue=None, in_batch_negatives=True,
                      mask_self=False, reduction="mean", impl="auto") -> torch.Tensor:
    """`info_nce` of local queries q [B, D] against k [N, D] gathered from all ranks ([W·N, D]).

    targets and an index-per-row mask_self address the gathered keys. By default local row i's positive,
    and with mask_self=True its masked key, is the key at rank·N + i: its own key, when q and k come from
    the same local batch. The queue is the same on every rank and is not gathered.
    """
    if (targets is None or mask_self is True) and q.shape[0] > k.shape[0]:
        raise ValueError(f"a row's own key is key i of this rank, which needs N >= B (B={q.shape[0]}, N={k.shape[0]})")
    own = torch.arange(q.shape[0], device=q.device) + rank() * k.shape[0]
    return info_nce(
        q, gather_with_grad(k), temperature,
        targets=own if targets is None else targets,
        target_weights=target_weights,
        queue=queue,
        in_batch_negatives=in_batch_negatives,
        mask_self=own if mask_self is True else mask_self,
        reduction=reduction,
        impl=impl,
    )
