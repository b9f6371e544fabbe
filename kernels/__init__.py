"""Low-level kernels over the packed llmquant layout: knows tensors, not models.

`layout` owns the stored format (bits, groups, packing, tensor specs, the torch dequantizer),
`reference` is the independent float64 statement of it every kernel is tested against, `cpu`
the CPU decode path, and `dispatch` (with `gemv`, `gemm`, `prefill`, `tiles`, `tuning`) the
fused dequant-matmul Triton kernels.
"""

from .layout import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    StoredTensor,
    check_bits,
    check_group_size,
    dequantize,
    dequantize_codes,
    effective_group_size,
    group_index,
    implicit_zero,
    num_groups,
    pack_codes,
    packed_rows,
    stored_tensors,
    unpack_codes,
    values_per_word,
)
from .reference import reference_dequantize, reference_linear

__all__ = [
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "StoredTensor",
    "check_bits",
    "check_group_size",
    "dequantize",
    "dequantize_codes",
    "effective_group_size",
    "group_index",
    "implicit_zero",
    "num_groups",
    "pack_codes",
    "packed_rows",
    "reference_dequantize",
    "reference_linear",
    "stored_tensors",
    "unpack_codes",
    "values_per_word",
]
