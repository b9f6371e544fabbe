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
run (`llmquant.calibration.loop`), each linear quantized from the inputs it actually receives. Row
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

import torch

from . import clip, gptq
from .codes import quantize_rtn
from .grid import dequantize

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


# The per-weight quantizers used after scaling: AWQ's own (rtn + clipping search) and GPTQ.
quantize = clip.quantize
quantize_gptq = gptq.quantize
