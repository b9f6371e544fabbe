"""Calibrated quantization of a model, one decoder block at a time.

1. The calibration tokens run through the model up to the first decoder block; its inputs
   (hidden states [S, T, D] and the keyword arguments: position embeddings, masks) are kept
   (`capture.py`).
2. For each block: the block comes from a `BlockStore` (`stores.py`) on the compute device (CUDA
   when available, else CPU), the float block output of a few samples is computed for the error
   report, then one forward pass of all samples runs with a pre-hook on each quantized linear.
   The hook sees the linear's actual input X (produced by the already quantized linears before
   it in the block: sequential quantization), forms H = 2 X^T X / n (`hessian.py`), runs the
   quantizer, and replaces the weight by its dequantized value before the linear computes. The
   block's output is the next block's input. The copy is dropped.

The loop knows no method: a method is a preset (`llmquant.methods.presets`) of transforms and a
quantizer. Each transform's hooks (`llmquant.methods.transform`) run at fixed points: before the
first block (rotations rotate the embedding, head and stream), on each float block before and
after its reference output is taken (rotations; AWQ scaling, gptaq's float stream), on each
linear input and weight (gptaq's target), after each block and at the end.

Only one block's weights and activations are on the compute device at a time. Returns {module
name: QuantizedWeight} and (for transforms) the new values of the float tensors they changed;
the caller commits them: builds QuantLinear layers (`commit.py`) or writes packed tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import QuantConfig
from ..methods.blocks import ERROR_SAMPLES, output, rows, run_hooked
from ..methods.codes import QuantizedWeight
from ..methods.compose import resolve
from ..methods.grid import dequantize
from ..nn import families, linears
from ..nn.experts import PROJECTIONS
from ..nn.surgery import expert_layers, linear_layers
from ..progress import progress_bar
from .capture import blocks_inputs, decoder_blocks
from .experts import experts_calibration
from .hessian import input_hessian
from .stores import BlockStore, ResidentBlocks, compute_device, to_device


@dataclass
class Run:
    """One calibrated quantization of a model, as the transforms' model-wide hooks see it.

    hidden: [S, T, D] the first block's input, then the stream between blocks; changed: {parameter
    name: new value (CPU)} of float tensors transforms rewrite; hessian: x [n, K] -> H [K, K]."""

    model: nn.Module
    prefix: str
    blocks: nn.ModuleList
    config: QuantConfig
    targets: dict
    changed: dict[str, torch.Tensor] | None
    scale_dtype: torch.dtype | None
    device: torch.device
    hidden: torch.Tensor
    hessian: Callable[[torch.Tensor], torch.Tensor] = input_hessian


@dataclass
class BlockRun:
    """One decoder block being quantized: `block` is the working copy from the store, `names`
    {its linears to quantize: block-relative name}, `reference` its float output on the first
    samples (set once before_block hooks ran)."""

    index: int
    name: str
    block: nn.Module
    names: dict
    hidden: torch.Tensor
    kwargs: dict
    reference: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)


@torch.no_grad()
def quantize_blocks(
    model: nn.Module,
    config: QuantConfig,
    tokens: torch.Tensor,
    device: torch.device | None = None,
    progress: bool = True,
    scale_dtype: torch.dtype | None = None,
    changed: dict[str, torch.Tensor] | None = None,
    store: BlockStore | None = None,
    keep: Callable[[QuantizedWeight], object] | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize every selected linear of `model` with config.method on calibration tokens [S, T].

    Returns {module name: QuantizedWeight} (for an experts module, {"<module>.<projection>": one
    per expert}, llmquant/nn/experts.py) with scales in scale_dtype (default: each weight's
    dtype; a checkpoint writer passes the source dtype), each passed through `keep` when given
    (e.g. packing, to hold less). Methods with transforms (awq, gptq-rot) change float tensors:
    `changed` receives {parameter name: new value (CPU)}. store: where the blocks' weights come
    from (default ResidentBlocks: the model is not modified; apply the results and `changed`).
    """
    recipe = resolve(config.method)
    device = device or compute_device()
    targets = dict(linear_layers(model, config))
    experts = dict(expert_layers(model, config))
    prefix, blocks = decoder_blocks(model)
    outside = [n for n in [*targets, *experts] if not n.startswith(prefix + ".")]
    if outside:
        raise ValueError(f"{outside[0]!r} is outside the decoder blocks; calibrated methods quantize blocks only")
    store = store or ResidentBlocks()
    if changed is None and any(t.changes_float_tensors for t in recipe.transforms):
        raise ValueError(f"{config.method} changes float tensors: pass `changed` to receive them")
    families.check_method(model, config.method)  # refused before any work
    with store.embeddings(model):
        hidden, block_kwargs = blocks_inputs(model, blocks, tokens)
        run = Run(model, prefix, blocks, config, targets, changed, scale_dtype, device, hidden)
        for transform in recipe.transforms:
            transform.before_model(run)
    results: dict[str, QuantizedWeight] = {}
    bar = progress_bar(total=len(blocks), enabled=progress, desc=f"{config.method}", unit="block")
    for index, live in enumerate(blocks):
        work = store.load(index, live, device)
        name = f"{prefix}.{index}"
        names = {module: n for n, module in work.named_modules() if f"{name}.{n}" in targets}
        block = BlockRun(index, name, work, names, run.hidden.to(device), to_device(block_kwargs[index], device))
        error = _quantize_block(run, block, recipe.quantize, recipe.transforms, experts, results, keep)
        store.release(index, live, work)
        bar.set_postfix_str(f"block {index} rel. output error {error:.2e}")
        bar.update(1)
        del block, work, names  # free this block before the next
    bar.close()
    for transform in recipe.transforms:
        transform.after_model(run)
    missing = sorted(set(targets) - set(results))
    missing += sorted(f"{n}.{p}" for n in experts for p in PROJECTIONS if f"{n}.{p}" not in results)
    if missing:
        raise ValueError(f"{missing[0]!r} was never called during calibration; cannot quantize it")
    return results


def _quantize_block(
    run: Run,
    block: BlockRun,
    quantize: Callable,
    transforms: tuple,
    experts: dict,
    results: dict,
    keep: Callable | None,
) -> float:
    """Quantize one block in place (its linears and experts modules), with the transforms' block
    hooks around it; run.hidden becomes its output. Returns the relative output error on the
    first samples."""
    config, scale_dtype, cache = run.config, run.scale_dtype, block.cache
    total = block.hidden.shape[0]
    few = min(ERROR_SAMPLES, total)
    for transform in transforms:
        transform.before_block(run, block)
    block.reference = output(block.block(block.hidden[:few], **rows(block.kwargs, few, total)))
    for transform in transforms:
        transform.before_quantize(run, block)

    def quantize_one(weight: torch.Tensor, h: torch.Tensor, name: str, dtype: torch.dtype) -> QuantizedWeight:
        return quantize(weight, h, config.bits, config.group_size, config.sym, scale_dtype or dtype, name)

    def hook(module, args):
        x = args[0]
        if cache.get("x") is not x:  # q/k/v (gate/up) share one input tensor: one Hessian
            flat = x.reshape(-1, x.shape[-1]).float()
            cache["x"], cache["h"] = x, run.hessian(flat)
            for transform in transforms:
                transform.on_input(module, flat, cache["h"])
        full = f"{block.name}.{block.names[module]}"
        weight = linears.linear_weight(module)  # [N, K]; GPT-2's Conv1D stores it transposed
        source = weight.detach()
        for transform in transforms:
            source = transform.target(source)
        q = quantize_one(source, cache["h"], f"{full}.weight", weight.dtype)
        results[full] = q if keep is None else keep(q)
        # later linears of the block see this one's quantized output
        weight.data.copy_(dequantize(q, config.bits, config.group_size).to(weight.dtype))

    def quantize_expert(name: str, weight: torch.Tensor, h: torch.Tensor) -> tuple[object, torch.Tensor]:
        q = quantize_one(weight, h, name, weight.dtype)
        return (q if keep is None else keep(q)), dequantize(q, config.bits, config.group_size)

    block_experts = {m: f"{block.name}.{n}" for n, m in block.block.named_modules() if f"{block.name}.{n}" in experts}
    with experts_calibration(block_experts, quantize_expert, run.hessian, results):
        run.hidden = run_hooked(block.block, block.names, hook, block.hidden, block.kwargs)
    reference = block.reference
    error = ((run.hidden[:few] - reference).pow(2).sum() / reference.pow(2).sum().clamp(min=1e-30)).item()
    for transform in transforms:
        transform.after_block(run, block)
    block.reference, block.cache = None, {}
    return error
