"""Orthogonal rotations folded into the weights before quantization (weight-only QuaRot/SpinQuant style).

A pre-norm transformer computes the same function if its residual stream is rotated by an
orthogonal Q: [D, D] (x -> x Q) everywhere, because an RMS norm with unit weight commutes with Q
(||x Q|| = ||x||). Folding it into the weights:
- every norm's weight g is first folded into the linears reading its output (W <- W diag(g),
  g <- 1), so that each norm is a pure RMS normalisation;
- linears reading the stream (q/k/v, gate/up): W <- W Q; linears writing to it (o_proj,
  down_proj): W <- Q^T W (bias b <- b Q);
- the embedding: E <- E Q; the head: W_head <- W_head diag(g_final) Q. A tied head cannot stay
  tied (the embedding is E Q, the head E diag(g) Q), so the head becomes its own float tensor.
Inside attention the value/output pair gets a second rotation R: [d, d] per head (R2 in
SpinQuant): each value head's output rows W_v,h <- R^T W_v,h and each o_proj head's input
columns W_o[:, h] <- W_o[:, h] R (softmax(QK^T) V mixes positions, not channels, so R passes
through it).

Nothing runs at inference: the result is an ordinary checkpoint of the same architecture. Why it
helps: a random rotation spreads each weight row's outlier channels over all channels
(incoherence, QuIP), so a group's range is set by typical values rather than by a few large ones,
which matters most at 3 bits. Q and R are Haar-random orthogonal matrices from a fixed seed, so a
method run is deterministic.

Shapes: weights W: [N, K] (out, in) of any float dtype; rotations are computed in float64 and
written back in the weight's dtype.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..nn.linears import linear_weight
from .blocks import ERROR_SAMPLES, is_norm, module_name, norm_inputs, output, record_changed, relative_change, rows
from .transform import Transform

SEED = 0  # of the random rotations: the same checkpoint for the same model and calibration


def random_orthogonal(n: int, seed: int = SEED) -> torch.Tensor:
    """A Haar-random orthogonal matrix: [n, n] float64 (QR of a Gaussian, signs fixed by R's diagonal)."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


ROWS_PER_CHUNK = 4096  # float64 temporaries stay small for an embedding of any vocabulary


def rotate(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(x diag(scale)) Q for x: [..., D], Q: [D, D] float64, scale: [D] or None; in x's dtype,
    computed in float64 a chunk of rows at a time."""
    q = q.to(x.device)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(flat)
    for begin in range(0, flat.shape[0], ROWS_PER_CHUNK):
        rows = flat[begin : begin + ROWS_PER_CHUNK].double()
        if scale is not None:
            rows = rows * scale.double().unsqueeze(0)
        out[begin : begin + ROWS_PER_CHUNK] = (rows @ q).to(x.dtype)
    return out.view(x.shape)


def _write(parameter: torch.Tensor, value: torch.Tensor) -> None:
    parameter.data.copy_(value.to(parameter.dtype))


@torch.no_grad()
def weight_offset(norm: nn.Module) -> float:
    """c in norm(x) = unit(x) * (c + w) for a norm with weight w: 0 for Llama's RMS norm, 1 for
    Gemma's (stored weights are w, the scale is 1 + w). Measured on a probe, so any norm of that
    form is recognised: with w = 0 the output is c * unit(x), with w = 1 it is (c + 1) * unit(x).
    A norm of another form (a LayerNorm with a bias) gives a value the block check then refuses."""
    probe = copy.deepcopy(norm).to(device="cpu", dtype=torch.float32)
    x = torch.randn(4, probe.weight.shape[0], generator=torch.Generator().manual_seed(SEED))
    probe.weight.data.fill_(0)
    zero = probe(x).double()
    probe.weight.data.fill_(1)
    step = probe(x).double() - zero  # unit(x)
    return round(((zero * step).sum() / (step * step).sum().clamp(min=1e-30)).item())


def norm_gain(weight: torch.Tensor, offset: float) -> torch.Tensor:
    """A norm's per-channel scale c + w for its weight w: [D]; float64."""
    return weight.double() + offset


@torch.no_grad()
def fold_norm_(norm: nn.Module, readers: list[nn.Module], offset: float = 0.0) -> None:
    """Fold the norm's scale g = offset + w: [K] into the linears reading its output
    (W <- W diag(g)); then w <- 1 - offset, so that the norm's scale is 1 (a pure RMS
    normalisation, which commutes with a rotation). offset: `weight_offset(norm)`."""
    g = norm_gain(norm.weight, offset)
    for reader in readers:
        weight = linear_weight(reader)
        _write(weight, weight.double() * g.unsqueeze(0))
    norm.weight.data.fill_(1 - offset)


@torch.no_grad()
def rotate_inputs_(linear: nn.Module, q: torch.Tensor) -> None:
    """The linear reads x Q instead of x: W <- W Q."""
    weight = linear_weight(linear)
    _write(weight, weight.double() @ q.to(weight.device))


@torch.no_grad()
def rotate_outputs_(linear: nn.Module, q: torch.Tensor) -> None:
    """The linear writes y Q instead of y: W <- Q^T W, b <- b Q."""
    weight = linear_weight(linear)
    q = q.to(weight.device)
    _write(weight, q.t() @ weight.double())
    if getattr(linear, "bias", None) is not None:
        _write(linear.bias, linear.bias.double() @ q)


@torch.no_grad()
def rotate_heads_(values: nn.Module, output: nn.Module, r: torch.Tensor, head_dim: int) -> None:
    """Rotate every value head's output by R: [d, d] and every output-projection head's input back.

    values: v_proj, weight [H_kv·d, K]; output: o_proj, weight [D, H·d]. With grouped-query
    attention every query head reads some kv head, and all heads share R, so the pairing holds
    whatever the mapping."""
    r = r.to(values.weight.device)
    v = values.weight.double()
    heads = v.shape[0] // head_dim
    _write(values.weight, torch.einsum("de,hdk->hek", r, v.view(heads, head_dim, -1)).reshape(v.shape))
    if getattr(values, "bias", None) is not None:
        _write(values.bias, (values.bias.double().view(heads, head_dim) @ r).reshape(-1))
    o = output.weight.double()
    _write(output.weight, (o.view(o.shape[0], -1, head_dim) @ r).reshape(o.shape))


def rotated_head(head: torch.Tensor, norm_weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The output head after the final norm's weight is folded in and the stream rotated:
    W_head diag(g) Q, head: [V, D], norm_weight: [D], in head's dtype."""
    return rotate(head, q, scale=norm_weight)


def norm_commutes(norm: nn.Module, x: torch.Tensor, q: torch.Tensor, offset: float = 0.0) -> float:
    """How far `norm` is from commuting with the rotation: the relative difference between
    norm(x Q^T) and unit(x) Q^T diag(g), unit being the norm with scale 1 (weight 1 - offset) and
    g = offset + w its scale (0 for an RMS norm). x: [n, D] on the rotated stream."""
    unit = copy.deepcopy(norm)
    unit.weight.data.fill_(1 - offset)
    expected = norm(rotate(x, q.t())).double()
    got = rotate(unit(x), q.t()).double() * norm_gain(norm.weight, offset)
    return ((got - expected).norm() / expected.norm().clamp(min=1e-30)).item()


FOLD_TOLERANCE = 1e-3  # relative change of a float output that rotating 32-bit weights may cause
FOLD_TOLERANCE_16BIT = 2e-2  # the same for 16-bit weights (rounded after rotating)


def _tolerance(dtype: torch.dtype) -> float:
    return FOLD_TOLERANCE if dtype.itemsize >= 4 else FOLD_TOLERANCE_16BIT


def final_norm(model: nn.Module, prefix: str) -> tuple[str, nn.Module]:
    """(name, module) of the one norm outside the decoder blocks (applied before the head)."""
    found = [(n, m) for n, m in model.named_modules() if is_norm(m) and not n.startswith(prefix + ".")]
    if len(found) != 1:
        raise ValueError(
            f"{type(model).__name__}: rotation needs exactly one norm outside the decoder blocks "
            f"(the final norm), found {len(found)}: {[n for n, _ in found]}"
        )
    return found[0]


def rotate_outside(
    model: nn.Module,
    prefix: str,
    q: torch.Tensor,
    hidden: torch.Tensor,
    changed: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
) -> None:
    """Record in `changed` the rotated embedding, the unit final norm and the head W diag(g) Q
    (design: this module's docstring), in `dtype` (a writer's source dtype; default the model's).
    A tied head gets its own tensor. ValueError when the final norm is not an RMS norm (it would
    not commute with Q). prefix: the decoder blocks' name; hidden: [S, T, D] first block's input."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or head is None:
        raise ValueError(f"{type(model).__name__}: rotation needs an input embedding and an output head")
    norm_name, norm = final_norm(model, prefix)
    offset = weight_offset(norm)  # Gemma's norms scale by 1 + w
    sample = rotate(hidden[:1].reshape(-1, hidden.shape[-1]), q).to(norm.weight.dtype)
    drift = norm_commutes(norm, sample, q, offset)
    if not drift < _tolerance(norm.weight.dtype):
        raise ValueError(
            f"{norm_name}: rotation needs RMS norms that commute with an orthogonal rotation; this one "
            f"changed its output by {drift:.2e} (relative)"
        )
    tied = head.weight is embed.weight or head.weight.is_meta  # a streamed tied head is never read
    head_weight = embed.weight if tied else head.weight
    rotated = {
        f"{module_name(model, embed)}.weight": rotate(embed.weight.detach(), q),
        f"{module_name(model, head)}.weight": rotated_head(
            head_weight.detach(), norm_gain(norm.weight.detach(), offset), q
        ),
        f"{norm_name}.weight": torch.full_like(norm.weight, 1 - offset),
    }
    changed.update({name: value.to("cpu", dtype or value.dtype) for name, value in rotated.items()})


def rotate_block(
    block: nn.Module,
    block_name: str,
    q: torch.Tensor,
    hidden: torch.Tensor,
    kwargs: dict,
    targets: dict,
    changed: dict[str, torch.Tensor],
) -> None:
    """Fold the norms of one float block into the linears reading them and rotate its linears
    (design: this module's docstring). Checked: the block's output on the rotated stream is its
    float output rotated; ValueError naming the block otherwise. hidden: [S, T, D] rotated stream."""
    total = hidden.shape[0]
    few = min(ERROR_SAMPLES, total)
    kw = rows(kwargs, few, total)
    width = q.shape[0]
    expected = rotate(output(block(rotate(hidden[:few], q.t()), **kw)), q)
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    norms = norm_inputs(block, linears, hidden[:1], rows(kwargs, 1, total))
    # the norms on the stream (not inside attention), each once with the linears reading it
    stream_norms = {id(norm): (norm, readers) for norm, readers in norms.values() if norm.weight.numel() == width}
    for norm, readers in stream_norms.values():
        fold_norm_(norm, readers, weight_offset(norm))
    touched = [norm for norm, _ in stream_norms.values()]
    for linear in linears:
        if linear in norms and linear.in_features == width:
            rotate_inputs_(linear, q)
        elif linear not in norms and linear.out_features == width:
            rotate_outputs_(linear, q)
        else:
            continue
        touched.append(linear)
    for module in block.modules():
        values, out = getattr(module, "v_proj", None), getattr(module, "o_proj", None)
        head_dim = getattr(module, "head_dim", None)
        if isinstance(values, nn.Linear) and isinstance(out, nn.Linear) and head_dim:
            if values.out_features % head_dim == 0 and out.in_features % head_dim == 0:
                r = random_orthogonal(head_dim, SEED + 1)
                rotate_heads_(values, out, r, head_dim)
    got = output(block(hidden[:few], **kw))
    drift = relative_change(got, expected)
    if not drift < _tolerance(hidden.dtype):
        raise ValueError(
            f"{block_name}: rotation changed the float block output (relative {drift:.2e}); rotation needs "
            "pre-norm blocks with RMS norms whose linears read the normed stream or write to it (Llama-style)"
        )
    record_changed(block, block_name, touched, targets, changed)


class Rotation(Transform):
    """The calibration loop's hooks for rotations: embedding, final norm and head rotated once
    and the captured stream rotated (before_model), each float block folded and rotated when it
    is loaded, before its reference output is taken (before_block)."""

    changes_float_tensors = True

    def before_model(self, run) -> None:
        self.q = random_orthogonal(run.hidden.shape[-1], SEED)
        rotate_outside(run.model, run.prefix, self.q, run.hidden, run.changed, run.scale_dtype)
        run.hidden = rotate(run.hidden, self.q)

    def before_block(self, run, block) -> None:
        rotate_block(block.block, block.name, self.q, block.hidden, block.kwargs, run.targets, run.changed)
