"""Activation-aware per-channel scaling (AWQ, Lin et al. 2023), folded into the preceding norm or linear.

Input channel j of a linear is multiplied by s_j and whatever produces that input is divided by
s_j, so the float function is unchanged while channels with large activations get a finer grid:
- after a norm (q/k/v after input_layernorm, gate/up after post_attention_layernorm): the norm's
  weight (and bias) is divided by s and every linear reading that norm's output is scaled;
- o_proj: its input is softmax(QK^T) V, linear in V, so s is folded into v_proj's output rows
  (weight and bias divided by s). With grouped-query attention o_proj has num_heads·head_dim
  input channels and v_proj num_kv_heads·head_dim output rows; query head h reads kv head
  h // (num_heads / num_kv_heads) (transformers' repeat_kv), so s is chosen per kv channel and
  repeated over the query heads sharing it (`kv_channel_map`);
- down_proj: its input is act(gate_proj x) * up_proj x, linear in up_proj, so s is folded into
  up_proj's output rows.
A linear with no such producer (or with shapes that do not match) is left unscaled, with a
warning naming it.

Design (the order matters): folding divides v_proj/up_proj rows by s, so it must happen before
those linears are quantized, yet the scales for o_proj/down_proj need statistics of their
inputs, which only exist after v_proj/up_proj have run. So, as in the original AWQ, every scale
of a decoder block is searched first on one float forward pass of the block (its input being
the output of the already quantized blocks before it), all scales are folded (checked: the
float block output is unchanged), and only then does the sequential quantization of the block
run (`llmquant.calibration.loop`, calling `ChannelScaling` below), each linear quantized from
the inputs it actually receives. Row
scaling of v_proj/up_proj does not change their own quantization (a group's range scales with
its row), and v_proj's rounding error reaches the output through o_proj·diag(s)·diag(1/s), so
the four searches of a block are independent.

Search: s = mean|x|^alpha normalised to sqrt(max·min) = 1, alpha on a grid, minimising the
output error of the linears reading the scaled channels on the calibration activations after
round to nearest, tr(D H D^T) with D = W - Q(W s)/s and H = 2 X^T X / n; alpha = 0 (s = 1) is
a candidate, so the search never makes that objective worse. The chosen method (rtn+clip or
gptq) then quantizes W s with the Hessian of the scaled inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from .blocks import norm_inputs, output, record_changed, relative_change, rows, run_hooked
from .codes import quantize_rtn
from .grid import dequantize
from .transform import Transform

ALPHAS = tuple(i / 10 for i in range(11))

# consumer linear -> the sibling linear whose output rows it reads linearly (and which sibling
# must exist for that to hold: down_proj reads act(gate_proj x) * up_proj x)
PREVIOUS = {"o_proj": ("v_proj", None), "down_proj": ("up_proj", "gate_proj")}


def search_scales(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    absmean: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    expand: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-input-channel scales s: [K'] float32 for linears weights[i]: [N_i, K].

    hessian: [K, K] (2 X^T X / n of their input) or [K] (its diagonal only); absmean: [K'] mean
    |x| per free channel; expand: [K] long index of the free channel of each input channel
    (channels sharing one scale, e.g. query heads sharing a kv head), None when K' = K.
    """
    w = torch.cat([x.float() for x in weights])
    h = hessian.float()
    base = absmean.float().clamp(min=1e-5)
    best, best_err = torch.ones_like(base), None
    for alpha in ALPHAS:
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        full = s if expand is None else s[expand]
        q = dequantize(quantize_rtn(w * full, bits, group_size, sym, scale_dtype=torch.float32), bits, group_size)
        d = w - q / full
        err = ((d * d) * h).sum() if h.dim() == 1 else ((d @ h) * d).sum()
        if best_err is None or err < best_err:
            best, best_err = s, err
    return best


def kv_channel_map(o_in: int, v_out: int, head_dim: int | None) -> torch.Tensor | None:
    """For o_proj with o_in input channels reading v_proj's v_out output rows: [o_in] long, the v
    row of each o_proj input channel; None when the shapes do not fit attention heads."""
    if o_in == v_out:
        return torch.arange(o_in)
    if not head_dim or o_in % v_out or v_out % head_dim:
        return None
    repeat = o_in // v_out
    channel = torch.arange(o_in)
    return (channel // head_dim) // repeat * head_dim + channel % head_dim


def fold_into_norm(norm: torch.nn.Module, readers: list[torch.nn.Module], s: torch.Tensor) -> None:
    """Divide the norm's weight (and bias) by s: [K] and multiply the readers' input columns by s."""
    norm.weight.data.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.data.div_(s.to(norm.bias.dtype))
    for reader in readers:
        reader.weight.data.mul_(s.to(reader.weight.dtype))


def fold_into_linear(previous: torch.nn.Module, consumer: torch.nn.Module, s: torch.Tensor, expand: torch.Tensor):
    """Divide previous's output rows (weight [N, K_prev] and bias [N]) by s: [N] and multiply
    consumer's input columns by s[expand]: [K]."""
    previous.weight.data.div_(s.to(previous.weight.dtype).unsqueeze(1))
    if getattr(previous, "bias", None) is not None:
        previous.bias.data.div_(s.to(previous.bias.dtype))
    consumer.weight.data.mul_(s[expand].to(consumer.weight.dtype))


FOLD_TOLERANCE = 1e-3  # relative change of the float block output that folding may cause


def _input_stats(
    block: nn.Module, modules: list[nn.Module], hidden: torch.Tensor, kwargs: dict, hessian: Callable
) -> dict:
    """{linear: (mean |x|: [K], H = hessian(x): [K, K]) float32} of the float block's inputs to
    `modules`, from one forward pass of all samples (linears sharing an input share the stats)."""
    stats, last = {}, {}

    def hook(module, args):
        x = args[0]
        if last.get("x") is not x:
            flat = x.reshape(-1, x.shape[-1]).float()
            last["x"], last["stats"] = x, (flat.abs().mean(0), hessian(flat))
        stats[module] = last["stats"]

    run_hooked(block, modules, hook, hidden, kwargs)
    return stats


def _linear_producers(block: nn.Module, names: dict) -> dict:
    """{consumer linear: (previous linear, [K] long index of the previous output row feeding each
    consumer input channel) or a reason string} for o_proj/down_proj-like linears (PREVIOUS)."""
    found = {}
    for module, name in names.items():
        leaf = name.rpartition(".")[2]
        if leaf not in PREVIOUS:
            continue
        previous_name, required = PREVIOUS[leaf]
        parent_name = name.rpartition(".")[0]
        parent = block.get_submodule(parent_name) if parent_name else block
        previous = getattr(parent, previous_name, None)
        gated = required is None or isinstance(getattr(parent, required, None), nn.Linear)
        if not isinstance(previous, nn.Linear) or not gated:
            found[module] = f"no {previous_name} beside it"
            continue
        head_dim = getattr(parent, "head_dim", None) if leaf == "o_proj" else None
        if leaf == "o_proj":
            expand = kv_channel_map(module.in_features, previous.out_features, head_dim)
        else:
            expand = torch.arange(module.in_features) if module.in_features == previous.out_features else None
        if expand is None:
            found[module] = (
                f"{previous_name} has {previous.out_features} output rows, {leaf} {module.in_features} inputs"
            )
            continue
        found[module] = (previous, expand)
    return found


def scale_block(
    block: nn.Module,
    block_name: str,
    names: dict,
    hidden: torch.Tensor,
    kwargs: dict,
    config,
    targets: dict,
    changed: dict | None,
    reference: torch.Tensor,
    hessian: Callable[[torch.Tensor], torch.Tensor],
) -> list[str]:
    """AWQ scaling of one float block before it is quantized (design: this module's docstring).

    Searches every scale on one float forward pass, folds them into norms and preceding linears,
    checks that the float output of the first samples is unchanged (reverting the block and
    scaling nothing otherwise) and records folded tensors that the packed results do not carry
    in `changed`. names: {linear to quantize: block-relative name}; config: the QuantConfig;
    hessian: x [n, K] float32 -> H [K, K]. Returns the block-relative names of the linears left unscaled.
    """
    total = hidden.shape[0]
    # every linear reading a norm is scaled with it, quantized or not (a float one is then written as changed)
    every_linear = [m for m in block.modules() if isinstance(m, nn.Linear)]
    norms = norm_inputs(block, every_linear, hidden[:1], rows(kwargs, 1, total))
    producers = _linear_producers(block, names)
    skipped = [
        names[m] if m not in producers else f"{names[m]} [{producers[m]}]"
        for m in names
        if m not in norms and not isinstance(producers.get(m), tuple)
    ]
    scaled = [m for m in names if m in norms or isinstance(producers.get(m), tuple)]
    stats = _input_stats(block, scaled, hidden, kwargs, hessian)
    touched = []  # modules whose parameters the folds change
    plans = []  # (fold function, arguments) applied after every search
    done = set()
    for module in names:
        if module in norms and module not in done:
            norm, readers = norms[module]
            absmean, h = stats[module]
            quantized = [m.weight for m in readers if m in names]
            s = search_scales(quantized, h, absmean, config.bits, config.group_size, config.sym)
            plans.append((fold_into_norm, (norm, readers, s)))
            touched += [norm, *readers]
            done.update(readers)
        elif isinstance(producers.get(module), tuple):
            previous, expand = producers[module]
            absmean, h = stats[module]
            expand = expand.to(absmean.device)
            # one scale per previous output row: the mean of |x| over the input channels it feeds
            free = torch.zeros(previous.out_features, device=absmean.device).index_add_(0, expand, absmean)
            free /= torch.bincount(expand, minlength=previous.out_features).to(free)
            s = search_scales([module.weight], h, free, config.bits, config.group_size, config.sym, expand)
            plans.append((fold_into_linear, (previous, module, s, expand)))
            touched += [previous, module]
    saved = {id(p): p.detach().clone() for m in touched for p in m.parameters(recurse=False)}
    for fold, args in plans:
        fold(*args)
    few = reference.shape[0]
    got = output(block(hidden[:few], **rows(kwargs, few, total)))
    drift = relative_change(got, reference)
    if not drift < FOLD_TOLERANCE:  # an architecture the folds misread: undo, scale nothing
        for m in touched:
            for p in m.parameters(recurse=False):
                p.data.copy_(saved[id(p)])
        warnings.warn(
            f"{block_name}: channel scaling changed the float block output (relative {drift:.2e}); "
            "this block is quantized unscaled",
            stacklevel=6,
        )
        return list(names.values())
    if changed is not None:
        record_changed(block, block_name, touched, targets, changed)
    return skipped


class ChannelScaling(Transform):
    """The calibration loop's hooks for AWQ: scale each float block after its reference output
    is taken, before it is quantized; warn once at the end about the linears left unscaled."""

    def __init__(self) -> None:
        self.unscaled: dict[str, int] = {}  # block-relative linear name -> blocks where it stayed unscaled

    def before_quantize(self, run, block) -> None:
        skipped = scale_block(
            block.block,
            block.name,
            block.names,
            block.hidden,
            block.kwargs,
            run.config,
            run.targets,
            run.changed,
            block.reference,
            run.hessian,
        )
        for name in skipped:
            self.unscaled[name] = self.unscaled.get(name, 0) + 1

    def after_model(self, run) -> None:
        if self.unscaled:
            count = len(run.blocks)
            listed = ", ".join(f"{name} ({n} of {count} blocks)" for name, n in sorted(self.unscaled.items()))
            warnings.warn(
                f"{run.config.method}: no channel scaling for {listed}: their inputs come from "
                "neither a norm nor a linear the scales can be folded into; quantized unscaled",
                stacklevel=4,
            )
