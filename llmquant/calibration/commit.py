"""`quantize_` of a model in memory with a calibrated method: the block loop's results
committed into the model (QuantLinear / QuantExperts swapped in, changed float tensors copied)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import QuantConfig
from ..methods.blocks import module_name
from ..methods.codes import pack
from ..nn.experts import PROJECTIONS, QuantExperts
from ..nn.linear import QuantLinear
from ..nn.surgery import expert_layers, linear_layers, modules_to_skip, set_module
from .data import CalibrationSet, check_seqlen
from .loop import quantize_blocks


def _head_to_untie(model: nn.Module, changed: dict[str, torch.Tensor]) -> str | None:
    """The head's module name when `changed` gives it a new value while it shares the embedding's tensor."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return None
    name = module_name(model, head)
    return name if f"{name}.weight" in changed else None


def _calibration_tokens(calibration) -> tuple[torch.Tensor, dict]:
    if isinstance(calibration, CalibrationSet):
        return calibration.tokens, calibration.describe()
    if isinstance(calibration, torch.Tensor) and calibration.dim() == 2 and not calibration.is_floating_point():
        samples, seqlen = calibration.shape
        info = {"dataset": "token ids given by the caller", "nsamples": samples, "seqlen": seqlen}
        return calibration.long(), info | {"tokens": samples * seqlen}
    raise ValueError(
        "calibrated methods need calibration=llmquant.load_calibration(tokenizer, ...) or token ids [S, T]; "
        f"got {type(calibration).__name__}"
    )


@torch.no_grad()
def quantize_calibrated_(model: nn.Module, config: QuantConfig, calibration, progress: bool = True) -> nn.Module:
    """`quantize_` for calibrated methods: quantize block by block, then swap in QuantLinear.

    All or nothing: quantize_blocks works on a copy of each block, and the model changes only
    in the commit at the end (new norm values copied in, QuantLinear swapped in), after every
    new module and tensor is built; an error or an interrupt before that leaves it as it was.
    Records the resolved config (with `calibration`: dataset, samples, tokens, seed) in
    model.config.quantization_config so that save_pretrained writes a loadable folder.
    """
    tokens, info = _calibration_tokens(calibration)
    if hasattr(model, "config"):
        check_seqlen(tokens.shape[1], model.config)  # before any block runs
    was_training = model.training
    changed: dict[str, torch.Tensor] = {}
    try:
        model.eval()
        results = quantize_blocks(model, config, tokens, progress=progress, changed=changed)
    finally:
        model.train(was_training)
    bits, group_size, sym = config.bits, config.group_size, config.sym
    modules = {
        name: QuantLinear.from_packed(linear, pack(results[name], bits), bits, group_size, sym)
        for name, linear in linear_layers(model, config)
    }
    for name, experts in expert_layers(model, config):
        module = QuantExperts.like(experts, bits, group_size, sym)
        for proj in PROJECTIONS:
            for expert, quantized in enumerate(results[f"{name}.{proj}"]):
                module.load_packed(proj, expert, pack(quantized, bits))
        modules[name] = module
    targets = []  # (tensor to overwrite, new value): a swapped linear's tensor is its QuantLinear's
    untie = _head_to_untie(model, changed)
    for key, value in changed.items():
        owner, _, attr = key.rpartition(".")
        if owner in modules:
            if attr == "weight":
                continue  # already in the packed weight
            targets.append((getattr(modules[owner], attr), value))
        elif owner != untie:
            targets.append((model.get_submodule(owner).get_parameter(attr), value))
    resolved = QuantConfig(
        **{**config.to_dict(), "modules_to_not_convert": modules_to_skip(model, config), "calibration": info}
    )
    # commit: nothing above changed the model
    if untie is not None:  # the head gets its own tensor before the embedding it shared changes
        head = model.get_submodule(untie)
        head.weight = nn.Parameter(changed[f"{untie}.weight"].to(head.weight), head.weight.requires_grad)
        model.config.get_text_config().tie_word_embeddings = False
    for tensor, value in targets:
        tensor.data.copy_(value)
    for name, module in modules.items():
        set_module(model, name, module)
    if hasattr(model, "config"):
        model.config.quantization_config = resolved
    return model
