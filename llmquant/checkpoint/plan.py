"""Planning a quantized checkpoint: which source tensors are quantized, and what the output holds.

The plan comes from a meta-device skeleton of the model (no memory, no weights): its nn.Linear
layers say which tensors are quantized, its state dict says what shape every tensor must have
(a config.json that disagrees with the weights is refused before anything is written), and
`kernels.layout.stored_tensors` says per layer what the quantized layer stores (QuantLinear builds
its buffers from the same function), so the written shapes can never drift from what loading expects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import QuantConfig
from ..errors import CheckpointError
from ..kernels.layout import stored_tensors
from ..nn import families, linears
from ..nn.experts import expert_shapes
from ..nn.surgery import check_skip_matches, expert_layers, linear_layers, modules_to_skip
from .shards import TensorSpec
from .source import meta_model


@dataclass
class Skeleton:
    """What the meta model says about a checkpoint: {linear weight tensor name: module name}, the
    resolved modules_to_not_convert, {tensor name: shape} of the model's state dict, the meta
    model itself (for transformers' conversion rules, checkpoint/conversion.py) and the experts
    tensors quantized per expert ({"<experts>.gate_up_proj": (E, N, K)}, llmquant/nn/experts.py)."""

    targets: dict[str, str]
    skip: list[str]
    shapes: dict[str, tuple[int, ...]]
    optional: list[str]
    model: torch.nn.Module | None = None
    experts: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # target weights stored [K, N] (transformers' Conv1D): quantized as their transpose
    transposed: set[str] = field(default_factory=set)
    float_linears: list[str] = field(default_factory=list)  # full names of the linears kept in float


def quantizable_weights(src: Path, config: QuantConfig) -> Skeleton:
    """Build the model described by `src`/config.json on the meta device and read the plan off it."""
    model = meta_model(src)
    try:
        check_skip_matches(model, config)
        families.check_method(model, config.method)  # e.g. gptq-rot on a LayerNorm family: before any work
        experts = {
            f"{name}.{proj}": shape
            for name, module in expert_layers(model, config)
            for proj, shape in expert_shapes(module).items()
        }
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    layers = linear_layers(model, config)
    if not layers and not experts:  # a run that quantizes nothing is an error, not a copy named "quantized"
        raise CheckpointError(
            f"{families.family(model)}: no layer to quantize (no nn.Linear or Conv1D layer outside --skip "
            f"{modules_to_skip(model, config)})"
        )
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    transposed = {f"{name}.weight" for name, module in layers if linears.transposed(module)}
    quantized = {name for name, _ in layers}
    float_linears = [
        name for name, module in model.named_modules() if linears.is_linear(module) and name not in quantized
    ]
    return Skeleton(
        {f"{name}.weight": name for name, _ in layers},
        modules_to_skip(model, config),
        shapes,
        may_be_missing(model),
        model,
        experts,
        transposed,
        float_linears,
    )


def may_be_missing(model: torch.nn.Module) -> list[str]:
    """Patterns of tensors a checkpoint may lack: tied copies (the head sharing the embedding)
    and what the model class itself says may be missing."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return [re.escape(name) for name in tied] + list(model._keys_to_ignore_on_load_missing or [])


def check_shapes(source: list[TensorSpec], skeleton: Skeleton, config_path: Path) -> None:
    """Every source tensor the model has must have the model's shape (else config.json and the
    weights describe different models and the output would not load)."""
    for spec in source:
        expected = skeleton.shapes.get(spec.name)
        if expected is not None and expected != spec.shape:
            raise CheckpointError(
                f"tensor {spec.name!r} is {list(spec.shape)} in the checkpoint but {config_path} describes "
                f"{list(expected)}; config.json and the weights disagree"
            )
    names = {spec.name for spec in source}
    missing = sorted((set(skeleton.targets) | set(skeleton.experts)) - names)
    if missing:
        raise CheckpointError(
            f"{len(missing)} linear weights of the model are not in the checkpoint (first: {missing[0]!r}); "
            "is the checkpoint complete?"
        )
    optional = re.compile("|".join(f"(?:{p})" for p in skeleton.optional)) if skeleton.optional else None
    missing = sorted(n for n in skeleton.shapes.keys() - names if not (optional and optional.search(n)))
    if missing:  # loading would initialise them randomly
        raise CheckpointError(
            f"{len(missing)} tensors of the model are not in the checkpoint (first: {missing[0]!r}); "
            "is the checkpoint complete?"
        )


def quantized_buffers(spec: TensorSpec, config: QuantConfig) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of what the weight `spec` [N, K] is stored as (kernels.layout, what a
    QuantLinear holds), in the order `quantize_weight` returns them (qweight, scales, qzeros when
    asymmetric)."""
    if len(spec.shape) != 2 or not spec.dtype.is_floating_point:
        raise CheckpointError(f"tensor {spec.name!r} is {spec.dtype} {spec.shape}, not a 2-D float linear weight")
    n, k = spec.shape
    return [tuple(stored) for stored in stored_tensors(n, k, config.bits, config.group_size, config.sym, spec.dtype)]


def output_specs(
    source: list[TensorSpec],
    targets: dict[str, str],
    config: QuantConfig,
    fmt: str = "llmquant",
    skeleton: Skeleton | None = None,
) -> list[TensorSpec]:
    """What the quantized checkpoint holds: each target weight becomes the buffers of its
    QuantLinear (qweight, scales in the weight's dtype and, asymmetric, qzeros), or for another
    `fmt` that format's tensors (llmquant/formats/); each experts tensor of `skeleton` becomes
    its experts' packed tensors (llmquant/formats/experts.py); every other tensor is copied. A
    layer the format cannot express is refused here, before anything is written."""
    from ..formats import get_format
    from ..formats.experts import expert_specs

    layout = get_format(fmt)
    experts = skeleton.experts if skeleton is not None else {}
    specs = []
    for spec in source:
        if spec.name in experts:
            rows = expert_rows(skeleton, spec.name, fmt)
            specs += expert_specs(layout, spec.name, spec.shape, rows, spec.dtype, config)
            continue
        if spec.name not in targets:
            specs.append(spec)
            continue
        module = targets[spec.name]
        if fmt == "llmquant":
            buffers = quantized_buffers(spec, config)
            specs += [TensorSpec(f"{module}.{key}", dtype, shape) for key, dtype, shape in buffers]
            continue
        if len(spec.shape) != 2 or not spec.dtype.is_floating_point:
            raise CheckpointError(f"tensor {spec.name!r} is {spec.dtype} {spec.shape}, not a 2-D float linear weight")
        layout.check_layer(module, *spec.shape, config)
        specs += layout.layer_specs(module, *spec.shape, spec.dtype, config)
    return specs


def expert_rows(skeleton: Skeleton, name: str, fmt: str) -> list | None:
    """The per-expert checkpoint tensors an export in `fmt` writes for the experts tensor `name`
    (None for llmquant's stacked layout), as transformers' reverse conversion names them."""
    from .conversion import per_expert_rows

    if fmt == "llmquant":
        return None
    return per_expert_rows(skeleton.model, name, skeleton.experts[name])
