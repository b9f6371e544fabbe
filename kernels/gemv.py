"""Decode GEMV (M = 1..4) over the packed layout, without tl.dot.

    out[M, N] = x[M, K] @ W^T + bias,   W[n, k] = (code(k, n) - zero[g, n]) * scale[g, n]

A 16-row `tl.dot` tile for one token wastes 15/16 of the math and forces the dequantized weight
through shared memory; at M <= 4 the work is a stream over the packed weight. Each program owns
a [BLOCK_N] column strip and one K slice (split-K): per BLOCK_K step it loads the
[BLOCK_K / V, BLOCK_N] packed words (N contiguous: wide, coalesced loads), fans the codes out in
registers, turns them into floats without an int->float convert (OR the code into the mantissa
of 2^23 and subtract 2^23), multiplies with each of the M activation rows as broadcast FMAs and
reduces over K. When the step lies inside one quantization group, scale and zero are applied
once per column and step as s * (sum_k code * x - z * sum_k x); otherwise per element.
The K slices of a strip are combined in the same launch (`tiles.splitk_finish`): one launch per
call, deterministic. Supports 2, 4 and 8 bits (V = 16, 8, 4 codes per word); 3 bits take `gemm`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles
from .tiles import splitk_finish
from .tuning import KernelConfig


@triton.jit
def _gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    ws_ptr,
    cnt_ptr,
    out_ptr,
    M,
    N,
    K,
    k_per_split,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ONE_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K,
    IS_SPLIT: tl.constexpr,
):
    """x [M, K] and out [M, N] contiguous; qweight/scales/qzeros contiguous with row stride N.
    Grid: (cdiv(N, BLOCK_N), SPLIT_K); M <= BLOCK_M."""
    V: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    shifts = tl.arange(0, V) * BITS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        rows = k0 // V + tl.arange(0, BLOCK_K // V)
        words = tl.load(
            qw_ptr + rows[:, None] * N + offs_n[None, :], mask=(rows * V < k_end)[:, None] & n_ok[None, :], other=0
        )
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
        # 0x4B000000 is float32 2^23: OR-ing a code c < 2^23 into its mantissa gives exactly 2^23 + c.
        cf = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        if ONE_GROUP:
            g = k0 // GROUP
            scale = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)
            else:
                zero = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
            for m in tl.static_range(BLOCK_M):
                xm = tl.load(x_ptr + m * K + offs_k, mask=k_ok & (offs_k * 0 + m < M), other=0.0).to(tl.float32)
                dot = tl.sum(cf * xm[:, None], axis=0)
                part = scale * (dot - zero * tl.sum(xm, axis=0))
                acc = tl.where((offs_m == m)[:, None], acc + part[None, :], acc)
        else:
            # The step spans several groups (GROUP < BLOCK_K, or groups not aligned to steps).
            g = offs_k // GROUP
            w_ok = k_ok[:, None] & n_ok[None, :]
            scale = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=w_ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=w_ok, other=0).to(tl.float32)
                w = (cf - zero) * scale
            else:
                w = (cf - (1 << (BITS - 1))) * scale
            for m in tl.static_range(BLOCK_M):
                xm = tl.load(x_ptr + m * K + offs_k, mask=k_ok & (offs_k * 0 + m < M), other=0.0).to(tl.float32)
                part = tl.sum(w * xm[:, None], axis=0)
                acc = tl.where((offs_m == m)[:, None], acc + part[None, :], acc)
    splitk_finish(
        acc, ws_ptr, cnt_ptr, b_ptr, out_ptr, offs_m, offs_n, pid_n, pid_k, M, N, SPLIT_K, HAS_BIAS, IS_SPLIT
    )


def launch(x2d, qweight, scales, qzeros, bias, bits, group, out, cfg: KernelConfig) -> torch.Tensor:
    """out [M, N] = x2d [M, K] @ W^T + bias; x2d, weights and out contiguous; M <= cfg.block_m."""
    m, k = x2d.shape
    n = qweight.shape[1]
    k_per_split, split = tiles.split_slices(k, cfg.split_k, cfg.block_k)
    n_tiles = triton.cdiv(n, cfg.block_n)
    if split > 1:
        ws = tiles.empty((split, m, n), torch.float32, x2d.device)
        cnt = tiles.counters(x2d.device, n_tiles)
    else:
        ws = cnt = out  # unused pointers
    _gemv_kernel[(n_tiles, split)](
        x2d, qweight, scales, qzeros if qzeros is not None else scales, bias if bias is not None else scales,
        ws, cnt, out, m, n, k, k_per_split,
        BITS=bits, GROUP=group, HAS_ZEROS=qzeros is not None, HAS_BIAS=bias is not None,
        ONE_GROUP=group % cfg.block_k == 0 or group >= k,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split, IS_SPLIT=split > 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
