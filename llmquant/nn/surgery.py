"""Which of a model's modules are quantized, and swapping them: nn.Linear layers for QuantLinear
(and Mixture-of-Experts experts modules for QuantExperts, llmquant/nn/experts.py), empty to load
packed weights, and back to float (`dequantize_`). Round to nearest is here
(`round_to_nearest_`); `llmquant.api.quantize_` also runs the calibrated methods."""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantConfig
from ..methods.codes import check_finite, quantize_weight
from ..progress import progress_bar
from .experts import PROJECTIONS, QuantExperts, quantize_experts
from .linear import QuantLinear
from .linears import is_linear


def default_skip(model: nn.Module) -> list[str]:
    """Module names kept in floating point by default: the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules() if head is not None and module is head]


def tied_linears(model: nn.Module) -> list[str]:
    """Names of the linears sharing their weight with an embedding (a tied head): never quantized."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module.weight) in embedding_weights
    ]


def modules_to_skip(model: nn.Module, config: QuantConfig) -> list[str]:
    """The modules kept in floating point: modules_to_not_convert (the output head when None),
    plus a head tied to the embedding, which follows the embedding whatever the list says (a
    config naming it "quantized" would describe tensors no checkpoint can hold)."""
    skip = config.modules_to_not_convert
    skip = default_skip(model) if skip is None else list(skip)
    return skip + [name for name in tied_linears(model) if not is_skipped(name, skip)]


def is_skipped(name: str, skip: list[str]) -> bool:
    """A module is skipped when a skip entry equals its name or a dotted suffix/prefix of it."""
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def check_skip_matches(model: nn.Module, config: QuantConfig) -> None:
    """Refuse a modules_to_not_convert entry (--skip) that matches no module: a typo would
    otherwise quantize the layer it meant to keep, silently. The default (None) is not checked."""
    if config.modules_to_not_convert is None:
        return
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [s for s in config.modules_to_not_convert if not any(is_skipped(name, [s]) for name in names)]
    if unmatched:
        linears = sorted({name.rpartition(".")[2] for name, m in model.named_modules() if is_linear(m)})
        raise ValueError(
            f"modules_to_not_convert (--skip) {unmatched[0]!r} matches no module of the model; "
            f"its linear layers are named {', '.join(linears[:12])}"
        )


def linear_layers(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs the config quantizes, in model order: nn.Linear and transformers'
    Conv1D (GPT-2; a transposed linear, see llmquant.nn.linears)."""
    skip = modules_to_skip(model, config)  # includes a tied head
    # A linear sharing its weight with an embedding (tied head) must stay a float tensor.
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    routers = router_linears(model)
    return [
        (name, module)
        for name, module in model.named_modules()
        if is_linear(module)
        and not is_skipped(name, skip)
        and id(module.weight) not in embedding_weights
        and module not in routers
    ]


def router_linears(model: nn.Module) -> set[nn.Module]:
    """nn.Linear routers of MoE blocks (direct children of a module holding experts, e.g. Qwen2-MoE's
    `shared_expert_gate` [1, H]): always kept in float, since they are tiny and a rounding error in
    them changes which experts run. (transformers 5's top-k routers are not nn.Linear at all.)"""
    from .experts import is_experts

    found = set()
    for module in model.modules():
        if any(is_experts(child) for child in module.children()):
            found.update(child for child in module.children() if isinstance(child, nn.Linear))
    return found


def expert_layers(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    """The (name, experts module) pairs the config quantizes (llmquant/nn/experts.py), in model order;
    ValueError naming one whose layout QuantExperts cannot run."""
    from .experts import check_layout, is_experts

    skip = modules_to_skip(model, config)
    found = [(n, m) for n, m in model.named_modules() if is_experts(m) and not is_skipped(n, skip)]
    for name, module in found:
        check_layout(name, module)
    return found


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the qualified `name` inside `model` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_with_empty_quant_linear(model: nn.Module, config: QuantConfig, dtype: torch.dtype) -> list[str]:
    """Replace each quantizable nn.Linear by an empty QuantLinear on the same device (meta while
    transformers builds the skeleton); returns the names replaced."""
    replaced = []
    for name, linear in linear_layers(model, config):
        module = QuantLinear.like(linear, config.bits, config.group_size, config.sym, dtype=dtype)
        set_module(model, name, module)
        replaced.append(name)
    for name, experts in expert_layers(model, config):
        set_module(model, name, QuantExperts.like(experts, config.bits, config.group_size, config.sym, dtype=dtype))
        replaced.append(name)
    return replaced


def quantizable_layers(
    model: nn.Module, config: QuantConfig
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """(linear_layers, expert_layers) of the config, after refusing (ValueError) an unmatched
    --skip entry, a weight that is not a finite float tensor in memory, or nothing to quantize."""
    check_skip_matches(model, config)
    layers = linear_layers(model, config)
    experts = expert_layers(model, config)
    weights = [(f"{name}.weight", linear.weight) for name, linear in layers]
    weights += [(f"{name}.{proj}", getattr(module, proj)) for name, module in experts for proj in PROJECTIONS]
    for name, weight in weights:  # all or nothing: refuse a bad layer before converting any
        if not weight.is_floating_point() or weight.is_meta:
            raise ValueError(f"layer {name!r} has a {weight.dtype} weight on {weight.device}; cannot quantize it")
        check_finite(weight, name)
    if not layers and not experts:  # quantizing nothing is an error, not a model that claims to be quantized
        raise ValueError(f"{type(model).__name__}: no layer to quantize (no nn.Linear or Conv1D outside the skipped)")
    return layers, experts


@torch.no_grad()
def round_to_nearest_(
    model: nn.Module,
    config: QuantConfig,
    progress: bool = True,
    layers: list[tuple[str, nn.Module]] | None = None,
    experts: list[tuple[str, nn.Module]] | None = None,
) -> nn.Module:
    """`llmquant.quantize_` for the calibration-free method (rtn): each selected layer swapped for
    its round-to-nearest QuantLinear / QuantExperts; layers, experts: `quantizable_layers` (checked
    here when not given). Records the resolved config in model.config. Returns the model."""
    if layers is None or experts is None:
        layers, experts = quantizable_layers(model, config)
    # What the model holds, recorded before the swap (the default skip looks at the float head):
    # save_pretrained writes it, and without it a reload builds nn.Linear over packed tensors.
    resolved = QuantConfig(**{**config.to_dict(), "modules_to_not_convert": modules_to_skip(model, config)})
    for name, linear in progress_bar(layers, enabled=progress, desc="quantizing", unit="layer"):
        set_module(
            model,
            name,
            QuantLinear.from_linear(
                linear, config.bits, config.group_size, config.sym, method=config.method, name=f"{name}.weight"
            ),
        )
    for name, module in experts:

        def rtn(proj: str, expert: int, weight: torch.Tensor, name: str = name) -> dict[str, torch.Tensor]:
            return quantize_weight(weight, config.bits, config.group_size, config.sym, name=f"{name}.{proj}[{expert}]")

        set_module(model, name, quantize_experts(module, rtn, config.bits, config.group_size, config.sym))
    if hasattr(model, "config"):
        model.config.quantization_config = resolved
    return model


@torch.no_grad()
def dequantize_(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every QuantLinear by an nn.Linear holding its dequantized weight (in `dtype`,
    default the scales' dtype), and every QuantExperts by its float experts module, in place.
    Returns the model."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        weight = module.dequantize(dtype)
        linear = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            dtype=weight.dtype,
            device=weight.device,
        )
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        set_module(model, name, linear)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantExperts)]:
        set_module(model, name, module.to_float(model.config, dtype))
    forget_quantization(model)
    return model


def forget_quantization(model: nn.Module) -> None:
    """After dequantizing: drop what says the model is quantized (its config's
    quantization_config, transformers' quantizer), so save_pretrained writes a float folder that
    a plain from_pretrained reads as one, instead of building empty QuantLinear layers."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
