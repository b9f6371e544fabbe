"""compressed-tensors checkpoints, format `pack-quantized` (`quant_method: "compressed-tensors"`),
as llm-compressor writes them and vLLM, SGLang and transformers (`compressed-tensors` package) read.

Tensors of a quantized linear `P` (W: [N, K], V = 32 / bits codes per int32 word):

| tensor | dtype | shape | contents |
| --- | --- | --- | --- |
| `P.weight_packed` | int32 | [N, K / V] | q + 2^(b-1) packed along K, lowest k lowest (= qweight transposed) |
| `P.weight_scale` | float | [N, G] | per-group scale (= llmquant's scales transposed) |
| `P.weight_zero_point` | int32 | [ceil(N / V), G] | asymmetric only: zp + 2^(b-1) packed along N |
| `P.weight_shape` | int64 | [2] | (N, K) |

compressed-tensors quantizes to signed q in [-2^(b-1), 2^(b-1)) and dequantizes
W = (q - zp) * scale; with llmquant's unsigned code c = q + 2^(b-1) and zero z = zp + 2^(b-1),
(q - zp) = (c - z): the packed words are llmquant's codes and zeros, bit for bit. A symmetric
layer has no zero point (implicit 2^(b-1), as in llmquant). Group size -1 is strategy "channel".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checkpoint.shards import TensorSpec
from ..config import QuantConfig
from ..errors import FormatError
from ..kernels.layout import group_index, num_groups, packed_rows
from .common import ENGINE_BITS, check_common, expect_shape, pack_along_n, unpack_along_n
from .registry import register_format

NAME = "compressed-tensors"
FORMAT = "pack-quantized"
MEMBERS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


@register_format(
    name=NAME, marker="weight_packed", scale_member="weight_scale", members=MEMBERS, aliases=("compressed_tensors",)
)
def recognizes(quantization_config: dict) -> bool:
    return quantization_config.get("quant_method") == NAME


def load_help(config: QuantConfig) -> str:
    """How engines load an export of `config` (the model card's "Load" section)."""
    from .common import vllm_path

    lines = []
    path = vllm_path(NAME, config)
    if path:
        lines.append(f"- vLLM: `vllm serve THIS_FOLDER_OR_REPO` (quantization is read from config.json; {path});")
    else:
        lines.append("- vLLM: no supported kernel for this configuration (docs/FORMAT.md of llmquant, \"Serving\");")
    launch = "`python -m sglang.launch_server --model-path THIS_FOLDER_OR_REPO`"
    if config.sym:
        lines.append(f"- SGLang: {launch};")
        lines.append(
            "- transformers (with `compressed-tensors` installed): "
            '`AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")`;'
        )
    else:
        lines.append(f"- SGLang: {launch} (releases from 2026 on; older ones read symmetric layers only);")
        lines.append(
            "- transformers: not loadable: compressed-tensors' transformers integration sizes an asymmetric "
            "layer's packed `weight_zero_point` unpacked and refuses it (the layout written here is llm-compressor's "
            "and vLLM's); export with `--sym` for transformers and SGLang;"
        )
    lines.append('- llmquant\'s kernels: `llmquant.load("THIS_FOLDER_OR_REPO")`.')
    return "\n".join(lines)


def check_layer(module: str, n: int, k: int, config: QuantConfig) -> None:
    check_common("compressed-tensors", module, n, k, config)


def check_model(quantized: Sequence[str], kept: Sequence[str]) -> None:
    """`ignore` lists any set of float linears by full name: nothing to refuse."""


def layer_specs(module: str, n: int, k: int, scale_dtype: torch.dtype, config: QuantConfig) -> list[TensorSpec]:
    groups = num_groups(k, config.group_size)
    specs = [
        TensorSpec(f"{module}.weight_packed", torch.int32, (n, packed_rows(k, config.bits))),
        TensorSpec(f"{module}.weight_scale", scale_dtype, (n, groups)),
    ]
    if not config.sym:
        specs.append(TensorSpec(f"{module}.weight_zero_point", torch.int32, (packed_rows(n, config.bits), groups)))
    specs.append(TensorSpec(f"{module}.weight_shape", torch.int64, (2,)))
    return specs


def export_layer(module: str, packed: dict[str, torch.Tensor], n: int, k: int, config: QuantConfig) -> dict:
    """llmquant tensors -> pack-quantized tensors: transposes, no arithmetic on codes."""
    tensors = {
        "weight_packed": packed["qweight"].t().contiguous(),
        "weight_scale": packed["scales"].t().contiguous(),
    }
    if not config.sym:
        tensors["weight_zero_point"] = pack_along_n(packed["qzeros"], config.bits, module, "zero point")
    tensors["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    return tensors


def import_layer(
    module: str, tensors: dict[str, torch.Tensor], n: int, k: int, config: QuantConfig, source_qc: dict
) -> dict:
    """pack-quantized tensors -> llmquant tensors."""
    for name in ("weight_packed", "weight_scale"):
        if name not in tensors:
            raise FormatError(f"{module}.{name} is missing from the compressed-tensors checkpoint")
    if "weight_g_idx" in tensors:
        g_idx = tensors["weight_g_idx"].to(torch.int64)
        if not torch.equal(g_idx, group_index(k, config.group_size)):
            raise FormatError(f"{module}.weight_g_idx is an activation ordering; llmquant's groups are contiguous")
    if "weight_shape" in tensors and tensors["weight_shape"].tolist() != [n, k]:
        raise FormatError(f"{module}.weight_shape is {tensors['weight_shape'].tolist()}, the model says {[n, k]}")
    groups = num_groups(k, config.group_size)
    expect_shape(module, "weight_packed", tensors["weight_packed"], (n, packed_rows(k, config.bits)))
    expect_shape(module, "weight_scale", tensors["weight_scale"], (n, groups))
    packed = {
        "qweight": tensors["weight_packed"].t().contiguous(),
        "scales": tensors["weight_scale"].t().contiguous(),
    }
    if not config.sym:
        if "weight_zero_point" not in tensors:
            raise FormatError(f"{module}.weight_zero_point is missing from an asymmetric compressed-tensors checkpoint")
        packed["qzeros"] = unpack_along_n(tensors["weight_zero_point"], config.bits, n)
    return packed


def quantization_config(config: QuantConfig, quantized: Sequence[str] = ()) -> dict:
    """What `compressed_tensors.QuantizationConfig` validates and vLLM's CompressedTensorsConfig
    reads: one config group targeting Linear, `ignore` naming every linear kept in float."""
    from .. import __version__

    group = config.group_size != -1
    weights = {
        "num_bits": config.bits,
        "type": "int",
        "symmetric": config.sym,
        "strategy": "group" if group else "channel",
        "group_size": config.group_size if group else None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT,
            }
        },
        "ignore": list(config.modules_to_not_convert or []),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "provenance": {"producer": f"llmquant {__version__}", "method": config.method},
    }


def parse_config(quantization_config: dict) -> QuantConfig:
    """QuantConfig (modules_to_not_convert unresolved) of a pack-quantized checkpoint with one
    weight-only int scheme on Linear, refusing what llmquant's layout cannot hold."""
    qc = quantization_config
    if qc.get("format") != FORMAT:
        raise FormatError(f"compressed-tensors format {qc.get('format')!r} is not read; llmquant reads {FORMAT!r}")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise FormatError(f"compressed-tensors checkpoint has {len(groups)} config groups; llmquant reads exactly one")
    scheme = groups[0]
    weights = scheme.get("weights") or {}
    if scheme.get("input_activations") or scheme.get("output_activations"):
        raise FormatError("compressed-tensors scheme quantizes activations; llmquant reads weight-only schemes")
    if weights.get("type", "int") != "int" or weights.get("num_bits") not in ENGINE_BITS:
        kind = f"{weights.get('type')} {weights.get('num_bits')}-bit"
        raise FormatError(f"compressed-tensors weights are {kind}: llmquant reads int 4 and 8-bit")
    strategy = weights.get("strategy")
    if strategy not in ("group", "channel"):
        raise FormatError(f"compressed-tensors weight strategy {strategy!r}: llmquant reads 'group' and 'channel'")
    group_size = weights.get("group_size") if strategy == "group" else -1
    return QuantConfig(bits=weights["num_bits"], group_size=group_size, sym=bool(weights.get("symmetric", True)))


def engine_warnings(config: QuantConfig) -> list[str]:
    """What the engines cannot load or serve fast (docs/FORMAT.md, "Serving")."""
    from .common import SERVING_RECOMMENDATION, serving_warnings

    warnings = serving_warnings(config)
    if not config.sym:
        where = "Hopper only (Machete)" if config.bits == 8 else "Machete/Marlin with zero points"
        warnings.insert(
            0,
            f"asymmetric compressed-tensors: vLLM serves it on {where}; transformers' compressed-tensors "
            "integration refuses asymmetric layers (and SGLang before 2026). Export --sym for every engine",
        )
    return warnings + [SERVING_RECOMMENDATION] if warnings else []
