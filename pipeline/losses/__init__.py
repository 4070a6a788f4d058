"""Contrastive losses: InfoNCE (dense reference, chunked PyTorch, fused Triton), OUCL, gathered keys.

This floor imports nothing from pipeline.methods or pipeline.train. Triton is imported only when a Triton
path runs, so the package works where triton is absent.
"""

from .distributed import gathered_info_nce
from .featmatch import featmatch_loss
from .infonce import info_nce
from .oucl import oucl_log_sum_exps, oucl_loss, oucl_score_sets

__all__ = ["info_nce", "gathered_info_nce", "featmatch_loss", "oucl_log_sum_exps", "oucl_loss", "oucl_score_sets"]
