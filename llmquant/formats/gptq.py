"""GPTQ checkpoints (`quant_method: "gptq"`), as AutoGPTQ/GPTQModel write them and transformers
(through gptqmodel), vLLM, SGLang and TGI read them.

Tensors of a quantized linear `P` (W: [N, K], V = 32 / bits codes per int32 word):

| tensor | dtype | shape | contents |
| --- | --- | --- | --- |
| `P.qweight` | int32 | [K / V, N] | codes packed along K, lowest k in the lowest bits (= llmquant's) |
| `P.qzeros` | int32 | [G, N / V] | zero points packed along N, lowest n lowest; v1 stores zero - 1 |
| `P.scales` | float | [G, N] | per-group scale (= llmquant's) |
| `P.g_idx` | int32 | [K] | group of input k: k // group_size (no act-order) |

W[n, k] = (code(k, n) - zero[g_idx[k], n]) * scales[g_idx[k], n]. We write `checkpoint_format:
"gptq"` (v1, the form every loader reads): a symmetric layer stores zero 2^(b-1) as 2^(b-1) - 1,
an asymmetric zero z as z - 1, so z = 0 cannot be stored and is refused. v2 (`gptq_v2`, zeros as
they are) is read.
"""

from __future__ import annotations

import torch

from ..config import QuantConfig
from ..kernels.pack import packed_rows, values_per_word
from ..shards import TensorSpec
from . import FormatError
from .common import check_common, expect_shape, groups_of, pack_along_n, unpack_along_n

NAME = "gptq"
MEMBERS = ("qweight", "qzeros", "scales", "g_idx")
CHECKPOINT_FORMAT = "gptq"  # v1
LOAD_HELP = """- vLLM: `vllm serve THIS_FOLDER_OR_REPO` (quantization is read from config.json; symmetric 4/8-bit
  layers run on the gptq_marlin kernels);
- SGLang: `python -m sglang.launch_server --model-path THIS_FOLDER_OR_REPO`;
- transformers (with `gptqmodel` installed): `AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")`;
- llmquant's kernels: `llmquant.load("THIS_FOLDER_OR_REPO")`."""


def check_layer(module: str, n: int, k: int, config: QuantConfig) -> None:
    check_common("GPTQ", module, n, k, config)
    if n % values_per_word(config.bits):
        raise FormatError(f"{module}: out_features {n} does not fill whole int32 words of GPTQ zero points")


def _group_index(k: int, config: QuantConfig) -> torch.Tensor:
    group = k if config.group_size == -1 else config.group_size
    return torch.div(torch.arange(k, dtype=torch.int32), group, rounding_mode="floor")


def layer_specs(module: str, n: int, k: int, scale_dtype: torch.dtype, config: QuantConfig) -> list[TensorSpec]:
    groups, per_word = groups_of(k, config), values_per_word(config.bits)
    return [
        TensorSpec(f"{module}.qweight", torch.int32, (packed_rows(k, config.bits), n)),
        TensorSpec(f"{module}.qzeros", torch.int32, (groups, n // per_word)),
        TensorSpec(f"{module}.scales", scale_dtype, (groups, n)),
        TensorSpec(f"{module}.g_idx", torch.int32, (k,)),
    ]


def export_layer(module: str, packed: dict[str, torch.Tensor], n: int, k: int, config: QuantConfig) -> dict:
    """llmquant tensors -> GPTQ v1 tensors (qweight and scales are shared bit for bit)."""
    groups = groups_of(k, config)
    if config.sym:
        zeros = torch.full((groups, n), 1 << (config.bits - 1), dtype=torch.int32)
    else:
        zeros = packed["qzeros"].to(torch.int32)
        if bool((zeros == 0).any()):
            g, col = (zeros == 0).nonzero()[0].tolist()
            raise FormatError(
                f"{module}: zero point 0 (group {g}, output {col}) cannot be stored in GPTQ v1, which stores "
                "zero - 1; export with --sym, or to compressed-tensors"
            )
    return {
        "qweight": packed["qweight"],
        "qzeros": pack_along_n(zeros - 1, config.bits, module, "zero point").t().contiguous(),
        "scales": packed["scales"],
        "g_idx": _group_index(k, config),
    }


def import_layer(
    module: str, tensors: dict[str, torch.Tensor], n: int, k: int, config: QuantConfig, source_qc: dict
) -> dict:
    """GPTQ tensors -> llmquant tensors. `config.sym` here is llmquant's: symmetric means every
    stored zero is the implicit 2^(b-1), so the zeros are dropped (checked, not assumed)."""
    for name in ("qweight", "qzeros", "scales"):
        if name not in tensors:
            raise FormatError(f"{module}.{name} is missing from the GPTQ checkpoint")
    groups, bits = groups_of(k, config), config.bits
    expect_shape(module, "qweight", tensors["qweight"], (packed_rows(k, bits), n))
    expect_shape(module, "scales", tensors["scales"], (groups, n))
    expect_shape(module, "qzeros", tensors["qzeros"], (groups, packed_rows(n, bits)))
    g_idx = tensors.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), _group_index(k, config).to(torch.int64)):
        raise FormatError(
            f"{module}.g_idx is not k // group_size (act-order / desc_act checkpoint); llmquant's layout "
            "has contiguous groups only"
        )
    stored = unpack_along_n(tensors["qzeros"].t(), bits, n).to(torch.int32)
    zeros = stored + 1 if source_qc.get("checkpoint_format", "gptq") == "gptq" else stored
    if bool((zeros >= 1 << bits).any()):  # v1's stored 2^b - 1: out of range, and a uint8 would wrap it
        g, col = (zeros >= 1 << bits).nonzero()[0].tolist()
        raise FormatError(
            f"{module}: zero point {int(zeros[g, col])} (group {g}, output {col}) is outside [0, {1 << bits}) "
            f"for {bits}-bit codes; the checkpoint is corrupt"
        )
    packed = {"qweight": tensors["qweight"], "scales": tensors["scales"]}
    if config.sym:
        if not bool((zeros == 1 << (bits - 1)).all()):
            raise FormatError(f"{module}: the config says sym but qzeros are not all {1 << (bits - 1)}")
    else:
        packed["qzeros"] = zeros.to(torch.uint8)
    return packed


def quantization_config(config: QuantConfig) -> dict:
    """The fields transformers' GPTQConfig / gptqmodel and vLLM's GPTQ configs read. Layers kept
    in float inside the blocks (anything skipped besides the output head) are listed in
    gptqmodel's `dynamic` as negative matches, which vLLM also honours."""
    from .. import __version__

    skipped = [name for name in config.modules_to_not_convert or [] if name != "lm_head"]
    qc = {
        "quant_method": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        "desc_act": False,
        "sym": config.sym,
        "static_groups": False,
        "true_sequential": True,
        "lm_head": False,
        "checkpoint_format": CHECKPOINT_FORMAT,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"llmquant:{__version__}"], "method": config.method},
    }
    if skipped:
        qc["dynamic"] = {f"-:^{name.replace('.', '[.]')}$": {} for name in skipped}
    return qc


def parse_config(quantization_config: dict) -> QuantConfig:
    """QuantConfig (modules_to_not_convert unresolved) of a GPTQ checkpoint, refusing what
    llmquant's layout cannot hold."""
    qc = quantization_config
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise FormatError(f"GPTQ checkpoint_format {fmt!r} is not read (only 'gptq' and 'gptq_v2')")
    if qc.get("bits") not in (2, 4, 8):
        raise FormatError(f"GPTQ bits {qc.get('bits')!r}: llmquant reads 2, 4 and 8-bit GPTQ checkpoints")
    if qc.get("dynamic"):
        raise FormatError("GPTQ checkpoints with per-module 'dynamic' overrides are not read by llmquant")
    if qc.get("lm_head"):
        raise FormatError("GPTQ checkpoints with a quantized lm_head are not read by llmquant")
    return QuantConfig(bits=qc["bits"], group_size=qc.get("group_size", 128), sym=bool(qc.get("sym", True)))


def engine_warnings(config: QuantConfig) -> list[str]:
    if config.sym:
        return []
    return [
        "asymmetric GPTQ: vLLM's gptq_marlin kernels run symmetric GPTQ only; vLLM serves this "
        "checkpoint with its slower 'gptq' (exllama) kernel"
    ]
