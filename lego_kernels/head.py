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
of that split, computes a logit tile with ``tl.dot`` (one K-step on an h tile loaded once per
program when D <= ``resident_dim``, else a K-loop over D), reduces the tile to::

    m = max_j z_j,   s = sum_j exp(z_j - m),   u = sum_j exp(z_j - m) (z_j - m),
    m2 = the second largest logit,   a = argmax_j z_j

and merges it into its running state. ``exp(z - m)`` is computed as ``exp2(z log2e - m log2e)``
(one FMA and one special-function op per logit), max and argmax come from one reduction, and
only a split's last tile masks its columns. The target logit ``t = h . W[target]`` is one dot per
token, outside the loop. Two states ``a`` and ``b`` merge as::

    m = max(m_a, m_b),   c_i = exp(m_i - m),   s = c_a s_a + c_b s_b,
    u = c_a (u_a + (m_a - m) s_a) + c_b (u_b + (m_b - m) s_b),
    m2 = max(m2_a, m2_b, min(m_a, m_b)),   a = a_b if m_b > m_a else a_a.

The splits write their partial states to ``[splits, N]`` buffers and a second, small kernel merges
them with the same rule, in a fixed order. The grid is sized to whole waves of the programs that
run at once (:func:`_split_plan`): N = 2048 and V = 69,830 give 16 row blocks x 8 splits, one
wave on 132 SMs. From the merged state::

    lse = m + log(s)       loss = lse - t (0 for ignored tokens and targets outside [0, V))
    max_prob = exp(m - lse) = 1 / s        margin = (1 - exp(m2 - m)) / s
    entropy H = lse - sum_j p_j z_j = log(s) - u / s,   confidence = 1 - H / ln(V)   (1 when V = 1)

The same statistics kernel reads logits instead of computing them for :func:`confidence_from_logits`
and for the chunked schedule (:mod:`lego_kernels.chunked`), whose chunk buffer has rows padded to a
multiple of 64 columns of -inf so that every load is a whole vector; :func:`logits_pass` then turns
that buffer into ``softmax - onehot(target)`` in place (:func:`_softmax_grad_kernel`).

Cross-entropy backward (fused schedule) recomputes the logit tiles instead of storing them. With
the per-token coefficient ``g_i = dL/dloss_i`` (autograd's upstream gradient of the per-token
losses: the token weight, over the number of counted tokens for ``mean``; 0 for ignored
tokens)::

    G = (softmax(z) - onehot(target)) * g[:, None]        # [BLOCK_M, BLOCK_N], never stored
    dh[rows] += G @ W[cols],   dW[cols] += G^T @ h[rows]

dW goes to a float32 ``V x D`` buffer with atomic adds, as in Cut Cross-Entropy: every (token
block, vocabulary tile) pair is independent, so the backward needs no ``N x V`` buffer and no
second pass. dh: when D fits one K-step a program sums its split's contributions in registers and
writes them once to its own slice of a ``[splits, N, D]`` buffer, which is then summed in order
(no atomics); for larger D it goes to ``N x D`` float32 with atomic adds. The atomics make the
fused backward's gradients vary in the last bits from run to run, which is why
``lego_kernels.ops`` uses the chunked schedule under ``torch.use_deterministic_algorithms(True)``.
G is rounded to the input dtype for the 16-bit dots. The norm backward kernel then turns dh into
dx, d norm_weight and d norm_bias. Recomputing the logits costs a fourth GEMM: forward + backward
take 8NDV FLOPs where the chunked schedule takes 6NDV. :func:`norm_head_logits` (whose ``N x V``
output exists anyway) uses cuBLAS through ``torch.nn.functional.linear`` for the GEMM and its
gradients, and the norm kernels around it.

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

from lego_kernels import chunked
from lego_kernels.ops import _INTERPRET as INTERPRET  # TRITON_INTERPRET, read once by ops

# Codes of the confidence measures inside the kernels (0: no confidence, loss only).
_MEASURE_CODES = {"max_prob": 1, "margin": 2, "entropy": 3}
_MAX_PROB: tl.constexpr = tl.constexpr(1)
_MARGIN: tl.constexpr = tl.constexpr(2)
_ENTROPY: tl.constexpr = tl.constexpr(3)
_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e))


@dataclasses.dataclass(frozen=True)
class HeadBlocks:
    """Tile sizes and launch parameters of the head kernels.

    Fused head (confidence, loss): ``block_m`` tokens x ``block_n`` vocabulary entries per tile,
    ``block_k`` hidden dims per K-step for 16-bit inputs (half as many for float32, whose tiles
    take twice the memory). Its backward uses the same tile with ``bwd_block_k``.
    ``resident_dim``: up to this D one K-step covers D, the program loads its h tile once and
    the backward keeps its dh in registers (no dh atomics).
    ``confidence_from_logits`` and the chunked schedule's pass (memory bound, no dot) read
    ``logits_block_m x logits_block_n`` tiles.
    ``programs``: how many programs run at once, the slots that a launch fills in whole waves by
    splitting the vocabulary (head kernels) or grouping rows (norm backward); ``None``:
    ``programs_per_sm`` per SM, the occupancy the head kernels get (ptxas, sm_90a: 134-255
    registers per thread at 8 warps, so one 256-thread program per SM), and
    ``logits_programs_per_sm`` for the memory-bound logits kernels (4 warps at 120-175
    registers: two fit, and twice the loads in flight).
    ``norm_block``: elements per program of the norm kernels.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    bwd_block_k: int = 32
    bwd_num_stages: int = 2
    resident_dim: int = 64
    logits_block_m: int = 16
    logits_block_n: int = 512
    logits_num_warps: int = 4
    programs: int | None = None
    programs_per_sm: int = 1
    logits_programs_per_sm: int = 2
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


def _target_programs(device: torch.device, per_sm: int | None = None) -> int:
    """Programs that run at once on ``device``: ``per_sm`` (default ``programs_per_sm``) per SM,
    or ``BLOCKS.programs`` when set (1 off CUDA)."""
    if BLOCKS.programs is not None:
        return BLOCKS.programs
    if device.type != "cuda":
        return 1
    per_sm = per_sm or BLOCKS.programs_per_sm
    return per_sm * _sm_count(device.index if device.index is not None else 0)


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
    """Gradients (dx in x.dtype, d norm_weight and d norm_bias as float32 sums), each only
    where ``needs`` says so."""
    N, D = x.shape
    need_dx, need_dw, need_db = needs
    if N == 0:
        return (
            torch.empty((0, D), dtype=x.dtype, device=x.device) if need_dx else None,
            torch.zeros(D, dtype=torch.float32, device=x.device) if need_dw else None,
            torch.zeros(D, dtype=torch.float32, device=x.device) if need_db else None,
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
    dw = dw_part.sum(0) if need_dw else None
    db = db_part.sum(0) if need_db else None
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
        dw = None if dw is None else dw.to(norm_weight.dtype)
        db = None if db is None else db.to(norm_bias.dtype)
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
def _load_w_tile(
    w_ptr, k, cols, V, D, BLOCK_K_MAJOR: tl.constexpr, EVEN_K: tl.constexpr, MASK_COLS: tl.constexpr
):
    """W[cols, k] as a [BLOCK_N, BLOCK_K] tile, or its transpose [BLOCK_K, BLOCK_N] with
    BLOCK_K_MAJOR; masks only what may lie out of bounds (columns on the last tile, k when D is
    not a multiple of BLOCK_K)."""
    if BLOCK_K_MAJOR:
        ptrs = w_ptr + cols[None, :].to(tl.int64) * D + k[:, None]
        col_ok = cols[None, :] < V
        k_ok = k[:, None] < D
    else:
        ptrs = w_ptr + cols[:, None].to(tl.int64) * D + k[None, :]
        col_ok = cols[:, None] < V
        k_ok = k[None, :] < D
    if MASK_COLS:
        mask = col_ok if EVEN_K else col_ok & k_ok
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif EVEN_K:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=k_ok, other=0.0)
    return tile


@triton.jit
def _load_h_tile(h_ptr, rows, k, N, D):
    """h[rows, k] as a [BLOCK_M, BLOCK_K] tile (zeros outside the rows and D)."""
    mask = (rows[:, None] < N) & (k[None, :] < D)
    return tl.load(h_ptr + rows[:, None].to(tl.int64) * D + k[None, :], mask=mask, other=0.0)


@triton.jit
def _logit_tile(
    h_tile,
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
    H_RESIDENT: tl.constexpr,
    EVEN_K: tl.constexpr,
    MASK_COLS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """h[rows] @ W[cols].T as a float32 [BLOCK_M, BLOCK_N] tile.

    With H_RESIDENT (D <= BLOCK_K) ``h_tile`` is the program's h tile, loaded once, and the tile is
    one dot; otherwise a K-loop over D loads both operands.
    """
    ks = tl.arange(0, BLOCK_K)
    if H_RESIDENT:
        w_t = _load_w_tile(w_ptr, ks, cols, V, D, True, EVEN_K, MASK_COLS)
        acc = tl.dot(h_tile, w_t.to(DOT_DTYPE), input_precision=PRECISION)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + ks
            a = _load_h_tile(h_ptr, rows, k, N, D)
            w_t = _load_w_tile(w_ptr, k, cols, V, D, True, EVEN_K, MASK_COLS)
            acc = tl.dot(a.to(DOT_DTYPE), w_t.to(DOT_DTYPE), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _merge(m_a, s_a, u_a, m2_a, a_a, m_b, s_b, u_b, m2_b, a_b):
    """Merge two online-softmax states (see the module docstring); empty states have s = 0."""
    m = tl.maximum(m_a, m_b)
    m_ref = tl.where(m == float("-inf"), 0.0, m)  # both empty: no -inf - -inf
    d_a = tl.where(s_a > 0, m_a - m_ref, 0.0)
    d_b = tl.where(s_b > 0, m_b - m_ref, 0.0)
    c_a = tl.where(s_a > 0, tl.exp(d_a), 0.0)
    c_b = tl.where(s_b > 0, tl.exp(d_b), 0.0)
    s = c_a * s_a + c_b * s_b
    u = c_a * (u_a + d_a * s_a) + c_b * (u_b + d_b * s_b)
    m2 = tl.maximum(tl.maximum(m2_a, m2_b), tl.minimum(m_a, m_b))
    a = tl.where(m_b > m_a, a_b, a_a)
    return m, s, u, m2, a


@triton.jit
def _merge_tile(z, v0, m, s, u, m2, arg, MEASURE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Reduce the logit tile ``z`` [BLOCK_M, BLOCK_N] (columns v0..., -inf where masked) to its
    state (m, s, u, m2, arg) and merge it into the running one."""
    if MEASURE > 0:
        m_t, arg_t = tl.max(z, axis=1, return_indices=True)
        arg_t = v0 + arg_t.to(tl.int32)
    else:
        m_t = tl.max(z, axis=1)
        arg_t = tl.zeros_like(arg)
    m_safe = tl.where(m_t == float("-inf"), 0.0, m_t)  # a row of -inf: s = 0, an empty state
    # exp(z - m) as exp2(z log2e - m log2e): one FMA and the special-function unit per logit
    p = tl.exp2(z * _LOG2E - (m_safe * _LOG2E)[:, None])
    s_t = tl.sum(p, axis=1)
    u_t = tl.zeros_like(s)
    m2_t = tl.full(m.shape, float("-inf"), dtype=tl.float32)
    if MEASURE == _ENTROPY:
        u_t = tl.sum(p * tl.where(p > 0, z - m_safe[:, None], 0.0), axis=1)
    if MEASURE == _MARGIN:
        cols = v0 + tl.arange(0, BLOCK_N)
        m2_t = tl.max(tl.where(cols[None, :] == arg_t[:, None], float("-inf"), z), axis=1)
    return _merge(m, s, u, m2, arg, m_t, s_t, u_t, m2_t, arg_t)


@triton.jit
def _source_tile(
    h_tile,
    src_ptr,
    w_ptr,
    rows,
    v0,
    N,
    V,
    D,
    stride_src,
    V_LOAD,
    FROM_LOGITS: tl.constexpr,
    MASK_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    H_RESIDENT: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The float32 logit tile of columns v0... : loaded (FROM_LOGITS) or computed; -inf outside."""
    cols = v0 + tl.arange(0, BLOCK_N)
    if FROM_LOGITS:
        ptrs = src_ptr + rows[:, None].to(tl.int64) * stride_src + cols[None, :]
        mask = rows[:, None] < N
        if MASK_COLS:
            mask = mask & (cols[None, :] < V_LOAD)
        z = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
    else:
        z = _logit_tile(
            h_tile, src_ptr, w_ptr, rows, cols, N, V, D,
            BLOCK_M, BLOCK_N, BLOCK_K, H_RESIDENT, EVEN_K, MASK_COLS, DOT_DTYPE, PRECISION,
        )  # fmt: skip
        if MASK_COLS:
            z = tl.where(cols[None, :] < V, z, float("-inf"))
    return z


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
    stride_src,
    V_LOAD,
    tiles_per_split,
    FROM_LOGITS: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    MEASURE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    H_RESIDENT: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial softmax state of BLOCK_M tokens over one vocabulary split.

    src is h [N, D] (logits computed against w [V, D]) or, with FROM_LOGITS, logits whose rows are
    ``stride_src`` apart, read up to column V_LOAD >= V (columns V..V_LOAD hold -inf: a padded
    buffer whose rows start aligned, so that the loads are whole vectors). Writes
    part[k, split, row] float32 for k = 0: max, 1: sum-exp, 2: entropy sum u, 3: second max,
    4: target logit (split 0 only); arg[split, row] int32 = argmax. Full tiles skip the column
    mask; only a split's last tile is masked.
    """
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(N, BLOCK_M)
    pid_m = pid % num_row_blocks
    split = pid // num_row_blocks
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    ks = tl.arange(0, BLOCK_K)
    h_tile = 0.0
    if H_RESIDENT:  # D fits one K-step: the h tile is loaded once for every vocabulary tile
        h_tile = _load_h_tile(src_ptr, rows, ks, N, D).to(DOT_DTYPE)

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    u = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    v_begin = split * tiles_per_split * BLOCK_N
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_N, V_LOAD)
    v_full = v_begin + (v_end - v_begin) // BLOCK_N * BLOCK_N
    for v0 in range(v_begin, v_full, BLOCK_N):
        z = _source_tile(
            h_tile, src_ptr, w_ptr, rows, v0, N, V, D, stride_src, V_LOAD, FROM_LOGITS, False,
            BLOCK_M, BLOCK_N, BLOCK_K, H_RESIDENT, EVEN_K, DOT_DTYPE, PRECISION,
        )  # fmt: skip
        m, s, u, m2, arg = _merge_tile(z, v0, m, s, u, m2, arg, MEASURE, BLOCK_N)
    if v_full < v_end:
        z = _source_tile(
            h_tile, src_ptr, w_ptr, rows, v_full, N, V, D, stride_src, V_LOAD, FROM_LOGITS, True,
            BLOCK_M, BLOCK_N, BLOCK_K, H_RESIDENT, EVEN_K, DOT_DTYPE, PRECISION,
        )  # fmt: skip
        m, s, u, m2, arg = _merge_tile(z, v_full, m, s, u, m2, arg, MEASURE, BLOCK_N)

    offs = split * N + rows
    split_size = tl.num_programs(0) // num_row_blocks * N
    tl.store(part_ptr + offs, m, mask=row_mask)
    tl.store(part_ptr + split_size + offs, s, mask=row_mask)
    if MEASURE == _ENTROPY:
        tl.store(part_ptr + 2 * split_size + offs, u, mask=row_mask)
    if MEASURE == _MARGIN:
        tl.store(part_ptr + 3 * split_size + offs, m2, mask=row_mask)
    if MEASURE > 0:
        tl.store(arg_ptr + offs, arg, mask=row_mask)
    if HAS_TARGETS and split == 0:
        # The target logit, once per token (by split 0), outside the vocabulary loop: a gather,
        # or the dot of h with the target's row of W.
        target = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
        valid = row_mask & (target >= 0) & (target < V)
        safe = tl.where(valid, target, 0).to(tl.int64)
        if FROM_LOGITS:
            t = tl.load(src_ptr + rows.to(tl.int64) * stride_src + safe, mask=valid, other=0.0)
            t = t.to(tl.float32)
        else:
            t = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                k = k0 + ks
                both = valid[:, None] & (k[None, :] < D)
                h_k = tl.load(
                    src_ptr + rows[:, None].to(tl.int64) * D + k[None, :], mask=both, other=0.0
                )
                w_k = tl.load(w_ptr + safe[:, None] * D + k[None, :], mask=both, other=0.0)
                t += tl.sum(h_k.to(tl.float32) * w_k.to(tl.float32), axis=1)
        tl.store(part_ptr + 4 * split_size + rows, t, mask=row_mask)


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
        t = tl.load(part_ptr + 4 * split_size + rows, mask=row_mask & valid, other=0.0)
        tl.store(loss_ptr + rows, tl.where(valid, lse - t, 0.0), mask=row_mask)


@functools.lru_cache(maxsize=256)
def _split_plan(row_blocks: int, v_tiles: int, slots: int) -> tuple[int, int]:
    """(vocabulary splits, tiles per split) that finish the work in the fewest whole waves.

    ``slots`` programs run at once. A grid of ``row_blocks x splits`` programs of ``t`` tiles each
    takes ``ceil(programs / slots)`` waves of ``t + 1`` tile-times (the 1: the per-program
    start-up and the partial state it writes); the plan minimizes that product, and takes the
    fewest splits on a tie (fewer partial states to merge).
    """
    plans = []
    for splits in sorted({triton.cdiv(v_tiles, t) for t in range(1, v_tiles + 1)}):
        tiles = triton.cdiv(v_tiles, splits)
        plans.append((triton.cdiv(row_blocks * splits, slots) * (tiles + 1), splits, tiles))
    _, splits, tiles = min(plans)
    return splits, tiles


def _vocab_splits(
    N: int, V: int, block_m: int, block_n: int, device: torch.device, per_sm: int | None = None
) -> tuple[int, int, int]:
    """(row blocks, vocabulary splits, tiles per split) for the head kernels' grid.

    V is split so that the grid fills whole waves of the programs the device runs at once
    (:func:`_split_plan`, ``per_sm`` programs per SM): N = 2048 with 128-token blocks gives 16
    row blocks, and V = 69,830 in 546 tiles of 128 is cut into 8 splits of 69 tiles: 128
    programs, one wave on 132 SMs.
    """
    row_blocks = triton.cdiv(N, block_m)
    splits, tiles_per_split = _split_plan(
        row_blocks, triton.cdiv(V, block_n), _target_programs(device, per_sm)
    )
    return row_blocks, splits, tiles_per_split


def _resident_block_k(D: int, dtype: torch.dtype, block_k: int) -> tuple[int, bool]:
    """(BLOCK_K, H_RESIDENT): one K-step covering D when it fits :attr:`HeadBlocks.resident_dim`
    and the dots run on tensor cores (the h tile then stays in registers), else
    :func:`_block_k` steps. IEEE float32 dots are FMA loops whose resident tiles spill (ptxas,
    sm_90a: 6-17 KB of stack per thread), so they keep the K-loop."""
    dim = D
    if dim <= BLOCKS.resident_dim and _dot_flags(dtype)[1] != "ieee":
        return max(16, triton.next_power_of_2(dim)), True
    return _block_k(block_k, dtype), False


def _head_stats(
    src: Tensor,
    weight: Tensor | None,
    targets: Tensor | None,
    ignore_index: int,
    measure: int,
    vocab: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One streaming pass over V: ``(lse, confidence, prediction, loss)``.

    src: h [N, D] with weight [V, D], or logits [N, >= V] with ``weight=None``, whose first
    ``vocab`` columns (default: all) are the logits and the rest -inf (a padded buffer). lse,
    confidence and loss are float32 [N], prediction int64 [N]; confidence/prediction are empty
    for ``measure=0`` and loss (lse - target logit, 0 where ignored) is empty without targets.
    """
    N = src.shape[0]
    from_logits = weight is None
    V = (vocab or src.shape[1]) if from_logits else weight.shape[0]
    device = src.device
    lse = torch.empty(N, dtype=torch.float32, device=device)
    conf = torch.empty(N if measure else 0, dtype=torch.float32, device=device)
    pred = torch.empty(N if measure else 0, dtype=torch.int64, device=device)
    loss = torch.empty(N if targets is not None else 0, dtype=torch.float32, device=device)
    if N == 0:
        return lse, conf, pred, loss

    if from_logits:
        block_m, block_n, num_warps = (
            BLOCKS.logits_block_m,
            BLOCKS.logits_block_n,
            BLOCKS.logits_num_warps,
        )
        # (BLOCK_K, DOT_DTYPE and PRECISION do not matter without a dot.)
        block_k, resident, dot_dtype, precision = 16, False, tl.float32, "ieee"
        v_load, stride = src.shape[1], src.stride(0)
    else:
        block_m, block_n, num_warps = BLOCKS.block_m, BLOCKS.block_n, BLOCKS.num_warps
        block_k, resident = _resident_block_k(src.shape[1], src.dtype, BLOCKS.block_k)
        dot_dtype, precision = _dot_flags(src.dtype)
        v_load, stride = V, src.shape[1]
    per_sm = BLOCKS.logits_programs_per_sm if from_logits else None
    row_blocks, splits, tiles_per_split = _vocab_splits(N, v_load, block_m, block_n, device, per_sm)
    part = torch.empty((5, splits, N), dtype=torch.float32, device=device)
    arg = torch.empty((splits, N), dtype=torch.int32, device=device)
    _stats_kernel[(row_blocks * splits,)](
        src,
        weight,
        targets,
        part,
        arg,
        N,
        V,
        src.shape[1],
        stride,
        v_load,
        tiles_per_split,
        FROM_LOGITS=from_logits,
        HAS_TARGETS=targets is not None,
        MEASURE=measure,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        H_RESIDENT=resident,
        EVEN_K=src.shape[1] % block_k == 0,
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
# The chunked schedule's pass (lego_kernels.chunked): statistics, then softmax - onehot in place
# ----------------------------------------------------------------------------------------------


@triton.jit
def _softmax_grad_kernel(
    z_ptr,
    lse_ptr,
    targets_ptr,
    C,
    V,
    stride_z,
    V_LOAD,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """z <- exp(z - lse) - onehot(target) in place on a [BLOCK_M, BLOCK_N] tile of a chunk's
    padded logits (rows ``stride_z`` apart); the padding columns V..V_LOAD keep -inf."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < C
    mask = row_mask[:, None] & (cols[None, :] < V_LOAD)
    ptrs = z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :]
    z = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    g = tl.exp2(z * _LOG2E - (lse * _LOG2E)[:, None])
    g = g - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
    g = tl.where(cols[None, :] < V, g, float("-inf"))
    tl.store(ptrs, g.to(z_ptr.dtype.element_ty), mask=mask)


def logits_pass(
    zp: Tensor, vocab: int, targets: Tensor, measure: str | None, grad: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The chunked schedule's pass over one chunk, with the Triton kernels.

    ``zp [c, Vp]``: the chunk's logits in ``zp[:, :vocab]``, ``-inf`` in the padding (rows
    start 16-element aligned, so the loads are whole vectors whatever V is); ``targets`` int64
    ``[c]``, -1 for ignored tokens. Returns ``(lse, loss, confidence, prediction)`` float32 /
    int64 ``[c]`` (the last two ``None`` for ``measure=None``); with ``grad``, ``zp[:, :vocab]``
    becomes ``softmax - onehot(target)`` (in zp's dtype) and the padding stays ``-inf``.
    """
    code = _MEASURE_CODES[measure] if measure else 0
    lse, conf, pred, loss = _head_stats(zp, None, targets, -1, code, vocab=vocab)
    if grad and zp.shape[0] > 0:
        block_m, block_n = BLOCKS.logits_block_m, BLOCKS.logits_block_n
        grid = (triton.cdiv(zp.shape[1], block_n), triton.cdiv(zp.shape[0], block_m))
        _softmax_grad_kernel[grid](
            zp,
            lse,
            targets,
            zp.shape[0],
            vocab,
            zp.stride(0),
            zp.shape[1],
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=BLOCKS.logits_num_warps,
        )
    return lse, loss, (conf if code else None), (pred if code else None)


# ----------------------------------------------------------------------------------------------
# Cross-entropy backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ce_bwd_tile(
    h_tile,
    dh_acc,
    h_ptr,
    w_ptr,
    dh_ptr,
    dw_ptr,
    rows,
    v0,
    target,
    lse2,
    coef,
    N,
    V,
    D,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    MASK_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    H_RESIDENT: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One vocabulary tile of the backward: recompute G, then its dh and dW contributions.

    Returns the program's running dh (H_RESIDENT: in registers); otherwise dh goes to dh_ptr with
    float32 atomics. dW tiles always go to dw_ptr with float32 atomics.
    """
    cols = v0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    z = _logit_tile(
        h_tile, h_ptr, w_ptr, rows, cols, N, V, D,
        BLOCK_M, BLOCK_N, BLOCK_K, H_RESIDENT, EVEN_K, MASK_COLS, DOT_DTYPE, PRECISION,
    )  # fmt: skip
    p = tl.exp2(z * _LOG2E - lse2[:, None])
    g = (p - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)) * coef[:, None]
    if MASK_COLS:
        g = tl.where(cols[None, :] < V, g, 0.0)
    # Round G to the input dtype as the GPU's 16-bit dot does, then to the dot's dtype.
    g = g.to(h_ptr.dtype.element_ty).to(DOT_DTYPE)
    ks = tl.arange(0, BLOCK_K)
    if H_RESIDENT:
        if COMPUTE_DH:
            w_k = _load_w_tile(w_ptr, ks, cols, V, D, False, EVEN_K, MASK_COLS)
            dh_acc = tl.dot(g, w_k.to(DOT_DTYPE), dh_acc, input_precision=PRECISION)
        if COMPUTE_DW:
            dw_k = tl.dot(tl.trans(g), h_tile, input_precision=PRECISION)
            tl.atomic_add(
                dw_ptr + cols[:, None].to(tl.int64) * D + ks[None, :],
                dw_k,
                mask=(cols[:, None] < V) & (ks[None, :] < D),
                sem="relaxed",
            )
    else:
        row_offs = rows[:, None].to(tl.int64) * D
        for k0 in range(0, D, BLOCK_K):
            k = k0 + ks
            k_mask = k < D
            if COMPUTE_DH:
                w_k = _load_w_tile(w_ptr, k, cols, V, D, False, EVEN_K, MASK_COLS)
                tl.atomic_add(
                    dh_ptr + row_offs + k[None, :],
                    tl.dot(g, w_k.to(DOT_DTYPE), input_precision=PRECISION),
                    mask=row_mask[:, None] & k_mask[None, :],
                    sem="relaxed",
                )
            if COMPUTE_DW:
                h_k = _load_h_tile(h_ptr, rows, k, N, D)
                tl.atomic_add(
                    dw_ptr + cols[:, None].to(tl.int64) * D + k[None, :],
                    tl.dot(tl.trans(g), h_k.to(DOT_DTYPE), input_precision=PRECISION),
                    mask=(cols[:, None] < V) & k_mask[None, :],
                    sem="relaxed",
                )
    return dh_acc


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
    H_RESIDENT: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dh and dW of BLOCK_M tokens over one split of V (see :func:`_ce_bwd_tile`).

    With H_RESIDENT the program's dh, summed over its split in registers, is stored once to
    dh_ptr[split] (a [splits, N, D] float32 buffer that the launcher sums): no dh atomics.
    """
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(N, BLOCK_M)
    pid_m = pid % num_row_blocks
    split = pid // num_row_blocks
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    target = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    lse2 = tl.load(lse_ptr + rows, mask=row_mask, other=0.0) * _LOG2E
    coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    ks = tl.arange(0, BLOCK_K)
    h_tile = 0.0
    if H_RESIDENT:
        h_tile = _load_h_tile(h_ptr, rows, ks, N, D).to(DOT_DTYPE)
    dh_acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)

    v_begin = split * tiles_per_split * BLOCK_N
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_N, V)
    v_full = v_begin + (v_end - v_begin) // BLOCK_N * BLOCK_N
    for v0 in range(v_begin, v_full, BLOCK_N):
        dh_acc = _ce_bwd_tile(
            h_tile, dh_acc, h_ptr, w_ptr, dh_ptr, dw_ptr, rows, v0, target, lse2, coef, N, V, D,
            COMPUTE_DH, COMPUTE_DW, False,
            BLOCK_M, BLOCK_N, BLOCK_K, H_RESIDENT, EVEN_K, DOT_DTYPE, PRECISION,
        )  # fmt: skip
    if v_full < v_end:
        dh_acc = _ce_bwd_tile(
            h_tile, dh_acc, h_ptr, w_ptr, dh_ptr, dw_ptr, rows, v_full, target, lse2, coef,
            N, V, D, COMPUTE_DH, COMPUTE_DW, True,
            BLOCK_M, BLOCK_N, BLOCK_K, H_RESIDENT, EVEN_K, DOT_DTYPE, PRECISION,
        )  # fmt: skip
    if H_RESIDENT and COMPUTE_DH:
        offs = split * N * D + rows[:, None].to(tl.int64) * D + ks[None, :]
        tl.store(dh_ptr + offs, dh_acc, mask=row_mask[:, None] & (ks[None, :] < D))


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
    block_k, resident = _resident_block_k(D, h.dtype, BLOCKS.bwd_block_k)
    row_blocks, splits, tiles_per_split = _vocab_splits(
        N, V, BLOCKS.block_m, BLOCKS.block_n, h.device
    )
    dh_shape = (splits, N, D) if resident else (N, D)
    # Resident: every element of the per-split partials is written (rows and D are covered).
    alloc = torch.empty if resident else torch.zeros
    dh = alloc(dh_shape, dtype=torch.float32, device=h.device) if need_dh else None
    dw = torch.zeros((V, D), dtype=torch.float32, device=h.device) if need_dw else None
    if N > 0:
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
            BLOCK_K=block_k,
            H_RESIDENT=resident,
            EVEN_K=D % block_k == 0,
            DOT_DTYPE=dot_dtype,
            PRECISION=precision,
            num_warps=BLOCKS.num_warps,
            num_stages=BLOCKS.bwd_num_stages,
        )
    if need_dh and resident:
        dh = dh.sum(0) if N > 0 else torch.zeros((N, D), dtype=torch.float32, device=h.device)
    return (
        dh.to(h.dtype) if need_dh else None,
        dw.to(weight.dtype) if need_dw else None,
    )


class _HeadCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of h @ W.T without the N x V logits; optionally the confidence.

    The per-token upstream gradient (the reduction's coefficients, computed by autograd) scales
    G in the backward kernel, so every reduction and per-token weight is exact.
    """

    @staticmethod
    def forward(
        ctx,
        h: Tensor,
        weight: Tensor,
        targets: Tensor,
        ignore_index: int,
        measure: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        lse, conf, pred, token_loss = _head_stats(h, weight, targets, ignore_index, measure)
        # Targets outside [0, V) (not caught on CUDA, see ops) count as ignored.
        counted = (targets != ignore_index) & (targets >= 0) & (targets < weight.shape[0])
        ctx.save_for_backward(h, weight, targets, lse, counted)
        ctx.mark_non_differentiable(conf, pred, lse)
        return token_loss, conf, pred, lse

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, targets, lse, counted = ctx.saved_tensors
        coef = torch.where(counted, grad_loss, 0.0).float().contiguous()
        dh, dw = _ce_backward(
            h, weight, targets, lse, coef, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return dh, dw, None, None, None


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
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(confidence f32 [N], prediction i64 [N], lse f32 [N]) of ``norm(x) @ weight.T``.

    x [N, D], weight [V, D]; ``dtype``: the dots' dtype (default x's). No gradient and no N x V
    buffer.
    """
    h = _norm_forward(x, norm_weight, norm_bias, norm == "rms", eps)[0] if norm else x
    if dtype is not None:
        h, weight = h.to(dtype), weight.to(dtype)
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
    dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Cross-entropy of ``norm(x) @ weight.T`` against targets, without the N x V logits.

    x [N, D], weight [V, D], targets int64 [N], token_weights [N] or None (differentiable).
    ``dtype``: the dots' dtype (default x's). Returns the float32 loss (a scalar, or [N] for
    ``reduction="none"``), with ``(confidence, prediction, lse)`` from the same pass when
    ``return_confidence``. Backward computes only the gradients whose inputs require them (a
    frozen head costs no dW).
    """
    h = _apply_norm(x, norm_weight, norm_bias, norm, eps)
    if dtype is not None:
        h, weight = h.to(dtype), weight.to(dtype)
    code = _MEASURE_CODES[measure] if return_confidence else 0
    token_loss, conf, pred, lse = _HeadCrossEntropy.apply(h, weight, targets, ignore_index, code)
    loss = chunked.reduce_losses(
        token_loss, targets, ignore_index, weight.shape[0], reduction, token_weights
    )
    if return_confidence:
        return loss, (conf, pred, lse)
    return loss
