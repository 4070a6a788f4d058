"""Input validation shared by the losses: clear errors instead of wrong numbers or device asserts.

Shape, dtype and device checks read only metadata and always run. Checks that read tensor values
(non-finite features, index ranges, weight sums) run when the inputs are on the CPU, where they cost one
pass over data the loss reads anyway and no device synchronisation, and on the GPU only under
`torch.autograd.detect_anomaly()`: PyTorch's existing NaN-hunting switch, which synchronises anyway. The
training hot path on a GPU therefore never waits for the host because of a check.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from pipeline.distributed import world_size

IMPLS = ("auto", "reference", "chunked", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_DIM = 1024


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_features(name: str, x, like: torch.Tensor | None = None) -> None:
    """x is a floating [rows, D] tensor; with `like` (the queries q), of the same D, dtype and device."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor [rows, D]; got {got}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    if like is None:
        return
    if x.shape[1] != like.shape[1]:
        raise ValueError(f"{name} has feature dim D={x.shape[1]} but q has D={like.shape[1]}")
    if x.dtype != like.dtype:
        raise TypeError(f"{name} is {x.dtype} but q is {like.dtype}; cast them to one dtype")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but q is on {like.device}")


def check_queries_and_locals(q_name: str, q: torch.Tensor, l: torch.Tensor, method: str) -> None:
    """One query [B, D] per image against its locals [B, M, D] (DIM, AMDIM), contrasted with the other
    images of the global batch: shapes, dtypes, finite values, and at least two images in all."""
    check_features(q_name, q)
    if l.ndim != 3 or l.shape[0] != q.shape[0]:
        raise ValueError(f"l must be [B, M, D] with {q_name}'s B={q.shape[0]}; got shape {tuple(l.shape)}")
    check_features("l", l.flatten(0, 1), like=q)
    if value_checks_enabled(q, l):
        check_finite(q_name, q)
        check_finite("l", l)
    if world_size() * q.shape[0] < 2:
        raise ValueError(f"{method} needs at least two images in the global batch: the negatives are the other images' locals")


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python number; got {type(temperature).__name__}")
    if not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be positive and finite; got {temperature}")
    return float(temperature)


def index_per_row(name: str, index, rows: int, device: torch.device) -> torch.Tensor:
    """An integer tensor [B] or [B, P] of key indices, returned as int64 [B, P]."""
    if not isinstance(index, torch.Tensor) or index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of key indices; got {getattr(index, 'dtype', type(index).__name__)}")
    if index.ndim not in (1, 2) or index.shape[0] != rows or (index.ndim == 2 and index.shape[1] == 0):
        raise ValueError(f"{name} must have shape [B] or [B, P] with B={rows} rows of q; got {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but q is on {device}")
    return (index[:, None] if index.ndim == 1 else index).long()


def self_index(mask_self, rows: int, keys: int, device: torch.device, many: bool = False) -> torch.Tensor | None:
    """mask_self as an index [B] of the key each row leaves out of its denominator, or None. many=True:
    also accept [B, M] (M keys left out per row), and return [B, M] in every case."""
    if mask_self is False:
        return None
    if mask_self is True:
        if rows > keys:
            raise ValueError(f"mask_self=True masks key i for row i, which needs N >= B (B={rows}, N={keys}); pass an index per row")
        own = torch.arange(rows, device=device)
        return own[:, None] if many else own
    if isinstance(mask_self, torch.Tensor) and (mask_self.ndim == 1 or (many and mask_self.ndim == 2)):
        own = index_per_row("mask_self", mask_self, rows, device)
        return own if many else own[:, 0]
    shapes = "[B] or [B, M]" if many else "[B]"
    raise TypeError(f"mask_self must be a bool or an integer tensor {shapes} (the keys each row masks)")


def value_checks_enabled(*tensors: torch.Tensor | None) -> bool:
    return torch.is_anomaly_enabled() or all(t.device.type == "cpu" for t in tensors if t is not None)


class NonFiniteInput(ValueError):
    """A loss was given NaN or infinite features (the training loop reports it with the step)."""


def check_finite(name: str, x: torch.Tensor | None) -> None:
    if x is not None and not torch.isfinite(x).all():
        raise NonFiniteInput(f"{name} contains non-finite values (NaN or inf)")


def check_index_range(name: str, index: torch.Tensor | None, size: int) -> None:
    if index is None:
        return
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= size:
        raise IndexError(f"{name} must index {size} keys (0..{size - 1}); got values from {low} to {high}")


def triton_unsupported(q: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these queries, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the kernels need CUDA tensors (q is on {q.device}; TRITON_INTERPRET=1 runs them on the CPU)"
    if q.dtype not in TRITON_DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16 or float32)"
    if q.shape[1] % 16 or q.shape[1] > TRITON_MAX_DIM:
        return f"the feature dim must be a multiple of 16 up to {TRITON_MAX_DIM}; got D={q.shape[1]}"
    return None


def resolve_impl(impl: str, q: torch.Tensor) -> str:
    """"auto" is Triton on CUDA tensors it supports, the chunked PyTorch path otherwise."""
    check_choice("impl", impl, IMPLS)
    if impl == "auto":
        return "triton" if q.is_cuda and triton_unsupported(q) is None else "chunked"
    if impl == "triton" and (reason := triton_unsupported(q)):
        raise ValueError(f"impl='triton': {reason}")
    return impl
