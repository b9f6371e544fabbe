"""Calibrated quantization of a model, one decoder block at a time.

1. The calibration tokens run through the model up to the first decoder block; its inputs
   (hidden states [S, T, D] and the keyword arguments: position embeddings, masks) are kept.
2. For each block: the block moves to the compute device (CUDA when available, else CPU), the
   float block output of a few samples is computed for the error report, then one forward pass
   of all samples runs with a pre-hook on each quantized linear. The hook sees the linear's
   actual input X (produced by the already quantized linears before it in the block: sequential
   quantization), forms H = 2 X^T X / n, runs the method, and replaces the weight by its
   dequantized value before the linear computes. The block's output is the next block's input.
   The copy is dropped.

   Methods with channel scaling (awq, gptq-awq) first search and fold every scale of the block
   on one float forward pass (`_scale_block`, design in `llmquant.methods.awq`), then quantize
   as above.

   Methods with a rotation (gptq-rot) rotate the residual stream by an orthogonal Q: the
   embedding, the final norm and the head are rotated once (`_rotate_outside`), the captured
   hidden states are multiplied by Q, and each block's norms are folded and its linears rotated
   when it is loaded (`_rotate_block`, design in `llmquant.methods.rotation`).

   Methods with a float target (gptaq) also carry the float model's hidden states: each block
   first runs on them unquantized, which gives every linear's float input X_fp and the next
   block's float hidden states; each linear is then quantized toward W* (`methods/gptaq.py`).

Where a block's weights come from is a `BlockStore`: by default (`ResidentBlocks`) each block of
an in-memory model is copied to the compute device and the copy is quantized, so the model
itself is never written and a failure midway leaves it as it was; the checkpoint writer instead
reads each block of a weightless (meta) skeleton from the source files and frees it after
(llmquant/calibrated_checkpoint.py). Only one block's weights and activations are on the
compute device at a time. Returns {module name: QuantizedWeight} and (for awq scaling and
rotations) the new values of the float tensors the method changed; the caller commits them:
builds QuantLinear layers or writes packed tensors.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import nn

from ..config import QuantConfig
from ..methods import awq, get_method, gptaq, rotation
from ..methods.codes import QuantizedWeight
from ..methods.grid import dequantize
from ..nn import families
from ..nn.experts import PROJECTIONS, experts_calibration
from ..nn.surgery import expert_layers, linear_layers
from ..progress import progress_bar

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


FOLD_TOLERANCE = 1e-3  # relative change of the float block output that AWQ folding may cause
FOLD_TOLERANCE_16BIT = 2e-2  # the same for rotations of 16-bit weights (rounded after rotating)


def _rotation_tolerance(dtype: torch.dtype) -> float:
    return FOLD_TOLERANCE if dtype.itemsize >= 4 else FOLD_TOLERANCE_16BIT


def _relative_change(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||."""
    return ((got - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def module_name(model: nn.Module, module: nn.Module) -> str | None:
    """The qualified name of `module` inside `model` (None if it is not there)."""
    return next((name for name, m in model.named_modules() if m is module), None)


def _record_changed(
    block: nn.Module, block_name: str, touched: list[nn.Module], targets: dict, changed: dict[str, torch.Tensor]
) -> None:
    """Copy into `changed` (CPU) every parameter of the `touched` modules of a block, except the
    weights of quantized linears (those are written packed)."""
    names = {m: n for n, m in block.named_modules()}
    for module in dict.fromkeys(touched):
        name = f"{block_name}.{names[module]}"
        for key, value in module.named_parameters(recurse=False):
            if not (key == "weight" and name in targets):
                changed[f"{name}.{key}"] = value.detach().to("cpu", copy=True)


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


class BlockStore(Protocol):
    """Where quantize_blocks gets each decoder block's weights from, and what it does after."""

    def embeddings(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """While entered, the model can run from its input ids up to its first block."""
        ...

    def load(self, index: int, block: nn.Module, device: torch.device) -> nn.Module:
        """Block `index` with its weights on `device`: the block to run and quantize (it is changed)."""
        ...

    def release(self, index: int, block: nn.Module, work: nn.Module) -> None:
        """Block `index` is done; `work` is what `load` returned."""
        ...


def copy_to(module: nn.Module, device: torch.device) -> nn.Module:
    """A deep copy of `module` whose parameters and buffers are on `device` (copied straight
    there, never first a second copy where they are)."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        moved = tensor.detach().to(device, copy=True)
        memo[id(tensor)] = nn.Parameter(moved, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else moved
    return copy.deepcopy(module, memo)


class ResidentBlocks:
    """The blocks of an in-memory model: each is quantized as a copy on the compute device, so the
    model is untouched until the caller commits the results (all or nothing). Costs one block's
    weights on the compute device, which moving the block there would cost too."""

    @contextlib.contextmanager
    def embeddings(self, model: nn.Module) -> Iterator[None]:
        yield

    def load(self, index: int, block: nn.Module, device: torch.device) -> nn.Module:
        return copy_to(block, device)

    def release(self, index: int, block: nn.Module, work: nn.Module) -> None:
        pass


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):  # the keyword arguments themselves
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _rows(value, count: int, total: int):
    """The first `count` samples of a batched tensor (dim 0 == total), recursively through
    tuples, lists and dicts (the block's keyword arguments: an eager attention mask is [S, 1, T, T]);
    others as is."""
    if isinstance(value, torch.Tensor):
        return value[:count] if value.dim() > 0 and value.shape[0] == total and total > 1 else value
    if isinstance(value, tuple | list):
        return type(value)(_rows(v, count, total) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, count, total) for k, v in value.items()}
    return value


def _blocks_inputs(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Hidden states entering the first block for tokens [S, T], and every block's keyword
    arguments: they differ between blocks in families that mix attention types (Gemma-2/3:
    sliding-window and global masks, Gemma-3: local and global rotary embeddings per layer).

    One pass of the model with each block's forward replaced by a recorder that returns its input
    unchanged, so no block computes (a streamed skeleton's blocks are on the meta device); the
    pass stops after the last block."""
    captured: dict = {"kwargs": []}

    def recorder(*args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.setdefault("hidden", hidden)
        captured["kwargs"].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        if len(captured["kwargs"]) == len(blocks):
            raise _Stop
        return hidden

    for block in blocks:
        block.forward = recorder  # an instance attribute: nn.Module.__call__ runs it, hooks included
    try:  # a streamed skeleton holds only what runs before the first block: the rest is on meta
        device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
        model(input_ids=tokens.to(device), use_cache=False)
    except _Stop:
        pass
    finally:
        for block in blocks:
            del block.forward
    if len(captured["kwargs"]) != len(blocks):
        raise ValueError(
            f"the model called {len(captured['kwargs'])} of its {len(blocks)} decoder blocks; cannot calibrate it"
        )
    for kwargs in captured["kwargs"]:
        kwargs["use_cache"] = False
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
    return captured["hidden"], captured["kwargs"]


def _block_inputs(model: nn.Module, block: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hidden states entering `block` (the first decoder block) for tokens [S, T] and its keyword arguments."""
    _, blocks = decoder_blocks(model)
    hidden, kwargs = _blocks_inputs(model, blocks, tokens)
    return hidden, kwargs[0]


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1


def _norm_inputs(block: nn.Module, linears: list | dict, hidden: torch.Tensor, kwargs: dict) -> dict:
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


def _input_stats(block: nn.Module, modules: list[nn.Module], hidden: torch.Tensor, kwargs: dict) -> dict:
    """{linear: (mean |x|: [K], H = 2 X^T X / n: [K, K]) float32} of the float block's inputs to
    `modules`, from one forward pass of all samples (linears sharing an input share the stats)."""
    stats, last = {}, {}

    def hook(module, args):
        x = args[0]
        if last.get("x") is not x:
            flat = x.reshape(-1, x.shape[-1]).float()
            last["x"], last["stats"] = x, (flat.abs().mean(0), input_hessian(flat))
        stats[module] = last["stats"]

    _run_hooked(block, modules, hook, hidden, kwargs)
    return stats


def _run_hooked(block: nn.Module, modules, hook: Callable, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The block's output on `hidden`, with `hook` a forward pre-hook of each of `modules` for this pass only."""
    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        return _output(block(hidden, **kwargs))
    finally:
        for h in handles:
            h.remove()


def _float_inputs(block: nn.Module, modules: dict, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """(output, {linear: its input [n, K] float32}) of one pass of the float block on `hidden`
    (linears sharing an input share the tensor)."""
    inputs = {}

    def hook(module, args):
        x = args[0]
        inputs[module] = x.reshape(-1, x.shape[-1]).float()

    return _run_hooked(block, modules, hook, hidden, kwargs), inputs


def _linear_producers(block: nn.Module, names: dict) -> dict:
    """{consumer linear: (previous linear, [K] long index of the previous output row feeding each
    consumer input channel) or a reason string} for o_proj/down_proj-like linears (awq.PREVIOUS)."""
    found = {}
    for module, name in names.items():
        leaf = name.rpartition(".")[2]
        if leaf not in awq.PREVIOUS:
            continue
        previous_name, required = awq.PREVIOUS[leaf]
        parent_name = name.rpartition(".")[0]
        parent = block.get_submodule(parent_name) if parent_name else block
        previous = getattr(parent, previous_name, None)
        gated = required is None or isinstance(getattr(parent, required, None), nn.Linear)
        if not isinstance(previous, nn.Linear) or not gated:
            found[module] = f"no {previous_name} beside it"
            continue
        head_dim = getattr(parent, "head_dim", None) if leaf == "o_proj" else None
        if leaf == "o_proj":
            expand = awq.kv_channel_map(module.in_features, previous.out_features, head_dim)
        else:
            expand = torch.arange(module.in_features) if module.in_features == previous.out_features else None
        if expand is None:
            found[module] = (
                f"{previous_name} has {previous.out_features} output rows, {leaf} {module.in_features} inputs"
            )
            continue
        found[module] = (previous, expand)
    return found


def _scale_block(
    block: nn.Module,
    block_name: str,
    names: dict,
    hidden: torch.Tensor,
    kwargs: dict,
    config: QuantConfig,
    targets: dict,
    changed: dict | None,
    reference: torch.Tensor,
) -> list[str]:
    """AWQ scaling of one float block before it is quantized (design: methods/awq.py docstring).

    Searches every scale on one float forward pass, folds them into norms and preceding linears,
    checks that the float output of the first samples is unchanged (reverting the block and
    scaling nothing otherwise) and records folded tensors that the packed results do not carry
    in `changed`. Returns the block-relative names of the linears left unscaled.
    """
    total = hidden.shape[0]
    # every linear reading a norm is scaled with it, quantized or not (a float one is then written as changed)
    every_linear = [m for m in block.modules() if isinstance(m, nn.Linear)]
    norms = _norm_inputs(block, every_linear, hidden[:1], _rows(kwargs, 1, total))
    producers = _linear_producers(block, names)
    skipped = [
        names[m] if m not in producers else f"{names[m]} [{producers[m]}]"
        for m in names
        if m not in norms and not isinstance(producers.get(m), tuple)
    ]
    stats = _input_stats(block, [m for m in names if m in norms or isinstance(producers.get(m), tuple)], hidden, kwargs)
    touched = []  # modules whose parameters the folds change
    plans = []  # (fold function, arguments) applied after every search
    done = set()
    for module in names:
        if module in norms and module not in done:
            norm, readers = norms[module]
            absmean, h = stats[module]
            quantized = [m.weight for m in readers if m in names]
            s = awq.search_scales(quantized, h, absmean, config.bits, config.group_size, config.sym)
            plans.append((awq.fold_into_norm, (norm, readers, s)))
            touched += [norm, *readers]
            done.update(readers)
        elif isinstance(producers.get(module), tuple):
            previous, expand = producers[module]
            absmean, h = stats[module]
            expand = expand.to(absmean.device)
            # one scale per previous output row: the mean of |x| over the input channels it feeds
            free = torch.zeros(previous.out_features, device=absmean.device).index_add_(0, expand, absmean)
            free /= torch.bincount(expand, minlength=previous.out_features).to(free)
            s = awq.search_scales([module.weight], h, free, config.bits, config.group_size, config.sym, expand)
            plans.append((awq.fold_into_linear, (previous, module, s, expand)))
            touched += [previous, module]
    saved = {id(p): p.detach().clone() for m in touched for p in m.parameters(recurse=False)}
    for fold, args in plans:
        fold(*args)
    few = reference.shape[0]
    output = _output(block(hidden[:few], **_rows(kwargs, few, total)))
    drift = _relative_change(output, reference)
    if not drift < FOLD_TOLERANCE:  # an architecture the folds misread: undo, scale nothing
        for m in touched:
            for p in m.parameters(recurse=False):
                p.data.copy_(saved[id(p)])
        warnings.warn(
            f"{block_name}: channel scaling changed the float block output (relative {drift:.2e}); "
            "this block is quantized unscaled",
            stacklevel=4,
        )
        return list(names.values())
    if changed is not None:
        _record_changed(block, block_name, touched, targets, changed)
    return skipped


def _final_norm(model: nn.Module, prefix: str) -> tuple[str, nn.Module]:
    """(name, module) of the one norm outside the decoder blocks (applied before the head)."""
    found = [(n, m) for n, m in model.named_modules() if _is_norm(m) and not n.startswith(prefix + ".")]
    if len(found) != 1:
        raise ValueError(
            f"{type(model).__name__}: rotation needs exactly one norm outside the decoder blocks "
            f"(the final norm), found {len(found)}: {[n for n, _ in found]}"
        )
    return found[0]


def _rotate_outside(
    model: nn.Module,
    prefix: str,
    q: torch.Tensor,
    hidden: torch.Tensor,
    changed: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
) -> None:
    """Record in `changed` the rotated embedding, the unit final norm and the head W diag(g) Q
    (design: methods/rotation.py), in `dtype` (a writer's source dtype; default the model's).
    A tied head gets its own tensor. ValueError when the final norm is not an RMS norm (it would
    not commute with Q). hidden: [S, T, D] first block's input."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or head is None:
        raise ValueError(f"{type(model).__name__}: rotation needs an input embedding and an output head")
    norm_name, norm = _final_norm(model, prefix)
    offset = rotation.weight_offset(norm)  # Gemma's norms scale by 1 + w
    sample = rotation.rotate(hidden[:1].reshape(-1, hidden.shape[-1]), q).to(norm.weight.dtype)
    drift = rotation.norm_commutes(norm, sample, q, offset)
    if not drift < _rotation_tolerance(norm.weight.dtype):
        raise ValueError(
            f"{norm_name}: rotation needs RMS norms that commute with an orthogonal rotation; this one "
            f"changed its output by {drift:.2e} (relative)"
        )
    tied = head.weight is embed.weight or head.weight.is_meta  # a streamed tied head is never read
    head_weight = embed.weight if tied else head.weight
    rotated = {
        f"{module_name(model, embed)}.weight": rotation.rotate(embed.weight.detach(), q),
        f"{module_name(model, head)}.weight": rotation.rotated_head(
            head_weight.detach(), rotation.norm_gain(norm.weight.detach(), offset), q
        ),
        f"{norm_name}.weight": torch.full_like(norm.weight, 1 - offset),
    }
    changed.update({name: value.to("cpu", dtype or value.dtype) for name, value in rotated.items()})


def _rotate_block(
    block: nn.Module,
    block_name: str,
    q: torch.Tensor,
    hidden: torch.Tensor,
    kwargs: dict,
    targets: dict,
    changed: dict[str, torch.Tensor],
) -> None:
    """Fold the norms of one float block into the linears reading them and rotate its linears
    (design: methods/rotation.py). Checked: the block's output on the rotated stream is its float
    output rotated; ValueError naming the block otherwise. hidden: [S, T, D] rotated stream."""
    total = hidden.shape[0]
    few = min(ERROR_SAMPLES, total)
    kw = _rows(kwargs, few, total)
    width = q.shape[0]
    expected = rotation.rotate(_output(block(rotation.rotate(hidden[:few], q.t()), **kw)), q)
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    norms = _norm_inputs(block, linears, hidden[:1], _rows(kwargs, 1, total))
    # the norms on the stream (not inside attention), each once with the linears reading it
    stream_norms = {id(norm): (norm, readers) for norm, readers in norms.values() if norm.weight.numel() == width}
    for norm, readers in stream_norms.values():
        rotation.fold_norm_(norm, readers, rotation.weight_offset(norm))
    touched = [norm for norm, _ in stream_norms.values()]
    for linear in linears:
        if linear in norms and linear.in_features == width:
            rotation.rotate_inputs_(linear, q)
        elif linear not in norms and linear.out_features == width:
            rotation.rotate_outputs_(linear, q)
        else:
            continue
        touched.append(linear)
    for module in block.modules():
        values, output = getattr(module, "v_proj", None), getattr(module, "o_proj", None)
        head_dim = getattr(module, "head_dim", None)
        if isinstance(values, nn.Linear) and isinstance(output, nn.Linear) and head_dim:
            if values.out_features % head_dim == 0 and output.in_features % head_dim == 0:
                r = rotation.random_orthogonal(head_dim, rotation.SEED + 1)
                rotation.rotate_heads_(values, output, r, head_dim)
    got = _output(block(hidden[:few], **kw))
    drift = _relative_change(got, expected)
    if not drift < _rotation_tolerance(hidden.dtype):
        raise ValueError(
            f"{block_name}: rotation changed the float block output (relative {drift:.2e}); rotation needs "
            "pre-norm blocks with RMS norms whose linears read the normed stream or write to it (Llama-style)"
        )
    _record_changed(block, block_name, touched, targets, changed)


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
    per expert}, llmquant/experts.py) with scales in scale_dtype (default: each weight's
    dtype; a checkpoint writer passes the source dtype), each passed through `keep` when given
    (e.g. packing, to hold less). Methods with channel scaling (awq) change norm weights:
    `changed` receives {parameter name: new value (CPU)}. store: where the blocks' weights come
    from (default ResidentBlocks: the model is not modified; apply the results and `changed`).
    """
    method = get_method(config.method)
    device = device or compute_device()
    targets = dict(linear_layers(model, config))
    experts = dict(expert_layers(model, config))
    prefix, blocks = decoder_blocks(model)
    outside = [n for n in [*targets, *experts] if not n.startswith(prefix + ".")]
    if outside:
        raise ValueError(f"{outside[0]!r} is outside the decoder blocks; calibrated methods quantize blocks only")
    store = store or ResidentBlocks()
    q = None  # the rotation of the residual stream (methods with rotation)
    if method.rotation and changed is None:
        raise ValueError(f"{config.method} changes float tensors: pass `changed` to receive them")
    families.check_method(model, config.method)  # refused before any work
    with store.embeddings(model):
        hidden, block_kwargs = _blocks_inputs(model, blocks, tokens)
        if method.rotation:
            q = rotation.random_orthogonal(hidden.shape[-1], rotation.SEED)
            _rotate_outside(model, prefix, q, hidden, changed, scale_dtype)
    if q is not None:
        hidden = rotation.rotate(hidden, q)
    hidden_float = hidden if method.float_target else None  # the float model's hidden states
    results: dict[str, QuantizedWeight] = {}
    unscaled: dict[str, int] = {}  # block-relative linear name -> blocks where it stayed unscaled
    bar = progress_bar(total=len(blocks), enabled=progress, desc=f"{config.method}", unit="block")
    for index, live in enumerate(blocks):
        block = store.load(index, live, device)
        hidden = hidden.to(device)
        kw = _to(block_kwargs[index], device)
        total = hidden.shape[0]
        few = min(ERROR_SAMPLES, total)
        if q is not None:
            _rotate_block(block, f"{prefix}.{index}", q, hidden, kw, targets, changed)
        reference = _output(block(hidden[:few], **_rows(kw, few, total)))
        names = {module: name for name, module in block.named_modules() if f"{prefix}.{index}.{name}" in targets}
        cache: dict = {}
        if method.scaling:
            skipped = _scale_block(block, f"{prefix}.{index}", names, hidden, kw, config, targets, changed, reference)
            for name in skipped:
                unscaled[name] = unscaled.get(name, 0) + 1
        float_inputs: dict = {}
        if method.float_target:
            hidden_float, float_inputs = _float_inputs(block, names, hidden_float.to(device), kw)

        def hook(module, args, names=names, cache=cache, index=index, float_inputs=float_inputs):
            x = args[0]
            if cache.get("x") is not x:  # q/k/v (gate/up) share one input tensor: one Hessian
                flat = x.reshape(-1, x.shape[-1]).float()
                cache["x"], cache["h"] = x, input_hessian(flat)
                if method.float_target:
                    cache["target"] = gptaq.target_factor(float_inputs[module], flat, cache["h"])
            full = f"{prefix}.{index}.{names[module]}"
            weight = families.linear_weight(module)  # [N, K]; GPT-2's Conv1D stores it transposed
            source = gptaq.float_target(weight.detach(), cache["target"]) if method.float_target else weight.detach()
            q = method.quantize(
                source,
                cache["h"],
                config.bits,
                config.group_size,
                config.sym,
                scale_dtype or weight.dtype,
                f"{full}.weight",
            )
            results[full] = q if keep is None else keep(q)
            # later linears of the block see this one's quantized output
            weight.data.copy_(dequantize(q, config.bits, config.group_size).to(weight.dtype))

        def quantize_expert(name: str, weight: torch.Tensor, h: torch.Tensor) -> tuple[object, torch.Tensor]:
            q = method.quantize(
                weight, h, config.bits, config.group_size, config.sym, scale_dtype or weight.dtype, name
            )
            return (q if keep is None else keep(q)), dequantize(q, config.bits, config.group_size)

        block_experts = {
            m: f"{prefix}.{index}.{n}" for n, m in block.named_modules() if f"{prefix}.{index}.{n}" in experts
        }
        with experts_calibration(block_experts, quantize_expert, input_hessian, results):
            hidden = _run_hooked(block, names, hook, hidden, kw)
        error = ((hidden[:few] - reference).pow(2).sum() / reference.pow(2).sum().clamp(min=1e-30)).item()
        store.release(index, live, block)
        bar.set_postfix_str(f"block {index} rel. output error {error:.2e}")
        bar.update(1)
        del reference, cache, block, names, hook, float_inputs, block_experts  # free this block before the next
    bar.close()
    if unscaled:
        listed = ", ".join(f"{name} ({count} of {len(blocks)} blocks)" for name, count in sorted(unscaled.items()))
        warnings.warn(
            f"{config.method}: no channel scaling for {listed}: their inputs come from "
            "neither a norm nor a linear the scales can be folded into; quantized unscaled",
            stacklevel=3,
        )
    missing = sorted(set(targets) - set(results))
    missing += sorted(f"{n}.{p}" for n in experts for p in PROJECTIONS if f"{n}.{p}" not in results)
    if missing:
        raise ValueError(f"{missing[0]!r} was never called during calibration; cannot quantize it")
    return results


def _head_to_untie(model: nn.Module, changed: dict[str, torch.Tensor]) -> str | None:
    """The head's module name when `changed` gives it a new value while it shares the embedding's tensor."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return None
    name = module_name(model, head)
    return name if f"{name}.weight" in changed else None


def _calibration_tokens(calibration) -> tuple[torch.Tensor, dict]:
    from .data import CalibrationSet

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
    from ..methods.codes import pack
    from ..nn.experts import QuantExperts
    from ..nn.linear import QuantLinear
    from ..nn.surgery import _set_module, modules_to_skip

    tokens, info = _calibration_tokens(calibration)
    if hasattr(model, "config"):
        from .data import check_seqlen

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
        _set_module(model, name, module)
    if hasattr(model, "config"):
        model.config.quantization_config = resolved
    return model
