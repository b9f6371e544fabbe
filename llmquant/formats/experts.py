"""Mixture-of-Experts layers in the three formats (experts quantized by llmquant/nn/experts.py).

An experts tensor of the model, e.g. `model.layers.0.mlp.experts.gate_up_proj` [E, N, K], holds
one [N, K] matrix per expert, packed like a linear's (docs/FORMAT.md):

- llmquant: stacked along the expert axis under the QuantExperts buffer names,
  `<experts>.gate_up_proj_qweight` [E, ceil(K/V), N], `_scales` [E, G, N], `_qzeros` [E, G, N];
- GPTQ and compressed-tensors: one quantized linear per expert and checkpoint tensor, named as
  transformers' reverse conversion (save_pretrained) names the float per-expert tensors, which
  is what vLLM's fused-MoE loaders read: Mixtral `...block_sparse_moe.experts.{e}.w1/w3/w2`,
  Qwen-MoE `...mlp.experts.{e}.gate_proj/up_proj/down_proj`, each with that format's tensors
  (`qweight`, `qzeros`, `scales`, `g_idx` / `weight_packed`, `weight_scale`, ...). A per-expert
  tensor is a run of rows of one expert's [N, K] matrix (w1 = the gate rows), so it is the
  packed columns [start, stop) of that expert: no arithmetic on codes, bit-exact both ways.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from ..checkpoint.conversion import ExpertRows
from ..checkpoint.shards import TensorSpec
from ..config import QuantConfig
from ..nn.experts import MEMBERS, stacked_buffers


def _stem(rows: ExpertRows) -> str:
    return rows.name.removesuffix(".weight")


def _columns(packed: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Output rows [start, stop) of one packed [N, K] matrix (columns of the [*, N] tensors)."""
    return {key: value[:, start:stop].contiguous() for key, value in packed.items()}


def expert_specs(
    fmt: ModuleType,
    name: str,
    shape: tuple[int, int, int],
    rows: list[ExpertRows] | None,
    scale_dtype: torch.dtype,
    config: QuantConfig,
) -> list[TensorSpec]:
    """What format `fmt` writes for the experts tensor `name` [E, N, K]; `rows`: its per-expert
    checkpoint tensors (None for the llmquant format, which stacks them). Refuses (FormatError)
    what the format cannot hold, naming the per-expert tensor."""
    owner, _, proj = name.rpartition(".")
    _, n, k = shape
    if fmt.NAME == "llmquant":
        buffers = stacked_buffers(proj, shape, config.bits, config.group_size, config.sym, scale_dtype)
        return [TensorSpec(f"{owner}.{b}", dtype, s) for b, dtype, s in buffers]
    specs = []
    for part in rows or []:
        fmt.check_layer(_stem(part), part.stop - part.start, k, config)
        specs += fmt.layer_specs(_stem(part), part.stop - part.start, k, scale_dtype, config)
    return specs


def export_experts(
    fmt: ModuleType,
    name: str,
    shape: tuple[int, int, int],
    rows: list[ExpertRows] | None,
    packed: list[dict[str, torch.Tensor]],
    config: QuantConfig,
) -> dict[str, torch.Tensor]:
    """{tensor name: tensor} in format `fmt`, in `expert_specs` order, from the llmquant packed
    tensors of every expert (packed[e]: {"qweight" [ceil(K/V), N], "scales" [G, N], "qzeros"})."""
    owner, _, proj = name.rpartition(".")
    _, _, k = shape
    if fmt.NAME == "llmquant":
        return {f"{owner}.{proj}_{m}": torch.stack([p[m] for p in packed]) for m in MEMBERS if m in packed[0]}
    out = {}
    for part in rows or []:
        piece = _columns(packed[part.expert], part.start, part.stop)
        exported = fmt.export_layer(_stem(part), piece, part.stop - part.start, k, config)
        out.update({f"{_stem(part)}.{key}": value for key, value in exported.items()})
    return out


def source_names(fmt: ModuleType, name: str, rows: list[ExpertRows] | None, config: QuantConfig) -> list[str]:
    """The tensor names a checkpoint in `fmt` may hold for the experts tensor `name`."""
    owner, _, proj = name.rpartition(".")
    if fmt.NAME == "llmquant":
        return [f"{owner}.{proj}_{m}" for m in MEMBERS]
    return [f"{_stem(part)}.{m}" for part in rows or [] for m in fmt.MEMBERS]


def import_experts(
    fmt: ModuleType,
    name: str,
    shape: tuple[int, int, int],
    rows: list[ExpertRows] | None,
    read: Callable[[str], torch.Tensor | None],
    config: QuantConfig,
    source_qc: dict,
) -> list[dict[str, torch.Tensor]]:
    """The llmquant packed tensors of every expert of `name` [E, N, K] from a checkpoint in `fmt`
    (read(tensor name) -> tensor, or None when absent): per-expert pieces joined by rows."""
    experts, n, k = shape
    owner, _, proj = name.rpartition(".")
    if fmt.NAME == "llmquant":
        stacked = {m: read(f"{owner}.{proj}_{m}") for m in MEMBERS}
        return [{m: t[e] for m, t in stacked.items() if t is not None} for e in range(experts)]
    pieces: list[list[tuple[int, dict[str, torch.Tensor]]]] = [[] for _ in range(experts)]
    for part in rows or []:
        stem = _stem(part)
        tensors = {m: t for m in fmt.MEMBERS if (t := read(f"{stem}.{m}")) is not None}
        packed = fmt.import_layer(stem, tensors, part.stop - part.start, k, config, source_qc)
        pieces[part.expert].append((part.start, packed))
    joined = []
    for parts in pieces:
        parts.sort(key=lambda item: item[0])
        joined.append({m: torch.cat([p[m] for _, p in parts], dim=1) for m in parts[0][1]})
    return joined
