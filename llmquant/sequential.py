"""Calibrated quantization of a model, one decoder block at a time.

1. The calibration tokens run through the model up to the first decoder block; its inputs
   (hidden states [S, T, D] and the keyword arguments: position embeddings, masks) are kept.
2. For each block: the block moves to the compute device (CUDA when available, else CPU), the
   float block output of a few samples is computed for the error report, then one forward pass
   of all samples runs with a pre-hook on each quantized linear. The hook sees the linear's
   actual input X (produced by the already quantized linears before it in the block: sequential
   quantization), forms H = 2 X^T X / n, runs the method, and replaces the weight by its
   dequantized value before the linear computes. The block's output is the next block's input.
   The block goes back to its original device.

Only one block's weights and activations are on the compute device at a time. Returns
{module name: QuantizedWeight}; the caller builds QuantLinear layers or writes packed tensors.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .convert import linear_layers
from .methods import awq, get_method
from .methods.grid import dequantize
from .quantize import QuantizedWeight

ERROR_SAMPLES = 4  # samples whose float block output is recomputed for the progress bar
HESSIAN_PANEL = 192  # columns per panel of the Hessian's upper triangle


def input_hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n: [K, K] float32 of a linear's inputs x: [n, K] float32.

    H is symmetric: only the panels on and above the diagonal are multiplied (about 60% of the
    full product's FLOPs for K = 1536) and mirrored. Each entry is a float32 dot product over all
    n rows, as in the full x.t() @ x (bit-identical to it with the CPU BLAS measured).
    """
    n, k = x.shape
    h = torch.empty(k, k, dtype=x.dtype, device=x.device)
    for begin in range(0, k, HESSIAN_PANEL):
        end = min(begin + HESSIAN_PANEL, k)
        h[begin:end, begin:] = x[:, begin:end].t() @ x[:, begin:]
        h[end:, begin:end] = h[begin:end, end:].t()
    return h.mul_(2.0 / n)


class _Stop(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's decoder blocks: the longest ModuleList."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no decoder blocks (nn.ModuleList) found to calibrate")
    return max(lists, key=lambda item: len(item[1]))


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    return value


def _rows(value, count: int, total: int):
    """The first `count` samples of a batched tensor (dim 0 == total), recursively; others as is."""
    if isinstance(value, torch.Tensor):
        return value[:count] if value.dim() > 0 and value.shape[0] == total and total > 1 else value
    if isinstance(value, tuple | list):
        return type(value)(_rows(v, count, total) for v in value)
    return value


def _block_inputs(model: nn.Module, block: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hidden states entering `block` for tokens [S, T] and its keyword arguments."""
    captured = {}

    def hook(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        device = next(model.parameters()).device
        model(input_ids=tokens.to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise ValueError("the model never called its first decoder block; cannot calibrate it")
    kwargs = captured["kwargs"]
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return captured["hidden"], kwargs


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1


def _norm_inputs(block: nn.Module, linears: dict, hidden: torch.Tensor, kwargs: dict) -> dict:
    """{linear: (norm, [linears reading that norm's output])} for linears whose input is exactly
    a norm's output, found by one forward pass of one sample."""
    outputs, readers, handles = {}, {}, []
    for module in block.modules():
        if _is_norm(module):
            handles.append(module.register_forward_hook(lambda m, a, out: outputs.__setitem__(id(out), (m, out))))
    for module in linears:
        handles.append(
            module.register_forward_pre_hook(lambda m, a: readers.__setitem__(m, outputs.get(id(a[0]), (None,))[0]))
        )
    try:
        block(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: dict = {}
    for linear, norm in readers.items():
        if norm is not None:
            groups.setdefault(norm, []).append(linear)
    return {linear: (norm, groups[norm]) for linear, norm in readers.items() if norm is not None}


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple | list) else result


@torch.no_grad()
def quantize_blocks(
    model: nn.Module,
    config: QuantConfig,
    tokens: torch.Tensor,
    device: torch.device | None = None,
    progress: bool = True,
    scale_dtype: torch.dtype | None = None,
    changed: dict[str, torch.Tensor] | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize every selected linear of `model` with config.method on calibration tokens [S, T].

    The linears' weights are replaced in place by their dequantized values (the model stays
    made of nn.Linear); returns {module name: QuantizedWeight} with scales in scale_dtype
    (default: each weight's dtype; a checkpoint writer passes the source dtype). Methods with
    channel scaling (awq) also change norm weights in place; `changed` then receives
    {parameter name: new value} for the writer.
    """
    method = get_method(config.method)
    device = device or compute_device()
    targets = dict(linear_layers(model, config))
    prefix, blocks = decoder_blocks(model)
    outside = [n for n in targets if not n.startswith(prefix + ".")]
    if outside:
        raise ValueError(f"{outside[0]!r} is outside the decoder blocks; calibrated methods quantize blocks only")
    hidden, kwargs = _block_inputs(model, blocks[0], tokens)
    results: dict[str, QuantizedWeight] = {}
    unscaled: set[str] = set()
    bar = tqdm(total=len(blocks), desc=f"{config.method}", unit="block", disable=not progress)
    for index, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(device)
        hidden = hidden.to(device)
        kw = _to(kwargs, device)
        total = hidden.shape[0]
        few = min(ERROR_SAMPLES, total)
        reference = _output(block(hidden[:few], **_rows(kw, few, total)))
        names = {module: name for name, module in block.named_modules() if f"{prefix}.{index}.{name}" in targets}
        cache: dict = {}
        norms = _norm_inputs(block, names, hidden[:1], _rows(kw, 1, total)) if method.scaling else {}
        if method.scaling:
            unscaled.update(name for module, name in names.items() if module not in norms)

        def hook(module, args, names=names, cache=cache, index=index, norms=norms, block=block):
            x = args[0]
            if cache.get("x") is not x:  # q/k/v (gate/up) share one input tensor: one Hessian
                flat = x.reshape(-1, x.shape[-1]).float()
                cache["x"], cache["h"], cache["x_in"] = x, input_hessian(flat), x
                if module in norms:  # fold channel scales into the norm and every linear reading it
                    norm, readers = norms[module]
                    s = awq.search_scales(
                        [m.weight for m in readers],
                        cache["h"].diagonal(),
                        flat.abs().mean(0),
                        config.bits,
                        config.group_size,
                        config.sym,
                    )
                    norm.weight.data.div_(s.to(norm.weight.dtype))
                    if getattr(norm, "bias", None) is not None:
                        norm.bias.data.div_(s.to(norm.bias.dtype))
                    for reader in readers:
                        reader.weight.data.mul_(s.to(reader.weight.dtype))
                    cache["x_in"] = (x / s).to(x.dtype)
                    cache["h"] = cache["h"] / s.unsqueeze(0) / s.unsqueeze(1)
                    if changed is not None:
                        norm_name = next(n for n, m in block.named_modules() if m is norm)
                        for key, value in norm.named_parameters():
                            changed[f"{prefix}.{index}.{norm_name}.{key}"] = value.detach().to("cpu", copy=True)
            full = f"{prefix}.{index}.{names[module]}"
            weight = module.weight
            q = method.quantize(
                weight.detach(),
                cache["h"],
                config.bits,
                config.group_size,
                config.sym,
                scale_dtype or weight.dtype,
                f"{full}.weight",
            )
            results[full] = q
            # later linears of the block see this one's quantized output
            weight.data.copy_(dequantize(q, config.bits, config.group_size).to(weight.dtype))
            if cache["x_in"] is not x:
                return (cache["x_in"], *args[1:])
            return None

        handles = [m.register_forward_pre_hook(hook) for m in names]
        try:
            hidden = _output(block(hidden, **kw))
        finally:
            for h in handles:
                h.remove()
        error = ((hidden[:few] - reference).pow(2).sum() / reference.pow(2).sum().clamp(min=1e-30)).item()
        block.to(home)
        bar.set_postfix_str(f"block {index} rel. output error {error:.2e}")
        bar.update(1)
        del reference, cache
    bar.close()
    if unscaled:
        warnings.warn(
            f"{config.method}: no channel scaling for {', '.join(sorted(unscaled))} in every block: their inputs "
            "do not come from a norm (folding into the previous linear is not implemented); quantized unscaled",
            stacklevel=3,
        )
    missing = sorted(set(targets) - set(results))
    if missing:
        raise ValueError(f"{missing[0]!r} was never called during calibration; cannot quantize it")
    return results


def _calibration_tokens(calibration) -> tuple[torch.Tensor, dict]:
    from .calibration import CalibrationSet

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

    Records the resolved config (with `calibration`: dataset, samples, tokens, seed) in
    model.config.quantization_config so that save_pretrained writes a loadable folder.
    """
    from .convert import _set_module, modules_to_skip
    from .linear import QuantLinear
    from .quantize import pack

    tokens, info = _calibration_tokens(calibration)
    was_training = model.training
    model.eval()
    results = quantize_blocks(model, config, tokens, progress=progress)
    model.train(was_training)
    for name, linear in linear_layers(model, config):
        module = QuantLinear.from_packed(
            linear, pack(results[name], config.bits), config.bits, config.group_size, config.sym
        )
        _set_module(model, name, module)
    resolved = QuantConfig(
        **{**config.to_dict(), "modules_to_not_convert": modules_to_skip(model, config), "calibration": info}
    )
    if hasattr(model, "config"):
        model.config.quantization_config = resolved
    return model
