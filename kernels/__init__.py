"""Low-level kernels over the packed llmquant layout: knows tensors, not models.

`pack` defines the layout, `reference` is the float64 torch reference every kernel is
tested against, and `triton_matmul` holds the fused dequant-matmul Triton kernels.
"""

from .layout import (
    SUPPORTED_BITS,
    effective_group_size,
    num_groups,
    pack_codes,
    packed_rows,
    unpack_codes,
    values_per_word,
)
from .reference import dequantize, reference_linear

__all__ = [
    "SUPPORTED_BITS",
    "dequantize",
    "effective_group_size",
    "num_groups",
    "pack_codes",
    "packed_rows",
    "reference_linear",
    "unpack_codes",
    "values_per_word",
]
