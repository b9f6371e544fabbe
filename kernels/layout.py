"""The stored format of a quantized weight (format_version 1): the one owner of its facts.

Codes are unsigned integers in [0, 2^bits). `values_per_word = 32 // bits` codes of one
output column share an int32 word, consecutive along the input dimension K:

    code(k, n) = (qweight[k // V, n] >> (bits * (k % V))) & (2^bits - 1),   V = 32 // bits

so `qweight` is `[ceil(K / V), N] int32` (K-major, N contiguous: a tile of N columns is one
coalesced load in the kernels). 3-bit codes use 10 per word and leave the top 2 bits zero.
Rows past K are padding and hold zeros. Groups of `group_size` consecutive k share a scale
(`scales` [G, N] float) and, asymmetric, a zero point (`qzeros` [G, N] uint8); symmetric
weights store no zeros and use the implicit zero 2^(bits-1):

    W[n, k] = (code(k, n) - zero[k // group, n]) * scale[k // group, n]

See docs/FORMAT.md. Everything else (kernels, quantizers, QuantLinear, checkpoint planning and
verification, export formats) asks this module; it imports only torch, so it sits at the bottom
of the import graph.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
# What QuantConfig offers and `llmquant quantize` writes; the layout itself (and so the kernels)
# holds any positive group size, or -1.
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256, -1)


def check_bits(bits: object) -> None:
    """ValueError unless `bits` is a supported code width (2, 3, 4 or 8)."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)}, got {bits!r}")


def check_group_size(group_size: object) -> None:
    """ValueError unless `group_size` is one QuantConfig offers (SUPPORTED_GROUP_SIZES)."""
    if isinstance(group_size, bool) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {list(SUPPORTED_GROUP_SIZES)}, got {group_size!r}")


def values_per_word(bits: int) -> int:
    """Codes per int32 word: 16, 10, 8, 4 for 2, 3, 4, 8 bits."""
    check_bits(bits)
    return 32 // bits


def implicit_zero(bits: int) -> int:
    """The zero point of symmetric codes, 2^(bits-1) (not stored): code c means c - 2^(bits-1)."""
    return 1 << (bits - 1)


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


def group_index(in_features: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The group of each input k: k // group, [K] int64."""
    group = effective_group_size(group_size, in_features)
    return torch.arange(in_features, device=device) // group


STORED_NAMES = ("qweight", "scales", "qzeros")  # what `stored_tensors` lists (qzeros: asymmetric only)


class StoredTensor(NamedTuple):
    """One tensor a quantized linear stores: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def stored_tensors(
    out_features: int, in_features: int, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype
) -> list[StoredTensor]:
    """What a quantized weight W [N, K] is stored as, in this order: qweight [ceil(K/V), N] int32,
    scales [G, N] scale_dtype and, asymmetric only, qzeros [G, N] uint8."""
    rows, groups = packed_rows(in_features, bits), num_groups(in_features, group_size)
    qweight, scales, qzeros = STORED_NAMES
    specs = [
        StoredTensor(qweight, torch.int32, (rows, out_features)),
        StoredTensor(scales, scale_dtype, (groups, out_features)),
    ]
    if not sym:
        specs.append(StoredTensor(qzeros, torch.uint8, (groups, out_features)))
    return specs


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


def unpack_codes_kn(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes of qweight [rows, N] int32, K-major as stored: [rows * V, N] (K padded to whole
    words; uint8 or int32), code k of column n at row k. No transpose copy."""
    rows, n = qweight.shape
    # stride(-1) too: a size-1 dimension leaves a transposed view "contiguous" with another stride
    if bits == 8 and sys.byteorder == "little" and qweight.is_contiguous() and qweight.stride(-1) == 1:
        # Byte j of a little-endian word is code j: reading bytes beats shifting int32 words
        # (for 4 bits, nibble splitting does not pay).
        return qweight.view(torch.uint8).view(rows, n, 4).permute(0, 2, 1).reshape(rows * 4, n)
    per_word = values_per_word(bits)
    shifts = torch.arange(0, bits * per_word, bits, dtype=torch.int32, device=qweight.device)
    # int32 shifts are arithmetic, so the mask is what keeps the top code of a negative word unsigned
    codes = (qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return codes.reshape(-1, n)  # a view when qweight is contiguous


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_codes`: qweight [ceil(K/V), N] int32  ->  codes [N, K] uint8."""
    rows = qweight.shape[0]
    if rows != packed_rows(in_features, bits):
        raise ValueError(
            f"qweight has {rows} rows but {in_features} inputs at {bits} bits need {packed_rows(in_features, bits)}"
        )
    # copy: the 8-bit byte view of a one-column qweight would otherwise alias qweight
    return unpack_codes_kn(qweight, bits)[:in_features].t().to(torch.uint8, copy=True)


def _apply_groups(
    weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """(weight - zero) * scale in place, per group along K: weight [K, N] codes in the output dtype
    (any strides), scales/zeros [G, N]; returns weight. The arithmetic is in weight's dtype."""
    k, n = weight.shape
    dtype = weight.dtype
    group = effective_group_size(group_size, k)
    zeros = None if zeros is None else zeros.to(dtype).unsqueeze(1)  # [G, 1, N]
    scales = scales.to(dtype).unsqueeze(1)
    # whole groups as one [G', group, N] view and a ragged last group (K = 576, group 128)
    # as another: padding K to whole groups would copy the codes once more
    whole = k // group
    for first, count, length in ((0, whole, group), (whole, 1, k - whole * group)):
        if count and length:
            part = weight[first * group : first * group + count * length].view(count, length, n)
            zero = implicit_zero(bits) if zeros is None else zeros[first : first + count]
            part.sub_(zero).mul_(scales[first : first + count])
    return weight


def dequantize_kn(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W^T [K, N] (contiguous) from the packed tensors, in `dtype` (default: the scales').

    qweight [ceil(K/V), N] int32, scales [G, N] float, qzeros [G, N] uint8 or None (symmetric,
    implicit zero). The arithmetic is (code - zero) * scale in `dtype`, scale rounded to it first."""
    dtype = dtype or scales.dtype
    weight = unpack_codes_kn(qweight, bits)[:in_features].to(dtype)  # a fresh copy: changed in place
    return _apply_groups(weight, scales, qzeros, bits, group_size)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W [N, K] = (code - zero) * scale from the packed tensors (a transposed view of
    `dequantize_kn`, which see), in `dtype` (default: the scales')."""
    return dequantize_kn(qweight, scales, qzeros, bits, group_size, in_features, dtype).t()


def dequantize_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W [N, K] in `dtype` from unpacked codes [N, K] (uint8), scales [G, N], zeros [G, N] or None
    (symmetric): the same arithmetic as `dequantize`, for quantizers that have not packed yet."""
    weight = codes.to(dtype, memory_format=torch.contiguous_format, copy=True)  # [N, K], changed in place below
    _apply_groups(weight.t(), scales, zeros, bits, group_size)  # splitting K of the transposed view is a view
    return weight


def bits_from_bytes(stored_bytes: int, weights: int) -> float:
    """8 * bytes of the stored tensors / quantized weights: the bits-per-weight formula."""
    return 8 * stored_bytes / max(weights, 1)
