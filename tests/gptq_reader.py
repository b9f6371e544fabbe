"""A test-only GPTQ reader written from the public format description (AutoGPTQ / GPTQModel's
torch fallback), sharing no code with llmquant: it dequantizes `qweight`, `qzeros` (v1: stored
zero + 1), `scales` and `g_idx` into a dense weight, so a GPTQ export can be checked by logits.

No published GPTQ reader installs on these machines: gptqmodel pulls a CUDA torch build, and
transformers reads GPTQ only through gptqmodel.
"""

from __future__ import annotations

import torch


def _unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] int32 -> [R * 32/bits, C]: value j of word r is bits j*b .. j*b+b-1 (low first)."""
    per = 32 // bits
    wide = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.stack([(wide >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], dim=1)
    return out.reshape(-1, words.shape[1])


def dequantize_gptq(tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """W [N, K] float64 (exact: a code difference times a stored scale) from one GPTQ layer's tensors."""
    qweight, qzeros, scales, g_idx = (tensors[k] for k in ("qweight", "qzeros", "scales", "g_idx"))
    codes = _unpack_rows(qweight, bits)  # [K, N]
    zeros = _unpack_rows(qzeros.t().contiguous(), bits).t()  # [G, N]
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    g = g_idx.long()
    weight = (codes.double() - zeros[g].double()) * scales[g].double()  # [K, N]
    return weight.t()
