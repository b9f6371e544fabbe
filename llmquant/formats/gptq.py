"""GPTQ checkpoints (`quant_method: "gptq"`), as AutoGPTQ/GPTQModel write them and transformers
(through gptqmodel), vLLM, SGLang and TGI read them.

Tensors of a quantized linear `P` (W: [N, K], V = 32 / bits codes per int32 word):

| tensor | dtype | shape | contents |
| --- | --- | --- | --- |
| `P.qweight` | int32 | [K / V, N] | codes packed along K, lowest k in the lowest bits (= llmquant's) |
| `P.qzeros` | int32 | [G, N / V] | zero points packed along N, lowest n lowest; v1 stores zero - 1 |
| `P.scales` | float | [G, N] | per-group scale (= llmquant's) |
| `P.g_idx` | int32 | [K] | group of input k: k // group_size (no act-order) |

W[n, k] = (code(k, n) - zero[g_idx[k], n]) * scales[g_idx[k], n]. A symmetric export is
`checkpoint_format: "gptq"` (v1, the form every loader reads: zero 2^(b-1) stored as 2^(b-1) - 1).
An asymmetric export is `checkpoint_format: "gptq_v2"` (zeros stored as they are), the form
GPTQModel keeps internally: GPTQModel refuses asymmetric v1 checkpoints it did not write itself
(v1's "zero - 1" cannot hold a zero of 0), and vLLM serves no asymmetric GPTQ at all. Both are read.

Layers kept in float inside the blocks (`--skip`) are written the two ways the readers look for
them: GPTQModel's `dynamic` negative rules (`-:^<full module name>$`, matched by GPTQModel and vLLM
against full module names) and `modules_in_block_to_quantize` (what transformers/optimum and vLLM
read: the block-relative names of the quantized linears, the same in every block).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..checkpoint.shards import TensorSpec
from ..config import QuantConfig
from ..errors import FormatError
from ..kernels.layout import SUPPORTED_BITS, group_index, implicit_zero, num_groups, packed_rows, values_per_word
from .common import check_common, expect_shape, pack_along_n, unpack_along_n
from .registry import register_format

NAME = "gptq"
MEMBERS = ("qweight", "qzeros", "scales", "g_idx")
CHECKPOINT_FORMAT = "gptq"  # v1: symmetric exports
CHECKPOINT_FORMAT_ASYM = "gptq_v2"  # zeros as they are: asymmetric exports
# Widths read: GPTQ's 3-bit codes cross int32 word boundaries, unlike llmquant's 10 per word.
READ_BITS = tuple(bits for bits in SUPPORTED_BITS if 32 % bits == 0)
BLOCK = re.compile(r"^(?P<prefix>.+?)[.](?P<index>[0-9]+)[.](?P<inner>.+)$")


@register_format(name=NAME, marker="qweight", scale_member="scales", members=MEMBERS)
def recognizes(quantization_config: dict) -> bool:
    return quantization_config.get("quant_method") == NAME


def load_help(config: QuantConfig) -> str:
    """How engines load an export of `config` (the model card's "Load" section)."""
    from .common import vllm_path

    path = vllm_path(NAME, config)
    if path:
        lines = [
            f"- vLLM: `vllm serve THIS_FOLDER_OR_REPO` (quantization is read from config.json; {path});",
            "- SGLang: `python -m sglang.launch_server --model-path THIS_FOLDER_OR_REPO`;",
        ]
    elif not config.sym:
        lines = ["- vLLM and SGLang: not served (their GPTQ kernels are symmetric-only; export with `--sym`);"]
    else:
        lines = ["- vLLM: no Marlin/Machete kernel for this group size (export g128 or g64 to serve it);"]
    lines += [
        "- transformers: `pip install optimum gptqmodel` (transformers reads GPTQ through optimum's GPTQ "
        'quantizer and GPTQModel\'s kernels), then `AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")`;',
        '- GPTQModel: `GPTQModel.load("THIS_FOLDER_OR_REPO")`;',
        '- llmquant\'s kernels: `llmquant.load("THIS_FOLDER_OR_REPO")`.',
    ]
    return "\n".join(lines)


def check_layer(module: str, n: int, k: int, config: QuantConfig) -> None:
    check_common("GPTQ", module, n, k, config)
    if n % values_per_word(config.bits):
        raise FormatError(f"{module}: out_features {n} does not fill whole int32 words of GPTQ zero points")


def _group_index(k: int, config: QuantConfig) -> torch.Tensor:
    return group_index(k, config.group_size).to(torch.int32)


def layer_specs(module: str, n: int, k: int, scale_dtype: torch.dtype, config: QuantConfig) -> list[TensorSpec]:
    groups = num_groups(k, config.group_size)
    return [
        TensorSpec(f"{module}.qweight", torch.int32, (packed_rows(k, config.bits), n)),
        TensorSpec(f"{module}.qzeros", torch.int32, (groups, packed_rows(n, config.bits))),
        TensorSpec(f"{module}.scales", scale_dtype, (groups, n)),
        TensorSpec(f"{module}.g_idx", torch.int32, (k,)),
    ]


def checkpoint_format(config: QuantConfig) -> str:
    """"gptq" (v1) for a symmetric export, "gptq_v2" for an asymmetric one."""
    return CHECKPOINT_FORMAT if config.sym else CHECKPOINT_FORMAT_ASYM


def export_layer(module: str, packed: dict[str, torch.Tensor], n: int, k: int, config: QuantConfig) -> dict:
    """llmquant tensors -> GPTQ tensors (qweight and scales are shared bit for bit): v1 zeros
    (2^(b-1) - 1 everywhere) when symmetric, v2 zeros (llmquant's, as they are) when asymmetric.

    Returns {"qweight": [K/V, N] int32, "qzeros": [G, N/V] int32, "scales": [G, N] float,
    "g_idx": [K] int32}."""
    groups = num_groups(k, config.group_size)
    if config.sym:
        stored = torch.full((groups, n), implicit_zero(config.bits) - 1, dtype=torch.int32)
    else:
        stored = packed["qzeros"].to(torch.int32)
    return {
        "qweight": packed["qweight"],
        "qzeros": pack_along_n(stored, config.bits, module, "zero point").t().contiguous(),
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
    groups, bits = num_groups(k, config.group_size), config.bits
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
        if not bool((zeros == implicit_zero(bits)).all()):
            raise FormatError(f"{module}: the config says sym but qzeros are not all {implicit_zero(bits)}")
    else:
        packed["qzeros"] = zeros.to(torch.uint8)
    return packed


def skip_rule(module: str) -> str:
    """The GPTQModel `dynamic` key that keeps exactly the module `module` (a full name) in float."""
    return f"-:^{re.escape(module).replace(chr(92) + '.', '[.]')}$"


def block_relative(module: str) -> tuple[str, str] | None:
    """("model.layers", "mlp.down_proj") for "model.layers.3.mlp.down_proj"; None outside the blocks."""
    match = BLOCK.match(module)
    return (match["prefix"], match["inner"]) if match else None


def check_model(quantized: Sequence[str], kept: Sequence[str]) -> None:
    """Refuse what transformers' GPTQ loader (optimum) would load wrong: a quantized output head
    (optimum keeps `lm_head` a float Linear, so its packed tensors would go unread), and float
    linears `modules_in_block_to_quantize` cannot express (optimum quantizes, in every block,
    each linear whose block-relative name it lists: a name quantized in one block must be
    quantized in all). `quantized` and `kept` are full module names."""
    if "lm_head" in quantized:
        raise FormatError(
            "lm_head: a quantized output head (lm_head: true) is not read by transformers' GPTQ loader (optimum); "
            "keep it in float (add lm_head to --skip) or export to compressed-tensors"
        )
    inner_quantized = {rel[1] for rel in map(block_relative, quantized) if rel}
    for module in kept:
        rel = block_relative(module)
        if rel and rel[1] in inner_quantized:
            raise FormatError(
                f"{module}: kept in float while {rel[1]} of other blocks is quantized; transformers' GPTQ loader "
                f"(modules_in_block_to_quantize) needs the same layers in every block: skip {rel[1]} everywhere "
                "or export to compressed-tensors"
            )


def quantization_config(config: QuantConfig, quantized: Sequence[str] = ()) -> dict:
    """The fields transformers' GPTQConfig (optimum), GPTQModel and vLLM's GPTQ config read.

    `config.modules_to_not_convert` holds full module names here. Linears kept in float inside
    the blocks become GPTQModel `dynamic` negative rules on their full names, and, given the
    quantized linears' full names `quantized`, `modules_in_block_to_quantize` lists the
    block-relative names that are quantized (written only when something inside a block is
    kept in float)."""
    from .. import __version__

    kept = [name for name in config.modules_to_not_convert or [] if name != "lm_head"]
    qc = {
        "quant_method": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        "desc_act": False,
        "sym": config.sym,
        "lm_head": False,  # a quantized head is refused (check_model): optimum would not read it
        "method": "gptq",  # GPTQModel's quantization method field (what the kernels read), not llmquant's
        "checkpoint_format": checkpoint_format(config),
        "format": checkpoint_format(config),  # GPTQModel writes both spellings
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"llmquant:{__version__}"], "method": config.method, "static_groups": False},
    }
    in_blocks = [name for name in kept if block_relative(name)]
    if in_blocks:
        qc["dynamic"] = {skip_rule(name): {} for name in in_blocks}
        inner = dict.fromkeys(rel[1] for rel in map(block_relative, quantized) if rel)
        if inner:
            qc["modules_in_block_to_quantize"] = [list(inner)]
    return qc


def parse_config(quantization_config: dict) -> QuantConfig:
    """QuantConfig (modules_to_not_convert unresolved) of a GPTQ checkpoint, refusing what
    llmquant's layout cannot hold."""
    qc = quantization_config
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise FormatError(f"GPTQ checkpoint_format {fmt!r} is not read (only 'gptq' and 'gptq_v2')")
    if qc.get("bits") not in READ_BITS:
        raise FormatError(f"GPTQ bits {qc.get('bits')!r}: llmquant reads 2, 4 and 8-bit GPTQ checkpoints")
    for rule, override in (qc.get("dynamic") or {}).items():
        # negative rules keep layers in float (their tensors say so); a positive rule that changes
        # bits, group size or symmetry would make a mixed-precision model llmquant's layout cannot hold
        changed = {k: v for k, v in (override or {}).items() if qc.get(k) != v}
        if not rule.startswith("-:") and changed:
            raise FormatError(
                f"GPTQ 'dynamic' rule {rule!r} overrides {sorted(changed)}: llmquant does not read mixed-precision GPTQ"
            )
    return QuantConfig(bits=qc["bits"], group_size=qc.get("group_size", 128), sym=bool(qc.get("sym", True)))


def engine_warnings(config: QuantConfig) -> list[str]:
    """What the serving engines cannot run (docs/FORMAT.md, "Serving")."""
    from .common import SERVING_RECOMMENDATION, serving_warnings

    warnings = serving_warnings(config)
    if not config.sym:
        warnings.insert(
            0,
            "asymmetric GPTQ (written as gptq_v2): vLLM and SGLang refuse it (their GPTQ kernels are symmetric-only); "
            "transformers and GPTQModel load it. To serve with vLLM, export --sym (or compressed-tensors)",
        )
    return warnings + [SERVING_RECOMMENDATION] if warnings else []
