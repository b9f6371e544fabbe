"""Tiled `tl.dot` kernels over the packed layout: split-K for small M (5..64), full-K GEMM beyond.

    out[M, N] = x[M, K] @ W^T + bias,   W[n, k] = (code(k, n) - zero[g, n]) * scale[g, n]

Both share one dequantizing inner loop (`_dequant_dot`): per BLOCK_K step it loads the activation
tile, the packed words of W^T[BLOCK_K, BLOCK_N], unpacks them (`tiles.load_codes`), applies
(code - zero) * scale in fp32, casts to the activation dtype and feeds `tl.dot` (fp32 accumulate).

* `_gemm_kernel`: one program per [BLOCK_M, BLOCK_N] output tile walks all of K; bias and the cast
  happen in the epilogue.
* `_splitk_kernel` (M <= BLOCK_M): few output tiles cannot fill the GPU, so K is split over the
  grid too; the partials are combined in the same launch (`tiles.splitk_finish`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles
from .tiles import load_codes, splitk_finish
from .tuning import KernelConfig


@triton.jit
def _dequant_dot(
    acc,
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    offs_m,
    offs_n,
    k_begin,
    k_end,
    M,
    N,
    stride_xm,
    stride_xk,
    stride_qw,
    stride_s,
    stride_z,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    ONE_GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc[BM, BN] += x[offs_m, k_begin:k_end] @ W^T[k_begin:k_end, offs_n], dequantizing W on the fly.

    ONE_GROUP: every BLOCK_K step lies inside one quantization group (GROUP % BLOCK_K == 0,
    or a single group), so scales/zeros are one [BN] row per step instead of a [BK, BN] gather.
    """
    m_ok = offs_m < M
    n_ok = offs_n < N
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_ok = k_ok[:, None] & n_ok[None, :]
        codes = load_codes(qw_ptr, k0, k_end, offs_k, offs_n, n_ok, stride_qw, BITS, BLOCK_K, BLOCK_N)
        if ONE_GROUP:
            g = k0 // GROUP
            scale = tl.load(s_ptr + g * stride_s + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_ZEROS:
                zero = tl.load(z_ptr + g * stride_z + offs_n, mask=n_ok, other=0).to(tl.int32)[None, :]
            else:
                zero = 1 << (BITS - 1)
        else:
            g = offs_k // GROUP
            scale = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=w_ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = tl.load(z_ptr + g[:, None] * stride_z + offs_n[None, :], mask=w_ok, other=0).to(tl.int32)
            else:
                zero = 1 << (BITS - 1)
        w = ((codes - zero).to(tl.float32) * scale).to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _gemm_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_qw,
    stride_s,
    stride_z,
    stride_om,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ONE_GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[M, N] = x[M, K] @ W^T + bias. Grid: (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M))."""
    # N tiles vary fastest so the programs running together share one x row-block.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _dequant_dot(
        acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, offs_n, 0, K, M, N,
        stride_xm, stride_xk, stride_qw, stride_s, stride_z,
        BITS, GROUP, HAS_ZEROS, ONE_GROUP, BLOCK_K, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=out_ok)


@triton.jit
def _splitk_kernel(
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
    stride_xm,
    stride_xk,
    stride_qw,
    stride_s,
    stride_z,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ONE_GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K,
    IS_SPLIT: tl.constexpr,
):
    """out[M, N] (contiguous) over SPLIT_K K slices of k_per_split (a multiple of BLOCK_K).
    Grid: (cdiv(N, BLOCK_N), SPLIT_K); M <= BLOCK_M."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _dequant_dot(
        acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, offs_n, k_begin, k_end, M, N,
        stride_xm, stride_xk, stride_qw, stride_s, stride_z,
        BITS, GROUP, HAS_ZEROS, ONE_GROUP, BLOCK_K, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    splitk_finish(
        acc, ws_ptr, cnt_ptr, b_ptr, out_ptr, offs_m, offs_n, pid_n, pid_k, M, N, SPLIT_K, HAS_BIAS, IS_SPLIT
    )


def launch(x2d, qweight, scales, qzeros, bias, bits, group, out, cfg: KernelConfig) -> torch.Tensor:
    """out [M, N] (contiguous) = x2d [M, K] @ W^T + bias; split_k > 1 needs M <= cfg.block_m."""
    m, k = x2d.shape
    n = qweight.shape[1]
    zeros = qzeros if qzeros is not None else scales  # dummy pointer when HAS_ZEROS is False
    bias_arg = bias if bias is not None else scales
    common = dict(
        BITS=bits, GROUP=group, HAS_ZEROS=qzeros is not None, HAS_BIAS=bias is not None,
        ONE_GROUP=group % cfg.block_k == 0 or group >= k,
        DOT_PRECISION="ieee" if x2d.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    k_per_split, split = tiles.split_slices(k, cfg.split_k, cfg.block_k)
    if split == 1:
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
        _gemm_kernel[grid](
            x2d, qweight, scales, zeros, bias_arg, out, m, n, k,
            x2d.stride(0), x2d.stride(1), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
            **common,
        )  # fmt: skip
        return out
    if m > cfg.block_m:
        raise ValueError(f"split_k={cfg.split_k} needs M <= block_m={cfg.block_m}, got M={m}")
    n_tiles = triton.cdiv(n, cfg.block_n)
    ws = tiles.empty((split, m, n), torch.float32, x2d.device)
    _splitk_kernel[(n_tiles, split)](
        x2d, qweight, scales, zeros, bias_arg, ws, tiles.counters(x2d.device, n_tiles), out, m, n, k, k_per_split,
        x2d.stride(0), x2d.stride(1), qweight.stride(0), scales.stride(0), zeros.stride(0),
        SPLIT_K=split, IS_SPLIT=True, **common,
    )  # fmt: skip
    return out
