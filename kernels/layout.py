"""The packed weight layout (format_version 1), shared by every kernel.

Codes are unsigned integers in [0, 2^bits). `values_per_word = 32 // bits` codes of one
output column share an int32 word, consecutive along the input dimension K:

    code(k, n) = (qweight[k // V, n] >> (bits * (k % V))) & (2^bits - 1),   V = 32 // bits

so `qweight` is `[ceil(K / V), N] int32` (K-major, N contiguous: a tile of N columns is one
coalesced load in the kernels). 3-bit codes use 10 per word and leave the top 2 bits zero.
Rows past K are padding and hold zeros. See docs/FORMAT.md.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def values_per_word(bits: int) -> int:
    """Codes per int32 word: 16, 10, 8, 4 for 2, 3, 4, 8 bits."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return 32 // bits


def packed_rows(in_features: int, bits: int) -> int:
    """Rows of `qweight` for `in_features` K: ceil(K / values_per_word)."""
    per_word = values_per_word(bits)
    return (in_features + per_word - 1) // per_word


def effective_group_size(group_size: int, in_features: int) -> int:
    """group_size -1 means one group spanning the whole row; otherwise it must be positive."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise ValueError(f"group_size must be a positive integer or -1 (whole row), got {group_size!r}")
    return in_features if group_size == -1 else group_size


def num_groups(in_features: int, group_size: int) -> int:
    """Groups per row, G = ceil(K / group_size); the last one may be shorter."""
    group = effective_group_size(group_size, in_features)
    return (in_features + group - 1) // group


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(values_per_word(bits), device=device, dtype=torch.int64) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes into the layout above.

    codes: [N, K] integer tensor with values in [0, 2^bits)  ->  qweight: [ceil(K/V), N] int32
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    per_word = values_per_word(bits)
    n, k = codes.shape
    rows = packed_rows(k, bits)
    wide = torch.zeros(rows * per_word, n, dtype=torch.int64, device=codes.device)
    wide[:k] = codes.t().to(torch.int64)
    if wide.numel() and (int(wide.min()) < 0 or int(wide.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    words = (wide.view(rows, per_word, n) << _shifts(bits, codes.device).view(1, per_word, 1)).sum(dim=1)
    # Words are built as uint32 values in int64; fold the top bit into int32's sign.
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32)


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_codes`: qweight [ceil(K/V), N] int32  ->  codes [N, K] uint8."""
    per_word = values_per_word(bits)
    rows, n = qweight.shape
    if rows != packed_rows(in_features, bits):
        raise ValueError(
            f"qweight has {rows} rows but {in_features} inputs at {bits} bits need {packed_rows(in_features, bits)}"
        )
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    codes = (words.unsqueeze(1) >> _shifts(bits, qweight.device).view(1, per_word, 1)) & ((1 << bits) - 1)
    return codes.reshape(rows * per_word, n)[:in_features].t().to(torch.uint8)
