"""What llmquant needs to know per decoder family, in one place instead of flags in the block loop.

- Which families a rotation of the residual stream (gptq-rot, methods/rotation.py) cannot be
  folded into, and why: refused with that reason before any calibration work
  (`check_method`). The block check of methods/rotation.py (rotated block output equals the
  float block output rotated) stays as the safety net for what this table does not know.
"""

from __future__ import annotations

from torch import nn

LAYERNORM = (
    "LayerNorm subtracts each token's mean, which does not commute with a rotation of the residual stream"
)
POST_NORMS = (
    "its norms after each sublayer (before the residual add) scale channels one by one, which does not commute "
    "with a rotation of the residual stream"
)

# model_type -> why gptq-rot cannot rotate it. A family whose norms are LayerNorms is also found
# by its module types (`_layernorm`), so this table lists what module types do not show.
NOT_ROTATABLE: dict[str, str] = {
    "gemma2": POST_NORMS,  # post_attention_layernorm / post_feedforward_layernorm on the sublayer outputs
    "gemma3_text": POST_NORMS,
    "gemma3": POST_NORMS,
    "olmo2": POST_NORMS,  # post_attention_layernorm / post_feedforward_layernorm, no pre-norms
    "olmo3": POST_NORMS,
    "gpt2": LAYERNORM,
    "opt": LAYERNORM,
    "gpt_neox": LAYERNORM,
}


def family(model: nn.Module) -> str:
    """The model's family name: config.model_type (the class name when there is no config)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    return getattr(text, "model_type", None) or getattr(config, "model_type", None) or type(model).__name__


def _layernorm(model: nn.Module) -> str | None:
    """The name of a LayerNorm module of the model (mean-subtracting), or None."""
    for name, module in model.named_modules():
        kind = type(module).__name__.lower()
        if isinstance(module, nn.LayerNorm) or ("layernorm" in kind and "rms" not in kind):
            return name
    return None


def rotation_refusal(model: nn.Module) -> str | None:
    """Why the residual stream of `model` (a meta skeleton is enough) cannot be rotated, or None."""
    name = family(model)
    if name in NOT_ROTATABLE:
        return NOT_ROTATABLE[name]
    found = _layernorm(model)
    if found is not None:
        return f"{LAYERNORM} ({found})"
    return None


def check_method(model: nn.Module, method: str) -> None:
    """ValueError (one line, naming the family and the reason) when `method` cannot run on this
    model's family; called before any calibration work."""
    from ..methods.presets import get_preset
    from .experts import is_experts

    chosen = get_preset(method)
    experts = [name for name, module in model.named_modules() if is_experts(module)]
    if experts and chosen.transforms:  # the transforms act on nn.Linear layers only
        raise ValueError(
            f"{family(model)}: --method {method} cannot handle this family: its Mixture-of-Experts layers "
            f"({experts[0]}) are quantized by gptq, gptq-noclip, clip or rtn only"
        )
    if chosen.rotation:
        reason = rotation_refusal(model)
        if reason is not None:
            raise ValueError(f"{family(model)}: --method {method} cannot rotate this family: {reason}; use gptq")
