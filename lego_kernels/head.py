r"""Triton kernels for the fused norm + exit head of an early-exit Transformer.

Every exit computes ``h = norm(x)`` and ``z = h @ W.T`` (``x: [N, D]``, ``W: [V, D]``) and turns
the logits ``z`` into a loss or a confidence. The ``N x V`` logits are never stored here except by
:func:`norm_head_logits`, whose output they are.

Norm (one program per block of rows; the statistics are saved for backward)::

    rms:   mu = 0,               rstd = 1 / sqrt(mean(x^2) + eps)
    layer: mu = mean(x),         rstd = 1 / sqrt(mean((x - mu)^2) + eps)
    xhat = (x - mu) * rstd,      h = xhat * w (+ b)

    backward, with g = dh * w:
    dx = rstd * (g - xhat * mean(g * xhat) - mean(g))    (the mean(g) term for layer only)
    dw = sum_rows(dh * xhat),    db = sum_rows(dh)

Head statistics (online softmax over vocabulary tiles; every statistic in float32). A program owns
``BLOCK_M`` tokens and one contiguous split of the vocabulary; it loops over ``BLOCK_N`` wide tiles
of that split, computes a logit tile with ``tl.dot`` (a K-loop over D), reduces the tile to::

    m = max_j z_j,   s = sum_j exp(z_j - m),   u = sum_j exp(z_j - m) (z_j - m),
    m2 = the second largest logit,   a = argmax_j z_j,   t = z_target (if the target is in the tile)

and merges it into its running state. Two states ``a`` and ``b`` merge as::

    m = max(m_a, m_b),   c_i = exp(m_i - m),   s = c_a s_a + c_b s_b,
    u = c_a (u_a + (m_a - m) s_a) + c_b (u_b + (m_b - m) s_b),
    m2 = max(m2_a, m2_b, min(m_a, m_b)),   a = a_b if m_b > m_a else a_a,   t = t_a + t_b.

The splits write their partial states to ``[splits, N]`` buffers and a second, small kernel merges
them with the same rule (splitting V keeps the GPU busy when N is small and V large, for example
N = 2048, V = 69,830). From the merged state::

    lse = m + log(s)       loss = lse - z_target (0 for ignored tokens and targets outside [0, V))
    max_prob = exp(m - lse) = 1 / s        margin = (1 - exp(m2 - m)) / s
    entropy H = lse - sum_j p_j z_j = log(s) - u / s,   confidence = 1 - H / ln(V)   (1 when V = 1)

Cross-entropy backward recomputes the logit tiles instead of storing them. With the per-token
coefficient ``g_i = dL/dloss_i * w_i`` (divided by the number of non-ignored tokens for ``mean``;
0 for ignored tokens)::

    G = (softmax(z) - onehot(target)) * g[:, None]        # [BLOCK_M, BLOCK_N], never stored
    dh[rows] += G @ W[cols],   dW[cols] += G^T @ h[rows]

Both updates go to float32 buffers (``N x D`` and ``V x D``) with atomic adds, as in Cut
Cross-Entropy: every (token block, vocabulary tile) pair is independent, so the backward needs no
``N x V`` buffer and no second pass, and the float32 accumulation keeps thousands of tile
contributions accurate. G is rounded to the input dtype for the 16-bit dots. Each update loops
over D in ``BLOCK_K`` chunks, so the accumulators in registers stay ``BLOCK_M x BLOCK_K`` for any
D. The norm backward kernel then turns dh into dx, d norm_weight and d norm_bias. Recomputing the
logits costs a fourth GEMM: forward + backward take 8NDV FLOPs where storing G would take 6NDV.
:func:`norm_head_logits` (whose ``N x V`` output exists anyway) uses cuBLAS through
``torch.nn.functional.linear`` for the GEMM and its gradients, and the norm kernels around it.

Precision: 16-bit inputs use the tensor-core ``tl.dot`` with float32 accumulation; float32 inputs
use TF32 only when ``torch.get_float32_matmul_precision()`` allows it (not "highest"), as torch's
own matmul does. Under Triton's interpreter (``TRITON_INTERPRET=1``) ``tl.dot`` on bfloat16
operands is wrong, so there the bfloat16 tiles are upcast to float32 before the dot (the
``DOT_DTYPE`` constexpr: float32 there, the input dtype otherwise, where the cast is a no-op);
on a GPU the bfloat16 tensor-core dot runs as is.

The functions here take validated, contiguous 2-D tensors (``lego_kernels.ops`` checks and
flattens) and never synchronize with the host. Tile sizes live in :data:`BLOCKS`; replace it to
tune, e.g. ``head.BLOCKS = dataclasses.replace(head.BLOCKS, block_n=256)``.
"""

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from lego_kernels.ops import _INTERPRET as INTERPRET  # TRITON_INTERPRET, read once by ops

# Codes of the confidence measures inside the kernels (0: no confidence, loss only).
_MEASURE_CODES = {"max_prob": 1, "margin": 2, "entropy": 3}
_MAX_PROB: tl.constexpr = tl.constexpr(1)
_MARGIN: tl.constexpr = tl.constexpr(2)
_ENTROPY: tl.constexpr = tl.constexpr(3)


@dataclasses.dataclass(frozen=True)
class HeadBlocks:
    """Tile sizes and launch parameters of the head kernels.

    Fused head (confidence, loss): ``block_m`` tokens x ``block_n`` vocabulary entries per tile,
    ``block_k`` hidden dims per K-step for 16-bit inputs (half as many for float32, whose tiles
    take twice the memory). Its backward uses the same tile with ``bwd_block_k``.
    ``confidence_from_logits`` (memory bound, no dot) reads ``logits_block_m x logits_block_n``.
    ``programs``: how many programs a launch aims for, by splitting the vocabulary (head kernels)
    or grouping rows (norm backward); ``None``: two per SM.
    ``norm_block``: elements per program of the norm kernels.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    bwd_block_k: int = 32
    bwd_num_stages: int = 2
    logits_block_m: int = 16
    logits_block_n: int = 512
    logits_num_warps: int = 4
    programs: int | None = None
    norm_block: int = 4096


# Defaults for a Hopper GPU (H100/H200), chosen without timings so far: ptxas (sm_90a) fits them
# in 255 registers with at most ~140 bytes of spills per thread. Under the interpreter every
# Triton op costs Python time whatever its size, so there the tiles are wide in V (few loop
# steps) but small in tokens and D, so that the small test shapes still cross tile, K-step and
# split boundaries.
BLOCKS = (
    HeadBlocks(
        block_m=16,
        block_n=128,
        block_k=32,
        bwd_block_k=32,
        logits_block_n=128,
        programs=4,
        norm_block=256,
    )
    if INTERPRET
    else HeadBlocks()
)


@functools.lru_cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if BLOCKS.programs is not None:
        return BLOCKS.programs
    if device.type != "cuda":
        return 1
    return 2 * _sm_count(device.index if device.index is not None else 0)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_flags(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """(DOT_DTYPE, input_precision) of the ``tl.dot`` calls for operands of ``dtype``."""
    dot_dtype = tl.float32 if INTERPRET and dtype == torch.bfloat16 else _TL_DTYPES[dtype]
    ieee = dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return dot_dtype, "ieee" if ieee else "tf32"


def _block_k(block_k: int, dtype: torch.dtype) -> int:
    """The K-step for operands of ``dtype``: ``block_k`` for 16-bit types, half for float32."""
    return block_k if dtype.itemsize == 2 else max(16, block_k // 2)


# ----------------------------------------------------------------------------------------------
# Norm
# ----------------------------------------------------------------------------------------------


@triton.jit
def _norm_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    h_ptr,
    stats_ptr,
    N,
    D,
    eps,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """h = (x - mu) * rstd * w + b for BLOCK_M rows; stats[0] = mu, stats[1] = rstd."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols[None, :] < D)
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32) if IS_RMS else tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    tl.store(h_ptr + offs, y.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(stats_ptr + rows, mean, mask=row_mask)
    tl.store(stats_ptr + N + rows, rstd, mask=row_mask)


@triton.jit
def _norm_bwd_kernel(
    dh_ptr,
    x_ptr,
    w_ptr,
    stats_ptr,
    dx_ptr,
    dw_ptr,
    db_ptr,
    N,
    D,
    rows_per_program,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dx for rows_per_program rows, and this program's partial sums of dw and db ([D] each)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_D], 1.0, dtype=tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_begin = pid * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, N)
    for r0 in range(row_begin, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(stats_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(stats_ptr + N + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if COMPUTE_DX:
            g = dh * w[None, :]
            dx = g - xhat * (tl.sum(g * xhat, axis=1) / D)[:, None]
            if not IS_RMS:
                dx = dx - (tl.sum(g, axis=1) / D)[:, None]
            dx = dx * rstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += tl.sum(dh * xhat, axis=0)
        if COMPUTE_DB:
            db += tl.sum(dh, axis=0)
    if COMPUTE_DW:
        tl.store(dw_ptr + pid * D + cols, dw, mask=col_mask)
    if COMPUTE_DB:
        tl.store(db_ptr + pid * D + cols, db, mask=col_mask)


def _norm_blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) of the norm kernels: a whole row per block, D <= 8192 or so."""
    block_d = triton.next_power_of_2(D)
    block_m = max(1, min(64, BLOCKS.norm_block // block_d))
    num_warps = 8 if block_m * block_d >= 8192 else 4
    return block_m, block_d, num_warps


def _norm_forward(
    x: Tensor, norm_weight: Tensor | None, norm_bias: Tensor | None, is_rms: bool, eps: float
) -> tuple[Tensor, Tensor]:
    """Normalize the rows of ``x`` [N, D].

    Returns ``h`` [N, D] in x.dtype and ``stats`` [2, N] float32 (row 0: mean, 0 for rms;
    row 1: rstd), which the backward reuses.
    """
    N, D = x.shape
    h = torch.empty((N, D), dtype=x.dtype, device=x.device)
    stats = torch.empty((2, N), dtype=torch.float32, device=x.device)
    if N == 0:
        return h, stats
    block_m, block_d, num_warps = _norm_blocks(D)
    _norm_fwd_kernel[(triton.cdiv(N, block_m),)](
        x,
        norm_weight,
        norm_bias,
        h,
        stats,
        N,
        D,
        eps,
        IS_RMS=is_rms,
        HAS_W=norm_weight is not None,
        HAS_B=norm_bias is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return h, stats


def _norm_backward(
    dh: Tensor,
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    stats: Tensor,
    is_rms: bool,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients (dx, d norm_weight, d norm_bias), each only where ``needs`` says so."""
    N, D = x.shape
    need_dx, need_dw, need_db = needs
    if N == 0:
        return (
            torch.empty((0, D), dtype=x.dtype, device=x.device) if need_dx else None,
            torch.zeros_like(norm_weight) if need_dw else None,
            torch.zeros_like(norm_bias) if need_db else None,
        )
    block_m, block_d, num_warps = _norm_blocks(D)
    programs = min(triton.cdiv(N, block_m), _target_programs(x.device))
    rows_per_program = triton.cdiv(triton.cdiv(N, programs), block_m) * block_m
    programs = triton.cdiv(N, rows_per_program)
    dx = torch.empty((N, D), dtype=x.dtype, device=x.device) if need_dx else None
    # Partial sums of d norm_weight and d norm_bias, one row per program.
    dw_part = torch.empty((programs, D), dtype=torch.float32, device=x.device) if need_dw else None
    db_part = torch.empty((programs, D), dtype=torch.float32, device=x.device) if need_db else None
    _norm_bwd_kernel[(programs,)](
        dh,
        x,
        norm_weight,
        stats,
        dx,
        dw_part,
        db_part,
        N,
        D,
        rows_per_program,
        IS_RMS=is_rms,
        HAS_W=norm_weight is not None,
        COMPUTE_DX=need_dx,
        COMPUTE_DW=need_dw,
        COMPUTE_DB=need_db,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    dw = dw_part.sum(0).to(norm_weight.dtype) if need_dw else None
    db = db_part.sum(0).to(norm_bias.dtype) if need_db else None
    return dx, dw, db


class _Norm(torch.autograd.Function):
    """h = norm(x) with the Triton kernels; backward reuses the saved row statistics."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        norm_weight: Tensor | None,
        norm_bias: Tensor | None,
        is_rms: bool,
        eps: float,
    ) -> Tensor:
        h, stats = _norm_forward(x, norm_weight, norm_bias, is_rms, eps)
        ctx.save_for_backward(x, norm_weight, norm_bias, stats)
        ctx.is_rms = is_rms
        return h

    @staticmethod
    def backward(ctx, dh: Tensor) -> tuple[Tensor | None, ...]:
        x, norm_weight, norm_bias, stats = ctx.saved_tensors
        dx, dw, db = _norm_backward(
            dh.contiguous(),
            x,
            norm_weight,
            norm_bias,
            stats,
            ctx.is_rms,
            tuple(ctx.needs_input_grad[:3]),
        )
        return dx, dw, db, None, None


def _apply_norm(
    x: Tensor, norm_weight: Tensor | None, norm_bias: Tensor | None, norm: str | None, eps: float
) -> Tensor:
    """norm(x) [N, D] in x.dtype, differentiable; ``norm=None`` returns x itself."""
    if norm is None:
        return x
    return _Norm.apply(x, norm_weight, norm_bias, norm == "rms", eps)


# ----------------------------------------------------------------------------------------------
# Head statistics: one online-softmax pass over vocabulary tiles
# ----------------------------------------------------------------------------------------------


@triton.jit
def _logit_tile(
    h_ptr,
    w_ptr,
    rows,
    cols,
    N,
    V,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """h[rows] @ W[cols].T as a float32 [BLOCK_M, BLOCK_N] tile (K-loop over D)."""
    ks = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + rows[:, None].to(tl.int64) * D
    w_cols = w_ptr + cols[None, :].to(tl.int64) * D
    row_mask = rows[:, None] < N
    col_mask = cols[None, :] < V
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + ks
        a = tl.load(h_rows + k[None, :], mask=row_mask & (k[None, :] < D), other=0.0)
        b = tl.load(w_cols + k[:, None], mask=col_mask & (k[:, None] < D), other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _merge(m_a, s_a, u_a, m2_a, a_a, m_b, s_b, u_b, m2_b, a_b):
    """Merge two online-softmax states (see the module docstring); empty states have s = 0."""
    m = tl.maximum(m_a, m_b)
    d_a = tl.where(s_a > 0, m_a - m, 0.0)
    d_b = tl.where(s_b > 0, m_b - m, 0.0)
    c_a = tl.where(s_a > 0, tl.exp(d_a), 0.0)
    c_b = tl.where(s_b > 0, tl.exp(d_b), 0.0)
    s = c_a * s_a + c_b * s_b
    u = c_a * (u_a + d_a * s_a) + c_b * (u_b + d_b * s_b)
    m2 = tl.maximum(tl.maximum(m2_a, m2_b), tl.minimum(m_a, m_b))
    a = tl.where(m_b > m_a, a_b, a_a)
    return m, s, u, m2, a


@triton.jit
def _stats_kernel(
    src_ptr,
    w_ptr,
    targets_ptr,
    part_ptr,
    arg_ptr,
    N,
    V,
    D,
    tiles_per_split,
    FROM_LOGITS: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    MEASURE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial softmax state of BLOCK_M tokens over one vocabulary split.

    src is h [N, D] (logits computed against w [V, D]) or, with FROM_LOGITS, the logits [N, V].
    Writes part[k, split, row] float32 for k = 0: max, 1: sum-exp, 2: entropy sum u,
    3: second max, 4: target logit; arg[split, row] int32 = argmax.
    """
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(N, BLOCK_M)
    pid_m = pid % num_row_blocks
    split = pid // num_row_blocks
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    if HAS_TARGETS:
        target = tl.load(targets_ptr + rows, mask=row_mask, other=-1)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    u = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    t = tl.zeros([BLOCK_M], dtype=tl.float32)
    v_begin = split * tiles_per_split * BLOCK_N
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_N, V)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_mask = cols < V
        if FROM_LOGITS:
            z_offs = rows[:, None].to(tl.int64) * V + cols[None, :]
            z = tl.load(src_ptr + z_offs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            z = z.to(tl.float32)
        else:
            z = _logit_tile(
                src_ptr, w_ptr, rows, cols, N, V, D,
                BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION,
            )  # fmt: skip
        z = tl.where(col_mask[None, :], z, float("-inf"))

        # Reduce the tile to (m, s, u, m2, arg) relative to its own max, then merge.
        m_t = tl.max(z, axis=1)
        p = tl.exp(z - m_t[:, None])
        s_t = tl.sum(p, axis=1)
        u_t = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2_t = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        arg_t = tl.zeros([BLOCK_M], dtype=tl.int32)
        if MEASURE == _ENTROPY:
            u_t = tl.sum(p * tl.where(p > 0, z - m_t[:, None], 0.0), axis=1)
        if MEASURE > 0:
            arg_t = v0 + tl.argmax(z, axis=1).to(tl.int32)
        if MEASURE == _MARGIN:
            z_rest = tl.where(cols[None, :] == arg_t[:, None], float("-inf"), z)
            m2_t = tl.max(z_rest, axis=1)
        m, s, u, m2, arg = _merge(m, s, u, m2, arg, m_t, s_t, u_t, m2_t, arg_t)
        if HAS_TARGETS:
            t += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)

    offs = split * N + rows
    split_size = tl.num_programs(0) // num_row_blocks * N
    tl.store(part_ptr + offs, m, mask=row_mask)
    tl.store(part_ptr + split_size + offs, s, mask=row_mask)
    if MEASURE == _ENTROPY:
        tl.store(part_ptr + 2 * split_size + offs, u, mask=row_mask)
    if MEASURE == _MARGIN:
        tl.store(part_ptr + 3 * split_size + offs, m2, mask=row_mask)
    if HAS_TARGETS:
        tl.store(part_ptr + 4 * split_size + offs, t, mask=row_mask)
    if MEASURE > 0:
        tl.store(arg_ptr + offs, arg, mask=row_mask)


@triton.jit
def _finish_kernel(
    part_ptr,
    arg_ptr,
    targets_ptr,
    lse_ptr,
    conf_ptr,
    pred_ptr,
    loss_ptr,
    N,
    V,
    inv_log_v,
    num_splits,
    ignore_index,
    HAS_TARGETS: tl.constexpr,
    MEASURE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Merge the partial states of the splits; write lse, confidence, prediction and loss."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    split_size = num_splits * N
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    u = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    t = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j in range(num_splits):
        offs = j * N + rows
        m_j = tl.load(part_ptr + offs, mask=row_mask, other=0.0)
        s_j = tl.load(part_ptr + split_size + offs, mask=row_mask, other=1.0)
        u_j = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2_j = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        arg_j = tl.zeros([BLOCK_M], dtype=tl.int32)
        if MEASURE == _ENTROPY:
            u_j = tl.load(part_ptr + 2 * split_size + offs, mask=row_mask, other=0.0)
        if MEASURE == _MARGIN:
            m2_j = tl.load(part_ptr + 3 * split_size + offs, mask=row_mask, other=0.0)
        if MEASURE > 0:
            arg_j = tl.load(arg_ptr + offs, mask=row_mask, other=0)
        m, s, u, m2, arg = _merge(m, s, u, m2, arg, m_j, s_j, u_j, m2_j, arg_j)
        if HAS_TARGETS:
            t += tl.load(part_ptr + 4 * split_size + offs, mask=row_mask, other=0.0)

    lse = m + tl.log(s)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if MEASURE > 0:
        if MEASURE == _MAX_PROB:
            conf = 1.0 / s
        elif MEASURE == _MARGIN:
            conf = (1.0 - tl.exp(m2 - m)) / s
        else:
            conf = 1.0 - (tl.log(s) - u / s) * inv_log_v
        tl.store(conf_ptr + rows, conf, mask=row_mask)
        tl.store(pred_ptr + rows, arg.to(tl.int64), mask=row_mask)
    if HAS_TARGETS:
        target = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
        valid = (target != ignore_index) & (target >= 0) & (target < V)
        loss = tl.where(valid, lse - t, 0.0)
        tl.store(loss_ptr + rows, loss, mask=row_mask)


def _vocab_splits(
    N: int, V: int, block_m: int, block_n: int, device: torch.device
) -> tuple[int, int, int]:
    """(row blocks, vocabulary splits, tiles per split) for the head kernels' grid.

    V is split until the grid has about as many programs as the device wants: N = 2048 with
    128-token blocks gives 16 row blocks, so V = 69,830 is cut into ~17 splits on an H100.
    """
    row_blocks = triton.cdiv(N, block_m)
    v_tiles = triton.cdiv(V, block_n)
    splits = max(1, min(v_tiles, triton.cdiv(_target_programs(device), row_blocks)))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    return row_blocks, triton.cdiv(v_tiles, tiles_per_split), tiles_per_split


def _head_stats(
    src: Tensor,
    weight: Tensor | None,
    targets: Tensor | None,
    ignore_index: int,
    measure: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One streaming pass over V: ``(lse, confidence, prediction, loss)``.

    src: h [N, D] with weight [V, D], or logits [N, V] with ``weight=None``. lse, confidence and
    loss are float32 [N], prediction int64 [N]; confidence/prediction are empty for
    ``measure=0`` and loss (lse - target logit, 0 where ignored) is empty without targets.
    """
    N = src.shape[0]
    V = src.shape[1] if weight is None else weight.shape[0]
    device = src.device
    lse = torch.empty(N, dtype=torch.float32, device=device)
    conf = torch.empty(N if measure else 0, dtype=torch.float32, device=device)
    pred = torch.empty(N if measure else 0, dtype=torch.int64, device=device)
    loss = torch.empty(N if targets is not None else 0, dtype=torch.float32, device=device)
    if N == 0:
        return lse, conf, pred, loss

    from_logits = weight is None
    if from_logits:
        block_m, block_n, num_warps = (
            BLOCKS.logits_block_m,
            BLOCKS.logits_block_n,
            BLOCKS.logits_num_warps,
        )
    else:
        block_m, block_n, num_warps = BLOCKS.block_m, BLOCKS.block_n, BLOCKS.num_warps
    row_blocks, splits, tiles_per_split = _vocab_splits(N, V, block_m, block_n, device)
    part = torch.empty((5, splits, N), dtype=torch.float32, device=device)
    arg = torch.empty((splits, N), dtype=torch.int32, device=device)
    # (DOT_DTYPE and PRECISION do not matter without a dot.)
    dot_dtype, precision = (tl.float32, "ieee") if from_logits else _dot_flags(src.dtype)
    _stats_kernel[(row_blocks * splits,)](
        src,
        weight,
        targets,
        part,
        arg,
        N,
        V,
        src.shape[1],
        tiles_per_split,
        FROM_LOGITS=from_logits,
        HAS_TARGETS=targets is not None,
        MEASURE=measure,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=_block_k(BLOCKS.block_k, src.dtype),
        DOT_DTYPE=dot_dtype,
        PRECISION=precision,
        num_warps=num_warps,
        num_stages=BLOCKS.num_stages,
    )
    finish_block = 256
    _finish_kernel[(triton.cdiv(N, finish_block),)](
        part,
        arg,
        targets,
        lse,
        conf,
        pred,
        loss,
        N,
        V,
        1.0 / math.log(V) if V > 1 else 0.0,  # entropy normalization; V = 1 has H = 0
        splits,
        ignore_index,
        HAS_TARGETS=targets is not None,
        MEASURE=measure,
        BLOCK_M=finish_block,
    )
    return lse, conf, pred, loss


# ----------------------------------------------------------------------------------------------
# Cross-entropy backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ce_bwd_kernel(
    h_ptr,
    w_ptr,
    targets_ptr,
    lse_ptr,
    coef_ptr,
    dh_ptr,
    dw_ptr,
    N,
    V,
    D,
    tiles_per_split,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dh += G @ W and dW += G^T @ h (float32 atomics) for BLOCK_M tokens over one split of V."""
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(N, BLOCK_M)
    pid_m = pid % num_row_blocks
    split = pid // num_row_blocks
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    ks = tl.arange(0, BLOCK_K)
    row_offs = rows[:, None].to(tl.int64) * D  # dh_ptr/dw_ptr are None when not computed

    v_begin = split * tiles_per_split * BLOCK_N
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_N, V)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_mask = cols < V
        z = _logit_tile(
            h_ptr, w_ptr, rows, cols, N, V, D,
            BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION,
        )  # fmt: skip
        p = tl.exp(z - lse[:, None])
        g = (p - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)) * coef[:, None]
        # Round G to the input dtype as the GPU's 16-bit dot does, then to the dot's dtype.
        g = tl.where(col_mask[None, :], g, 0.0).to(h_ptr.dtype.element_ty).to(DOT_DTYPE)

        col_offs = cols[:, None].to(tl.int64) * D
        for k0 in range(0, D, BLOCK_K):
            k = k0 + ks
            k_mask = k < D
            if COMPUTE_DH:
                w_k = tl.load(
                    w_ptr + col_offs + k[None, :],
                    mask=col_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                dh_k = tl.dot(g, w_k.to(DOT_DTYPE), input_precision=PRECISION)
                tl.atomic_add(
                    dh_ptr + row_offs + k[None, :],
                    dh_k,
                    mask=row_mask[:, None] & k_mask[None, :],
                    sem="relaxed",
                )
            if COMPUTE_DW:
                h_k = tl.load(
                    h_ptr + row_offs + k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                dw_k = tl.dot(tl.trans(g), h_k.to(DOT_DTYPE), input_precision=PRECISION)
                tl.atomic_add(
                    dw_ptr + col_offs + k[None, :],
                    dw_k,
                    mask=col_mask[:, None] & k_mask[None, :],
                    sem="relaxed",
                )


def _ce_backward(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    coef: Tensor,
    need_dh: bool,
    need_dw: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(dh [N, D] in h.dtype, dW [V, D] in weight.dtype) of sum_i coef_i * loss_i, as required."""
    N, D = h.shape
    V = weight.shape[0]
    dh = torch.zeros((N, D), dtype=torch.float32, device=h.device) if need_dh else None
    dw = torch.zeros((V, D), dtype=torch.float32, device=h.device) if need_dw else None
    if N > 0:
        row_blocks, splits, tiles_per_split = _vocab_splits(
            N, V, BLOCKS.block_m, BLOCKS.block_n, h.device
        )
        dot_dtype, precision = _dot_flags(h.dtype)
        _ce_bwd_kernel[(row_blocks * splits,)](
            h,
            weight,
            targets,
            lse,
            coef,
            dh,
            dw,
            N,
            V,
            D,
            tiles_per_split,
            COMPUTE_DH=need_dh,
            COMPUTE_DW=need_dw,
            BLOCK_M=BLOCKS.block_m,
            BLOCK_N=BLOCKS.block_n,
            BLOCK_K=_block_k(BLOCKS.bwd_block_k, h.dtype),
            DOT_DTYPE=dot_dtype,
            PRECISION=precision,
            num_warps=BLOCKS.num_warps,
            num_stages=BLOCKS.bwd_num_stages,
        )
    return (
        dh.to(h.dtype) if need_dh else None,
        dw.to(weight.dtype) if need_dw else None,
    )


class _HeadCrossEntropy(torch.autograd.Function):
    """Cross-entropy of h @ W.T without the N x V logits; optionally the confidence as well."""

    @staticmethod
    def forward(
        ctx,
        h: Tensor,
        weight: Tensor,
        targets: Tensor,
        token_weights: Tensor | None,
        ignore_index: int,
        reduction: str,
        measure: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lse, conf, pred, token_loss = _head_stats(h, weight, targets, ignore_index, measure)
        # Targets outside [0, V) (not caught on CUDA, see ops) count as ignored.
        valid = (targets != ignore_index) & (targets >= 0) & (targets < weight.shape[0])
        # coef_i = d loss / d token_loss_i: the token weight, over the token count for "mean".
        coef = valid.to(torch.float32)
        if token_weights is not None:
            coef = coef * token_weights
        if reduction == "mean":
            coef = coef / valid.sum().clamp(min=1)
        if reduction == "none":
            loss = token_loss if token_weights is None else token_loss * token_weights
        else:
            loss = (token_loss * coef).sum()
        ctx.save_for_backward(h, weight, targets, lse, coef)
        ctx.mark_non_differentiable(conf, pred, lse)
        return loss, conf, pred, lse

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, targets, lse, coef = ctx.saved_tensors
        dh, dw = _ce_backward(
            h,
            weight,
            targets,
            lse,
            (coef * grad_loss).contiguous(),
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
        )
        return dh, dw, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Entry points called by lego_kernels.ops (validated, flattened, contiguous inputs)
# ----------------------------------------------------------------------------------------------


def norm_head_logits(
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm: str | None,
    eps: float,
) -> Tensor:
    """Logits ``norm(x) @ weight.T``: x [N, D], weight [V, D] -> [N, V] in x.dtype.

    Differentiable w.r.t. x, weight, norm_weight and norm_bias. The norm runs in Triton; the GEMM
    (whose N x V output is the result) and its gradients use cuBLAS through ``F.linear``.
    """
    return F.linear(_apply_norm(x, norm_weight, norm_bias, norm, eps), weight)


def exit_confidence(
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm: str | None,
    eps: float,
    measure: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(confidence f32 [N], prediction i64 [N], lse f32 [N]) of ``norm(x) @ weight.T``.

    x [N, D], weight [V, D]; no gradient and no N x V buffer.
    """
    h = _norm_forward(x, norm_weight, norm_bias, norm == "rms", eps)[0] if norm else x
    lse, conf, pred, _ = _head_stats(h, weight, None, 0, _MEASURE_CODES[measure])
    return conf, pred, lse


def confidence_from_logits(logits: Tensor, measure: str) -> tuple[Tensor, Tensor, Tensor]:
    """(confidence f32 [N], prediction i64 [N], lse f32 [N]) of logits [N, V], one pass over V."""
    lse, conf, pred, _ = _head_stats(logits, None, None, 0, _MEASURE_CODES[measure])
    return conf, pred, lse


def norm_head_cross_entropy(
    x: Tensor,
    weight: Tensor,
    targets: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    norm: str | None,
    eps: float,
    ignore_index: int,
    reduction: str,
    token_weights: Tensor | None,
    return_confidence: bool,
    measure: str,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Cross-entropy of ``norm(x) @ weight.T`` against targets, without the N x V logits.

    x [N, D], weight [V, D], targets int64 [N], token_weights float32 [N] or None. Returns the
    float32 loss (a scalar, or [N] for ``reduction="none"``), with ``(confidence, prediction,
    lse)`` from the same pass when ``return_confidence``. Backward computes only the gradients
    whose inputs require them (a frozen head costs no dW).
    """
    h = _apply_norm(x, norm_weight, norm_bias, norm, eps)
    code = _MEASURE_CODES[measure] if return_confidence else 0
    loss, conf, pred, lse = _HeadCrossEntropy.apply(
        h, weight, targets, token_weights, ignore_index, reduction, code
    )
    if return_confidence:
        return loss, (conf, pred, lse)
    return loss
