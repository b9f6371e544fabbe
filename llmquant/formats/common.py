"""Checks and packing helpers shared by the GPTQ and compressed-tensors modules."""

from __future__ import annotations

import torch

from ..config import QuantConfig
from ..errors import FormatError
from ..kernels.layout import pack_codes, unpack_codes, values_per_word

ENGINE_BITS = (4, 8)


def check_common(fmt: str, module: str, n: int, k: int, config: QuantConfig) -> None:
    """What neither GPTQ nor compressed-tensors `pack-quantized` can hold in a form the engines
    read: widths other than 4 and 8 bits (llmquant's 3-bit words differ from both formats', and
    no engine kernel runs 2-bit), a group size that does not divide K, and K not filling whole
    int32 words."""
    if config.bits not in ENGINE_BITS:
        raise FormatError(f"{module}: {config.bits}-bit codes cannot be exported to {fmt} (only 4 and 8 bits)")
    if config.group_size != -1 and k % config.group_size:
        raise FormatError(
            f"{module}: group size {config.group_size} does not divide in_features {k}; {fmt} loaders need "
            f"whole groups (re-quantize with a group size dividing {k}, or -1)"
        )
    if k % values_per_word(config.bits):
        raise FormatError(f"{module}: in_features {k} does not fill whole int32 words of {config.bits}-bit codes")


def pack_along_n(values: torch.Tensor, bits: int, module: str, what: str) -> torch.Tensor:
    """[G, N] integers in [0, 2^bits) -> [ceil(N/V), G] int32, V per word along N, lowest n lowest."""
    try:
        return pack_codes(values, bits)
    except ValueError as error:
        raise FormatError(f"{module}: {what} {error}") from None


def unpack_along_n(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_along_n`: [ceil(N/V), G] int32 -> [G, N] uint8."""
    return unpack_codes(words, bits, n)


def expect_shape(module: str, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise FormatError(f"{module}.{name} has shape {tuple(tensor.shape)}, expected {shape}")


# vLLM's mixed-precision kernels (read from its source; docs/FORMAT.md, "Serving"): Marlin
# (compute capability >= 8.0) takes group sizes -1/32/64/128, symmetric uint4b8/uint8b128 and,
# with zero points, uint4 only; Machete (Hopper, 9.0) takes -1/64/128, symmetric or with zero
# points, 4 and 8 bits.
MARLIN_GROUPS = (-1, 32, 64, 128)
MACHETE_GROUPS = (-1, 64, 128)


def vllm_path(fmt: str, config: QuantConfig) -> str | None:
    """The kernels vLLM runs an export on (one line), or None where it has no supported path.

    GPTQ: symmetric only (vLLM's GPTQ config refuses sym=False), Marlin group sizes.
    compressed-tensors: symmetric, or asymmetric int4 (Machete or Marlin with zero points), or
    asymmetric int8 on Hopper only (Machete; Marlin has no uint8 with zero points)."""
    if config.bits not in ENGINE_BITS or config.group_size not in MARLIN_GROUPS:
        return None
    machete = config.group_size in MACHETE_GROUPS
    if config.sym:
        hopper = "Machete on Hopper" if machete else "Marlin on Hopper (Machete has no g32)"
        return f"{hopper}, Marlin on Ampere/Ada"
    if fmt != "compressed-tensors":
        return None
    if config.bits == 4:
        hopper = "Machete with zero points on Hopper" if machete else "Marlin with zero points on Hopper"
        return f"{hopper}, Marlin with zero points on Ampere/Ada"
    if not machete:
        return None
    return "Machete with zero points on Hopper only (no Ampere/Ada kernel for int8 with zero points)"


def serving_warnings(config: QuantConfig) -> list[str]:
    """Group sizes vLLM's fast kernels cannot run, whatever the format."""
    if config.group_size in MARLIN_GROUPS:
        return []
    return [
        f"group size {config.group_size}: vLLM's Marlin and Machete kernels take group sizes -1, 32, 64 and 128 "
        "only; publish g128 (or g64) to serve with vLLM"
    ]


SERVING_RECOMMENDATION = (
    "for serving with vLLM/SGLang on their fast kernels publish symmetric int4: --sym --group-size 128 "
    "(or 64), in --format gptq or compressed-tensors"
)
