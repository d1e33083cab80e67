"""Triton kernels for token routing: hard-token compaction, gather and scatter of rows.

Early exit sends the *hard* tokens (those not confident enough to exit) through the
deeper layers. These kernels build the list of hard tokens on the device and move their
rows between the full ``[N, D]`` activations and a dense ``[K, D]`` buffer.

Math
----
route. Token ``i`` of ``N`` is hard when ``not (c_i >= t)``: ``c_i < t``, and a NaN
confidence counts as hard (it never exits on a broken score). The comparison runs in
float32. The plan lists hard tokens in ascending order: the hard token ``i`` goes to slot
``p_i = sum_{j < i} hard_j`` (an exclusive prefix sum of the hard mask), so
``indices[p_i] = i``. The prefix sum is computed in two kernels over blocks of
``ROUTE_BLOCK`` tokens:

1. ``_route_count_kernel``: ``counts[b] = sum_{i in block b} hard_i``.
2. ``_route_write_kernel``: ``offset_b = sum_{b' < b} counts[b']`` (each program adds up
   the counts of the blocks before it), ``p_i = offset_b + cumsum(hard)_i - 1`` inside the
   block, and ``indices[p_i] = i`` where ``hard_i`` and ``p_i < capacity``. The last block
   writes ``count = offset_last + counts[last]``, the true number of hard tokens.

``indices`` starts filled with -1, so slots ``p >= count`` stay -1 (padding). Without a
capacity, ``capacity = N`` and one host synchronization reads ``count`` to trim ``indices``;
with a capacity nothing leaves the device, so the plan works under CUDA graphs and
``torch.compile``. Work: two reads of the N confidences plus O(num_blocks^2) reads of the
tiny block counts.

gather. ``out[k, :] = x[indices[k], :]``, zeros where ``indices[k] = -1``. Backward:
``dx = 0; dx[indices[k], :] = dout[k, :]`` (indices are unique, so no atomics).

scatter. ``out = base; out[indices[k], :] = src[k, :]`` for ``indices[k] >= 0``. Backward:
``dsrc[k, :] = dout[indices[k], :]`` (a gather, zeros for -1) and ``dbase = dout`` with the
replaced rows zeroed.

Gather and scatter are bandwidth-bound copies: each program moves a 2-D tile of
``BLOCK_K`` rows x ``BLOCK_D`` columns with contiguous (vectorized) loads along ``D``, in
one pass, for any ``D``.

These functions take validated, flattened inputs and record no autograd graph;
``lego_kernels.ops`` is the public API that validates arguments and chooses the backend, and
``lego_kernels.library`` wraps them as ``torch.library`` custom ops whose gradients are the
gather and scatter above.
"""

import torch
import triton
import triton.language as tl

ROUTE_BLOCK = 1024  # tokens per program in the compaction kernels
SCAN_BLOCK = 1024  # block counts read per step when a program sums the blocks before it
TILE_ELEMENTS = 4096  # elements per program in the gather/scatter kernels


@triton.jit
def _hard_mask(conf_ptr, offs, N, threshold, threshold_ptr, THRESHOLD_IN_MEMORY: tl.constexpr):
    """Hard-token mask of the tokens at ``offs``: ``not (confidence >= threshold)`` in float32."""
    in_range = offs < N
    conf = tl.load(conf_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    thr = tl.load(threshold_ptr).to(tl.float32) if THRESHOLD_IN_MEMORY else threshold
    return in_range & ~(conf >= thr)


@triton.jit
def _route_count_kernel(
    conf_ptr,
    counts_ptr,
    N,
    threshold,
    threshold_ptr,
    THRESHOLD_IN_MEMORY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """counts[b] = number of hard tokens in block b (int32)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    hard = _hard_mask(conf_ptr, offs, N, threshold, threshold_ptr, THRESHOLD_IN_MEMORY)
    tl.store(counts_ptr + pid, tl.sum(hard.to(tl.int32), axis=0))


@triton.jit
def _route_write_kernel(
    conf_ptr,
    counts_ptr,
    indices_ptr,
    count_ptr,
    N,
    capacity,
    threshold,
    threshold_ptr,
    THRESHOLD_IN_MEMORY: tl.constexpr,
    BLOCK: tl.constexpr,
    SCAN: tl.constexpr,
):
    """indices[offset_b + cumsum(hard) - 1] = token index, for slots below capacity."""
    pid = tl.program_id(0)
    # offset_b: hard tokens in the blocks before this one.
    before = tl.zeros([SCAN], dtype=tl.int32)
    for start in range(0, pid, SCAN):
        blocks = start + tl.arange(0, SCAN)
        before += tl.load(counts_ptr + blocks, mask=blocks < pid, other=0)
    offset = tl.sum(before, axis=0)

    offs = pid * BLOCK + tl.arange(0, BLOCK)
    hard = _hard_mask(conf_ptr, offs, N, threshold, threshold_ptr, THRESHOLD_IN_MEMORY)
    hard_i32 = hard.to(tl.int32)
    slots = offset + tl.cumsum(hard_i32, axis=0) - 1
    tl.store(indices_ptr + slots, offs.to(tl.int64), mask=hard & (slots < capacity))

    if pid == tl.num_programs(0) - 1:
        tl.store(count_ptr, (offset + tl.sum(hard_i32, axis=0)).to(tl.int64))


@triton.jit
def _gather_rows_kernel(
    x_ptr,
    indices_ptr,
    out_ptr,
    K,
    D,
    stride_x,
    stride_out,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[k, :] = x[indices[k], :], zeros where indices[k] < 0."""
    rows = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < K
    col_ok = cols < D
    idx = tl.load(indices_ptr + rows, mask=row_ok, other=-1)
    src = x_ptr + idx[:, None] * stride_x + cols[None, :]
    vals = tl.load(src, mask=(idx >= 0)[:, None] & col_ok[None, :], other=0.0)
    dst = out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(dst, vals, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _scatter_rows_kernel(
    out_ptr,
    src_ptr,
    indices_ptr,
    K,
    D,
    stride_out,
    stride_src,
    HAS_SRC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[indices[k], :] = src[k, :] (or zeros without src), skipping indices[k] < 0."""
    rows = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < K
    col_ok = cols < D
    idx = tl.load(indices_ptr + rows, mask=row_ok, other=-1)
    if HAS_SRC:
        src = src_ptr + rows[:, None].to(tl.int64) * stride_src + cols[None, :]
        vals = tl.load(src, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    else:
        vals = tl.zeros([BLOCK_K, BLOCK_D], dtype=out_ptr.dtype.element_ty)
    dst = out_ptr + idx[:, None] * stride_out + cols[None, :]
    tl.store(dst, vals, mask=(idx >= 0)[:, None] & col_ok[None, :])


def route(
    confidence: torch.Tensor, threshold: float | torch.Tensor, capacity: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix-sum compaction of the hard tokens (``not confidence >= threshold``).

    Args:
        confidence: ``[N]`` floating tensor (any float dtype; compared in float32).
        threshold: Python float, or a 0-d floating tensor on ``confidence``'s device
            (read by the kernel, so no host synchronization).
        capacity: ``None`` (size ``indices`` to the count: one host synchronization) or a
            number of slots ``>= 0`` (no synchronization; unused slots are -1).

    Returns:
        ``(indices, count)``: ``indices`` int64 ``[count]`` or ``[capacity]``, ascending;
        ``count`` 0-d int64 on the device, the true number of hard tokens.
    """
    N = confidence.shape[0]
    slots = N if capacity is None else capacity
    device = confidence.device
    indices = torch.full((slots,), -1, dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    if N > 0:
        in_memory = isinstance(threshold, torch.Tensor)
        thr_value = 0.0 if in_memory else float(threshold)
        thr_ptr = threshold if in_memory else confidence  # unused when not in memory
        num_blocks = triton.cdiv(N, ROUTE_BLOCK)
        counts = torch.empty((num_blocks,), dtype=torch.int32, device=device)
        conf = confidence.contiguous()
        _route_count_kernel[(num_blocks,)](
            conf, counts, N, thr_value, thr_ptr, THRESHOLD_IN_MEMORY=in_memory, BLOCK=ROUTE_BLOCK
        )
        _route_write_kernel[(num_blocks,)](
            conf,
            counts,
            indices,
            count,
            N,
            slots,
            thr_value,
            thr_ptr,
            THRESHOLD_IN_MEMORY=in_memory,
            BLOCK=ROUTE_BLOCK,
            SCAN=SCAN_BLOCK,
        )
    if capacity is None:
        indices = indices[: int(count.item())]  # the one host synchronization
    return indices, count


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) with unit stride along the last dim, copying only when needed."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _tiles(K: int, D: int) -> tuple[tuple[int, int], int, int]:
    """Grid and (BLOCK_K, BLOCK_D) for a K x D row copy of about TILE_ELEMENTS per program."""
    block_d = min(triton.next_power_of_2(D), TILE_ELEMENTS)
    block_k = max(1, TILE_ELEMENTS // block_d)
    return (triton.cdiv(K, block_k), triton.cdiv(D, block_d)), block_k, block_d


def _gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, D]`` (unit column stride), ``indices`` int64 ``[K]`` -> ``[K, D]``."""
    K, D = indices.shape[0], x.shape[1]
    out = torch.empty((K, D), dtype=x.dtype, device=x.device)
    if K > 0 and D > 0:
        grid, block_k, block_d = _tiles(K, D)
        _gather_rows_kernel[grid](
            x, indices, out, K, D, x.stride(0), out.stride(0), BLOCK_K=block_k, BLOCK_D=block_d
        )
    return out


def _scatter_rows_(out: torch.Tensor, src: torch.Tensor | None, indices: torch.Tensor) -> None:
    """In place: ``out[indices[k]] = src[k]`` (zeros when ``src`` is None), -1 skipped."""
    K, D = indices.shape[0], out.shape[1]
    if K > 0 and D > 0:
        grid, block_k, block_d = _tiles(K, D)
        _scatter_rows_kernel[grid](
            out,
            out if src is None else src,  # unused when HAS_SRC is False
            indices,
            K,
            D,
            out.stride(0),
            0 if src is None else src.stride(0),
            HAS_SRC=src is not None,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
        )


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` (int64 ``[K]``, -1 gives zeros) of ``x`` ``[N, D]``: ``[K, D]``."""
    return _gather_rows(_unit_columns(x), indices)


def scatter_tokens(
    base: torch.Tensor, src: torch.Tensor | None, indices: torch.Tensor
) -> torch.Tensor:
    """Copy of ``base`` ``[N, D]`` with rows ``indices`` (``[K]``) replaced by ``src [K, D]``
    (by zeros when ``src`` is None: the gradient of ``base``)."""
    out = base.clone(memory_format=torch.contiguous_format)
    _scatter_rows_(out, None if src is None else _unit_columns(src), indices)
    return out
