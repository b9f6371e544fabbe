"""`gptq`: Hessian-based error feedback (GPTQ, Frantar et al. 2022) with static, contiguous groups.

Columns are quantized one at a time; each one's rounding error, divided by the pivot of the
upper Cholesky factor U of H^-1 (H = 2 X^T X / n + damp·I), is fed back into the columns not yet
quantized (W[:, j] -= err · U[i, j]). Updates are applied lazily per block of columns (one block
= one group) with one matmul to the rest of the matrix, as in the paper's implementation.

Groups and the stored layout: a group's scale and zero are chosen when its first column is
reached, from the error-updated weights of the whole group (optionally with the clipping search
of `grid.search_clip` on the group's Hessian block). Groups are the original contiguous column
ranges, so the packed format needs no g_idx.

Act-order restricted to contiguous groups: the processing order permutes whole groups (by the sum
of their Hessian diagonal, largest first) and, inside a group, columns (by diagonal, largest
first). Every group is still processed as one contiguous run, so its parameters are computed
once from weights that all still carry the feedback of earlier groups, and codes are written
back to the original column order.

Dampening: damp = percdamp · mean(diag H). If the Cholesky factorisation fails (numerically
singular H) the dampening is multiplied by 10 with a warning, up to a bound; the result is
checked for NaN/Inf and never returned non-finite.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from .codes import QuantizedWeight, check_finite, group_params, to_codes
from .grid import from_codes, group_spans, search_clip

PERCDAMP = 0.01
MAX_DAMP_TRIES = 8


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = PERCDAMP, name: str = "weight") -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damp·I)^-1, H: [K, K] (float32 or float64).

    Raises the dampening (x10, with a warning naming the layer) until the factorisation succeeds
    and U is finite.
    """
    k = hessian.shape[0]
    eye = torch.eye(k, dtype=hessian.dtype, device=hessian.device)
    scale = hessian.diagonal().abs().mean().clamp(min=torch.finfo(hessian.dtype).tiny).item()
    damp = max(percdamp, 0.0) * scale
    for _ in range(MAX_DAMP_TRIES):
        chol, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper
        new_damp = max(damp * 10, 1e-4 * scale)
        warnings.warn(
            f"{name}: Hessian is numerically singular (Cholesky failed with dampening {damp:.3g}); "
            f"raising the dampening to {new_damp:.3g}",
            stacklevel=3,
        )
        damp = new_damp
    raise ValueError(f"{name}: Hessian could not be factorised even with dampening {damp:.3g}")


def processing_order(diag: torch.Tensor, spans: list[tuple[int, int]], act_order: bool) -> list[int]:
    """Group indices in processing order: by the sum of diag(H) over the group, largest first."""
    if not act_order:
        return list(range(len(spans)))
    mass = torch.stack([diag[b:e].sum() for b, e in spans])
    return torch.argsort(mass, descending=True, stable=True).tolist()


_PREPARED: dict = {}  # the last Hessian's factorisation: q/k/v (gate/up) share one Hessian


def _prepared(
    hessian: torch.Tensor,
    dtype: torch.dtype,
    spans: list[tuple[int, int]],
    act_order: bool,
    percdamp: float,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]], torch.Tensor, torch.Tensor]:
    """(dead [K] bool, perm [K], runs, H permuted [K, K], U [K, K]) for hessian: [K, K].

    runs: (group index, begin, end) in the permuted column space. Linears reading the same input
    get the same Hessian tensor; its factorisation is kept (keyed by identity and version, freed
    with the tensor) and reused, with the dampening warning repeated for each layer.
    """
    key = (hessian._version, dtype, tuple(spans), act_order, percdamp)
    ref = _PREPARED.get("ref")
    if ref is not None and ref() is hessian and _PREPARED["key"] == key:
        for message in _PREPARED["warnings"]:
            warnings.warn(f"{name}: {message}", stacklevel=4)
        return _PREPARED["value"]
    h = hessian.to(dtype).clone()
    if not torch.isfinite(h).all():
        raise ValueError(f"{name}: calibration activations hold NaN/Inf")
    dead = h.diagonal() == 0  # inputs that are always zero: any value works, use 0
    h[dead, dead] = 1
    order = processing_order(h.diagonal(), spans, act_order)
    perm_parts, runs = [], []
    pos = 0
    for g in order:
        b, e = spans[g]
        cols = torch.arange(b, e, device=h.device)
        if act_order:
            cols = cols[torch.argsort(h.diagonal()[b:e], descending=True, stable=True)]
        perm_parts.append(cols)
        runs.append((g, pos, pos + e - b))
        pos += e - b
    perm = torch.cat(perm_parts)
    h = h[perm][:, perm]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        u = inverse_hessian_factor(h, percdamp, name)
    messages = [str(c.message).removeprefix(f"{name}: ") for c in caught]
    for message in messages:
        warnings.warn(f"{name}: {message}", stacklevel=4)
    value = (dead, perm, runs, h, u)
    _PREPARED.clear()
    _PREPARED.update(
        ref=weakref.ref(hessian, lambda _ref: _PREPARED.clear()), key=key, warnings=messages, value=value
    )
    return value


def quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: int,
    group_size: int,
    sym: bool,
    scale_dtype: torch.dtype,
    name: str = "weight",
    clip: bool = True,
    act_order: bool = True,
    percdamp: float = PERCDAMP,
    block_size: int = 128,
) -> QuantizedWeight:
    """GPTQ codes of W: [N, K] given H: [K, K] = 2 X^T X / n of the layer's inputs.

    Computes in float64 when W is float64 (the tests' reference), else float32. Returns codes
    [N, K] uint8, scales [G, N] scale_dtype, zeros [G, N] uint8 (None when sym).
    """
    if hessian is None:
        raise ValueError(f"{name}: gptq needs calibration activations (a Hessian); none were given")
    check_finite(weight, name)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(dtype).clone()
    n, k = w.shape
    dead, perm, runs, h, u = _prepared(hessian, dtype, group_spans(k, group_size), act_order, percdamp, name)
    w[:, dead] = 0
    # Work on W^T [K, N]: a column of W is a contiguous row, so the per-column steps below run
    # in place on contiguous memory without allocating.
    wt = w[:, perm].t().contiguous()
    spans = group_spans(k, group_size)

    codes = torch.empty(k, n, dtype=dtype, device=w.device)  # transposed, permuted
    scales = [None] * len(spans)
    zeros = [None] * len(spans)
    for g, g_begin, g_end in runs:
        w_group = wt[g_begin:g_end].t()
        ratio = search_clip(w_group, h[g_begin:g_end, g_begin:g_end], bits, sym, scale_dtype) if clip else 1.0
        scale, zero = group_params(w_group, bits, sym, scale_dtype, ratio)
        scales[g], zeros[g] = scale, zero
        # lazy batches of at most block_size columns inside the group (a whole row is one group
        # when group_size is -1)
        for b1 in range(g_begin, g_end, block_size):
            b2 = min(b1 + block_size, g_end)
            _quantize_columns(wt[b1:b2], u[b1:b2, b1:b2], codes[b1:b2], scale, zero, bits)
            # wt[b1:b2] now holds the scaled errors; W[:, b2:] -= E @ U[b1:b2, b2:]
            if b2 < k:
                wt[b2:] -= torch.mm(wt[b1:b2].t(), u[b1:b2, b2:]).t()

    out = torch.empty(n, k, dtype=dtype, device=w.device)
    out[:, perm] = codes.t()
    if not torch.isfinite(wt).all():
        raise ValueError(f"{name}: GPTQ produced non-finite values; the calibration activations are degenerate")
    return QuantizedWeight(
        codes=out.to(torch.uint8),
        scales=torch.stack(scales).to(scale_dtype),
        zeros=None if sym else torch.stack(zeros).to(torch.uint8),
    )


def _quantize_columns(
    wt: torch.Tensor, u: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> None:
    """The column-by-column GPTQ step on one lazy block, in place.

    wt: [m, N] the block's columns as rows (updated weights); u: [m, m] its block of U;
    codes: [m, N] receives the codes; scale, zero: [N]. On return wt holds the scaled errors
    E[i] = (w_i - Q(w_i)) / U[i, i], which the caller feeds to the later blocks. Every step
    writes into preallocated rows (out=): one op on a 1536-element column costs less than
    allocating its result.
    """
    pivots = u.diagonal().tolist()
    deq = torch.empty_like(scale)
    m = wt.shape[0]
    for i in range(m):
        col = wt[i]
        q = to_codes(col, scale, zero, bits, out=codes[i])
        err = torch.sub(col, from_codes(q, scale, zero, out=deq), out=col).div_(pivots[i])
        if i + 1 < m:
            wt[i + 1 :].sub_(torch.outer(u[i, i + 1 :], err))


def quantize_noclip(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: int,
    group_size: int,
    sym: bool,
    scale_dtype: torch.dtype,
    name: str = "weight",
) -> QuantizedWeight:
    """GPTQ without the clipping search (round-to-nearest range per group), for comparison."""
    return quantize(weight, hessian, bits, group_size, sym, scale_dtype, name, clip=False)
