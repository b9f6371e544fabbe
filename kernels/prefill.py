"""Large-M (prefill) route: dequantize W^T into a scratch buffer with one fast kernel, then cuBLAS.

At large M the product is compute bound and cuBLAS' fp16/bf16 GEMM is the ceiling; a fused
dequantizing GEMM re-dequantizes every weight tile once per M tile and falls well behind it
(docs/KERNELS.md, "Routing"). Dequantizing once costs one read of the packed weight plus one write of K x N
activations-dtype values, small against the GEMM once M is a few hundred, so the route stays near
fp16 speed. The scratch buffer ([K, N] in the activation dtype, e.g. 470 MB for 28672 x 8192 in
fp16) is taken from torch's caching allocator per call and released after the GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles
from .tiles import load_codes
from .tuning import KernelConfig


@triton.jit
def _dequant_kernel(
    qw_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    K,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[K, N] = W^T in out's dtype, from qweight/scales/qzeros contiguous with row stride N.
    Grid: (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    ok = (offs_k < K)[:, None] & n_ok[None, :]
    codes = load_codes(qw_ptr, k0, K, offs_k, offs_n, n_ok, N, BITS, BLOCK_K, BLOCK_N)
    g = offs_k // GROUP
    scale = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=ok, other=0).to(tl.int32)
    else:
        zero = 1 << (BITS - 1)
    w = (codes - zero).to(tl.float32) * scale
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


def dequantize_kn(qweight, scales, qzeros, bits, group, k, dtype, cfg: KernelConfig) -> torch.Tensor:
    """W^T [K, N] in `dtype` (contiguous), from contiguous packed tensors."""
    n = qweight.shape[1]
    wt = tiles.empty((k, n), dtype, qweight.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k))
    _dequant_kernel[grid](
        qweight, scales, qzeros if qzeros is not None else scales, wt, n, k,
        BITS=bits, GROUP=group, HAS_ZEROS=qzeros is not None, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return wt


def launch(x2d, qweight, scales, qzeros, bias, bits, group, out, cfg: KernelConfig) -> torch.Tensor:
    """out [M, N] = x2d [M, K] @ W^T + bias through a dequantized scratch copy and torch's GEMM."""
    wt = dequantize_kn(qweight, scales, qzeros, bits, group, x2d.shape[1], x2d.dtype, cfg)
    if bias is None:
        return torch.mm(x2d, wt, out=out)
    return torch.addmm(bias.to(x2d.dtype), x2d, wt, out=out)
