"""Triton kernels for the row log-sum-exp of `row_lse` (InfoNCE, OUCL, AMDIM): O(B + N) memory.

Forward: one program per block of query rows loops over key tiles, computes S = Q·Kᵀ in fp32 from
fp16/bf16/fp32 inputs, applies the epilogue (z = S/τ, OUCL's weighted negatives, AMDIM's clipped scores),
and keeps a running max and sum (online log-sum-exp); only lse [B] is stored.
Backward recomputes the tiles, W = g·softmax·dz/dx, and needs no atomics: one kernel over query blocks
accumulates dQ = W·K, a second over key blocks accumulates dKᵀ = Wᵀ·Q (so autotuning may rerun both).
A backward that is to be differentiated again (create_graph, MetAug's meta step) runs chunked's PyTorch
code instead, which autograd can follow; the derivatives of lse in it come back to these kernels.
Features up to D = 256 are one chunk that stays in registers. Wider ones (up to 1024) go in chunks of
128: each backward program owns one chunk of its output, so the fp32 accumulator fits in registers, and
recomputes the tile scores over all chunks (ptxas reports spills there, unlike at D = 128 and 256).
Any B and N: partial tiles are masked. W is cast to the input dtype for the tensor-core products, as
PyTorch's own half-precision matmuls do: bf16 keeps fp32's range, fp16 training needs loss scaling.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chunked import row_lse_grads
from .logits import CircleNegativeLogits, Logits, ScaledLogits, TanhClipLogits

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
MAX_BLOCK_D = 256  # feature dims up to this are one (masked, power-of-two) chunk
WIDE_BLOCK_D = 128  # the chunk for wider features


def _configs(tiles):
    """Tiles for the H100; one small tile under the interpreter, which cannot time configurations."""
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


FORWARD_CONFIGS = _configs([(128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 8, 4), (64, 64, 4, 2)])
BACKWARD_CONFIGS = _configs([(64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2)])
TUNING_KEY = ["D", "N_EXCLUDE", "EPILOGUE"]


@triton.jit
def _load_chunk(ptr, index, valid, stride, d0, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `index` of a row-major [rows, D] matrix, feature columns d0..d0+BLOCK_D (zeros outside)."""
    dims = d0 + tl.arange(0, BLOCK_D)
    offsets = index.to(tl.int64)[:, None] * stride + dims[None, :]
    return tl.load(ptr + offsets, mask=valid[:, None] & (dims[None, :] < D), other=0.0)


@triton.jit
def _store_chunk(ptr, index, valid, stride, d0, values, D: tl.constexpr, BLOCK_D: tl.constexpr):
    dims = d0 + tl.arange(0, BLOCK_D)
    offsets = index.to(tl.int64)[:, None] * stride + dims[None, :]
    tl.store(ptr + offsets, values.to(ptr.dtype.element_ty), mask=valid[:, None] & (dims[None, :] < D))


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b with fp32 accumulation. UPCAST: the interpreter multiplies bf16 bit patterns (triton#11584),
    so there bf16 operands go through fp32, which holds their products exactly."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _scores(a_c, A, a_index, a_valid, a_stride, B, b_index, b_valid, b_stride, c0,
            D: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 tile A[a_index]·B[b_index]ᵀ over all D features, and B's feature chunk at c0 (the caller's
    output chunk, for the backward products). a_c, A's chunk at c0, stays in registers across the tiles
    when D fits one chunk; wider features stream through all their chunks (a_c is then unused)."""
    b_c = _load_chunk(B, b_index, b_valid, b_stride, c0, D, BLOCK_D)
    if D <= BLOCK_D:
        s = _mma(a_c, tl.trans(b_c), None, PRECISION, UPCAST)
    else:
        a = _load_chunk(A, a_index, a_valid, a_stride, 0, D, BLOCK_D)
        b = _load_chunk(B, b_index, b_valid, b_stride, 0, D, BLOCK_D)
        s = _mma(a, tl.trans(b), None, PRECISION, UPCAST)
        for d0 in range(BLOCK_D, D, BLOCK_D):
            a = _load_chunk(A, a_index, a_valid, a_stride, d0, D, BLOCK_D)
            b = _load_chunk(B, b_index, b_valid, b_stride, d0, D, BLOCK_D)
            s = _mma(a, tl.trans(b), s, PRECISION, UPCAST)
    return s, b_c


@triton.jit
def _logits_and_slope(x, scale, beta, optimum, margin, EPILOGUE: tl.constexpr, DETACH: tl.constexpr):
    """Mirror of `logits.ScaledLogits` (EPILOGUE 0), `logits.CircleNegativeLogits` (EPILOGUE 1) and
    `logits.TanhClipLogits` (EPILOGUE 2, its clip passed as beta)."""
    if EPILOGUE == 0:
        z = x * scale
        slope = scale
    elif EPILOGUE == 2:
        t = 1.0 - 2.0 / (tl.exp(2.0 * x * scale / beta) + 1.0)  # tanh; exp's overflow to inf gives t = 1
        z = beta * t
        slope = scale * (1.0 - t * t)
    else:
        s = (x + 1.0) * 0.5
        weight = tl.maximum(s - optimum, 0.0)
        z = beta * weight * (s - margin)
        if DETACH:
            slope = 0.5 * beta * weight
        else:
            slope = 0.5 * beta * (weight + tl.where(s > optimum, s - margin, 0.0))
    return z, slope


@triton.jit
def _kept(row_index, row_valid, key_index, key_valid, EXCLUDE, exclude_stride, N_EXCLUDE: tl.constexpr):
    """Which (row, key) pairs enter the sums. The arguments are 2-D views ([:, None] / [None, :]) that
    broadcast, so one function serves [rows, keys] and [keys, rows] tiles."""
    kept = row_valid & key_valid
    for e in tl.static_range(N_EXCLUDE):
        left_out = tl.load(EXCLUDE + row_index * exclude_stride + e, mask=row_valid, other=-1)
        kept = kept & (key_index != left_out)
    return kept


@triton.jit
def _grad_weights(x, lse, grad, kept, scale, beta, optimum, margin, EPILOGUE: tl.constexpr, DETACH: tl.constexpr):
    """g_i·softmax_ij·dz/dx: the weight of key j in dQ_i and of query i in dK_j (lse, grad broadcast)."""
    z, slope = _logits_and_slope(x, scale, beta, optimum, margin, EPILOGUE, DETACH)
    # where() before the product: a row with no key kept has lse = -inf, and exp(-inf + inf) is NaN.
    return tl.where(kept, tl.exp(z - lse), 0.0) * (grad * slope)


@triton.jit
def _online_lse(m, l, q_c, Q, rows, row_valid, q_stride, K, n_keys, k_stride, EXCLUDE, exclude_stride,
                scale, beta, optimum, margin,
                N_EXCLUDE: tl.constexpr, EPILOGUE: tl.constexpr, DETACH: tl.constexpr, D: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    for start in range(0, n_keys, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_valid = keys < n_keys
        x, _ = _scores(q_c, Q, rows, row_valid, q_stride, K, keys, key_valid, k_stride, 0, D, BLOCK_D, PRECISION, UPCAST)
        z, _ = _logits_and_slope(x, scale, beta, optimum, margin, EPILOGUE, DETACH)
        kept = _kept(rows[:, None], row_valid[:, None], keys[None, :], key_valid[None, :], EXCLUDE, exclude_stride, N_EXCLUDE)
        z = tl.where(kept, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing kept yet stay at l = 0
        l = l * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
        m = m_new
    return m, l


@triton.autotune(configs=FORWARD_CONFIGS, key=TUNING_KEY)
@triton.jit
def _forward_kernel(Q, K, QUEUE, EXCLUDE, LSE, n_rows, n_keys, n_queue,
                    q_stride, k_stride, queue_stride, exclude_stride,
                    scale, beta, optimum, margin,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, N_EXCLUDE: tl.constexpr, EPILOGUE: tl.constexpr,
                    DETACH: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < n_rows
    q_c = _load_chunk(Q, rows, row_valid, q_stride, 0, D, BLOCK_D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    m, l = _online_lse(m, l, q_c, Q, rows, row_valid, q_stride, K, n_keys, k_stride, EXCLUDE, exclude_stride,
                       scale, beta, optimum, margin, N_EXCLUDE, EPILOGUE, DETACH, D, BLOCK_D, BLOCK_N, PRECISION, UPCAST)
    m, l = _online_lse(m, l, q_c, Q, rows, row_valid, q_stride, QUEUE, n_queue, queue_stride, EXCLUDE, exclude_stride,
                       scale, beta, optimum, margin, 0, EPILOGUE, DETACH, D, BLOCK_D, BLOCK_N, PRECISION, UPCAST)
    tl.store(LSE + rows, m + tl.log(l), mask=row_valid)


@triton.jit
def _query_grad_pass(acc, q_c, Q, rows, row_valid, q_stride, lse, grad, K, n_keys, k_stride, EXCLUDE, exclude_stride,
                     c0, scale, beta, optimum, margin,
                     N_EXCLUDE: tl.constexpr, EPILOGUE: tl.constexpr, DETACH: tl.constexpr, D: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    for start in range(0, n_keys, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_valid = keys < n_keys
        x, k_c = _scores(q_c, Q, rows, row_valid, q_stride, K, keys, key_valid, k_stride, c0, D, BLOCK_D, PRECISION, UPCAST)
        kept = _kept(rows[:, None], row_valid[:, None], keys[None, :], key_valid[None, :], EXCLUDE, exclude_stride, N_EXCLUDE)
        w = _grad_weights(x, lse[:, None], grad[:, None], kept, scale, beta, optimum, margin, EPILOGUE, DETACH)
        acc = _mma(w.to(k_c.dtype), k_c, acc, PRECISION, UPCAST)
    return acc


@triton.autotune(configs=BACKWARD_CONFIGS, key=TUNING_KEY)
@triton.jit
def _query_grad_kernel(Q, K, QUEUE, EXCLUDE, LSE, GRAD, DQ, n_rows, n_keys, n_queue,
                       q_stride, k_stride, queue_stride, exclude_stride, dq_stride,
                       scale, beta, optimum, margin,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, N_EXCLUDE: tl.constexpr, EPILOGUE: tl.constexpr,
                       DETACH: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < n_rows
    c0 = tl.program_id(1) * BLOCK_D
    q_c = _load_chunk(Q, rows, row_valid, q_stride, c0, D, BLOCK_D)
    lse = tl.load(LSE + rows, mask=row_valid, other=0.0)
    grad = tl.load(GRAD + rows, mask=row_valid, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc = _query_grad_pass(acc, q_c, Q, rows, row_valid, q_stride, lse, grad, K, n_keys, k_stride, EXCLUDE,
                           exclude_stride, c0, scale, beta, optimum, margin,
                           N_EXCLUDE, EPILOGUE, DETACH, D, BLOCK_D, BLOCK_N, PRECISION, UPCAST)
    acc = _query_grad_pass(acc, q_c, Q, rows, row_valid, q_stride, lse, grad, QUEUE, n_queue, queue_stride, EXCLUDE,
                           exclude_stride, c0, scale, beta, optimum, margin,
                           0, EPILOGUE, DETACH, D, BLOCK_D, BLOCK_N, PRECISION, UPCAST)
    _store_chunk(DQ, rows, row_valid, dq_stride, c0, acc, D, BLOCK_D)


@triton.autotune(configs=BACKWARD_CONFIGS, key=TUNING_KEY)
@triton.jit
def _key_grad_kernel(Q, K, EXCLUDE, LSE, GRAD, DK, n_rows, n_keys,
                     q_stride, k_stride, exclude_stride, dk_stride,
                     scale, beta, optimum, margin,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, N_EXCLUDE: tl.constexpr, EPILOGUE: tl.constexpr,
                     DETACH: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    key_valid = keys < n_keys
    c0 = tl.program_id(1) * BLOCK_D
    k_c = _load_chunk(K, keys, key_valid, k_stride, c0, D, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, n_rows, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_valid = rows < n_rows
        # The tile in [keys, rows] orientation, so that dK accumulates without transposing W.
        x, q_c = _scores(k_c, K, keys, key_valid, k_stride, Q, rows, row_valid, q_stride, c0, D, BLOCK_D, PRECISION, UPCAST)
        lse = tl.load(LSE + rows, mask=row_valid, other=0.0)
        grad = tl.load(GRAD + rows, mask=row_valid, other=0.0)
        kept = _kept(rows[None, :], row_valid[None, :], keys[:, None], key_valid[:, None], EXCLUDE, exclude_stride, N_EXCLUDE)
        w = _grad_weights(x, lse[None, :], grad[None, :], kept, scale, beta, optimum, margin, EPILOGUE, DETACH)
        acc = _mma(w.to(q_c.dtype), q_c, acc, PRECISION, UPCAST)
    _store_chunk(DK, keys, key_valid, dk_stride, c0, acc, D, BLOCK_D)


def block_d(dim: int) -> int:
    return triton.next_power_of_2(dim) if dim <= MAX_BLOCK_D else WIDE_BLOCK_D


def _constants(q: torch.Tensor, logits: Logits) -> dict:
    """Scalar and compile-time arguments shared by the three kernels."""
    if isinstance(logits, ScaledLogits):
        epilogue = dict(scale=logits.scale, beta=0.0, optimum=0.0, margin=0.0, EPILOGUE=0, DETACH=False)
    elif isinstance(logits, CircleNegativeLogits):
        epilogue = dict(scale=0.0, beta=logits.beta, optimum=logits.optimum, margin=logits.margin, EPILOGUE=1,
                        DETACH=logits.detach_weight)
    elif isinstance(logits, TanhClipLogits):
        epilogue = dict(scale=logits.scale, beta=logits.clip, optimum=0.0, margin=0.0, EPILOGUE=2, DETACH=False)
    else:
        raise TypeError(f"no Triton epilogue for {type(logits).__name__}")
    dim = q.shape[1]
    return dict(
        epilogue,
        D=dim,
        BLOCK_D=block_d(dim),
        # fp32 inputs stay fp32 (not TF32): a user who passes fp32 asks for fp32 accuracy.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRETING and q.dtype == torch.bfloat16,
    )


class TritonRowLSE(torch.autograd.Function):
    """`row_lse.row_log_sum_exp` on the Triton kernels; lse is fp32. Under create_graph the backward is
    chunked's PyTorch one instead, which autograd can differentiate again (the kernels' it cannot)."""

    @staticmethod
    def forward(ctx, q, keys, queue, exclude, logits: Logits):
        given = q, keys, queue, exclude
        q, (keys, n_keys), (queue, n_queue), exclude = _kernel_inputs(q, keys, queue, exclude)
        constants = dict(_constants(q, logits), N_EXCLUDE=0 if exclude is None else exclude.shape[1])
        exclude_stride = 0 if exclude is None else exclude.stride(0)
        lse = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
        _forward_kernel[lambda meta: (triton.cdiv(q.shape[0], meta["BLOCK_M"]),)](
            q, keys, queue, exclude, lse, q.shape[0], n_keys, n_queue,
            q.stride(0), keys.stride(0), queue.stride(0), exclude_stride, **constants,
        )
        # The inputs as given, not contiguous copies: a backward differentiated again must reach them.
        ctx.save_for_backward(*given, lse)
        ctx.logits, ctx.exclude_stride, ctx.constants = logits, exclude_stride, constants
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        q, keys, queue, exclude, lse = ctx.saved_tensors
        want_q, want_keys = ctx.needs_input_grad[0], keys is not None and ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph
            grads = row_lse_grads(q, keys, queue, exclude, ctx.logits, lse, grad_lse, want_q, want_keys)
            return (*grads, None, None, None)
        q, (keys, n_keys), (queue, n_queue), exclude = _kernel_inputs(q, keys, queue, exclude)
        exclude_stride, constants = ctx.exclude_stride, ctx.constants
        grad_lse = grad_lse.float().contiguous()  # the mean's backward hands over a stride-0 view
        chunks = triton.cdiv(q.shape[1], constants["BLOCK_D"])
        grad_q = grad_keys = None
        if want_q:
            grad_q = torch.empty_like(q)
            _query_grad_kernel[lambda meta: (triton.cdiv(q.shape[0], meta["BLOCK_M"]), chunks)](
                q, keys, queue, exclude, lse, grad_lse, grad_q, q.shape[0], n_keys, n_queue,
                q.stride(0), keys.stride(0), queue.stride(0), exclude_stride, grad_q.stride(0), **constants,
            )
        if want_keys:
            grad_keys = torch.empty_like(keys)
            _key_grad_kernel[lambda meta: (triton.cdiv(n_keys, meta["BLOCK_N"]), chunks)](
                q, keys, exclude, lse, grad_lse, grad_keys, q.shape[0], n_keys,
                q.stride(0), keys.stride(0), exclude_stride, grad_keys.stride(0), **constants,
            )
        return grad_q, grad_keys, None, None, None


def _kernel_inputs(q, keys, queue, exclude):
    """Contiguous q, (keys, count), (queue, count) and int32 exclude, as the kernels read them."""
    q = q.contiguous()
    return q, _key_set(keys, q), _key_set(queue, q), None if exclude is None else exclude.to(torch.int32).contiguous()


def _key_set(keys: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A key set and its size for the kernels; an absent one is a zero-length loop, q standing in for its pointer."""
    return (q, 0) if keys is None else (keys.contiguous(), keys.shape[0])
