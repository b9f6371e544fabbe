"""Float64 reference of the stored format, written from its formula (docs/FORMAT.md) alone.

It shares no code with `layout` (not the unpacker, not the dequantizer), so the kernels, the
dequantizer and QuantLinear are tested against an independent statement of the format:

    code(k, n) = (qweight[k // V, n] >> (bits * (k % V))) & (2^bits - 1),   V = 32 // bits
    W[n, k] = (code(k, n) - zero[k // group, n]) * scale[k // group, n],    zero = 2^(bits-1) if symmetric
"""

from __future__ import annotations

import torch


def reference_dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """W [N, K] float64 from qweight [ceil(K/V), N] int32, scales [G, N], qzeros [G, N] or None."""
    k = torch.arange(in_features, device=qweight.device)
    per_word = 32 // bits
    words = qweight.to(torch.int64)[k // per_word] & 0xFFFFFFFF  # [K, N], the word holding code k
    codes = (words >> (bits * (k % per_word)).unsqueeze(1)) & (2**bits - 1)
    group = in_features if group_size == -1 else group_size
    g = k // group
    zero = 2.0 ** (bits - 1) if qzeros is None else qzeros.to(torch.float64)[g]
    return ((codes.to(torch.float64) - zero) * scales.to(torch.float64)[g]).t()


def reference_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """x [..., K] @ W^T + bias, all in float64: the ground truth for kernels."""
    weight = reference_dequantize(qweight, scales, qzeros, bits, group_size, x.shape[-1])
    out = x.to(torch.float64) @ weight.t()
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out
