"""A source checkpoint as transformers loads it: its conversion rules (renames and merges).

transformers 5 does not load checkpoint keys as they are: `conversion_mapping.py` holds, per
model type, renames (GPT-NeoX's `embed_out` is the model's `lm_head`, Mixtral's
`block_sparse_moe` its `mlp`) and converters (the per-expert `experts.{e}.w1/w3.weight` [I, H]
tensors of a Mixture-of-Experts layer merged into one `experts.gate_up_proj` [E, 2I, H]
parameter). Here those rules come from transformers itself (`get_model_conversion_mapping`,
`rename_source_key`, the converters' own operations), never from a copy of its table, so any
checkpoint `from_pretrained` loads in float can be planned, read and quantized by its model
tensor names, one merged tensor at a time (a layer's experts, not the whole model).

The way back (`per_expert_rows`) names a merged tensor's rows with the per-expert checkpoint
names, as `save_pretrained` writes them and serving engines read them, by running transformers'
reverse conversion on an index probe: [E, N, 1] float64 tensors whose values say which (expert,
row) each output row came from, so no rule is restated here either.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CheckpointError
from .shards import TensorSpec


@dataclass
class Group:
    """Source tensors that become one or more model tensors together (one converter call), or a
    single source tensor under its model name (`converter` None: a rename, or none)."""

    key: str  # the model name transformers collects the group under
    sources: list[str] = field(default_factory=list)  # in the order transformers collects them
    patterns: list[str] = field(default_factory=list)  # each source's converter pattern
    converter: object | None = None  # a WeightConverter prototype, deep-copied per use


def _rules(model: nn.Module) -> tuple[list, list]:
    """(renamings, converters) transformers applies when loading `model`'s checkpoints."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    try:
        mapping = get_model_conversion_mapping(model)
    except Exception:  # a model that is not a PreTrainedModel: keys are taken as they are
        return [], []
    return (
        [m for m in mapping if isinstance(m, WeightRenaming)],
        [m for m in mapping if isinstance(m, WeightConverter)],
    )


class Conversion:
    """The groups of a source checkpoint's keys, by model tensor name, with transformers' rules
    for `model` (a meta skeleton is enough). Keys the model does not know keep their names."""

    def __init__(self, model: nn.Module, source_names: list[str], extra: list[str] | tuple = ()) -> None:
        """extra: tensor names the model would have once quantized (e.g. QuantExperts buffers)."""
        from transformers.core_model_loading import dot_natural_key, rename_source_key

        self.model = model
        renamings, converters = _rules(model)
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        expected = {**model.state_dict(), **dict.fromkeys(extra, True)}  # transformers tests `.get(key) is not None`
        prefix = getattr(model, "base_model_prefix", None)
        self.groups: dict[str, Group] = {}
        self.order: list[str] = []  # group keys in the source order of their first tensor
        first_seen = {name: i for i, name in enumerate(source_names)}
        for name in sorted(source_names, key=dot_natural_key):  # transformers' collection order
            renamed, pattern = rename_source_key(name, renamings, converters, prefix, expected)
            if renamed not in expected:  # not a tensor of the model (as transformers reports it): kept as it is
                renamed, pattern = name, None
            group = self.groups.setdefault(renamed, Group(renamed))
            if pattern is not None:
                group.converter = by_pattern[pattern]
                group.patterns.append(pattern)
            elif group.sources:
                raise CheckpointError(f"checkpoint tensors {group.sources[0]!r} and {name!r} both load as {renamed!r}")
            group.sources.append(name)
        self.order = sorted(self.groups, key=lambda k: min(first_seen[s] for s in self.groups[k].sources))
        self._owner = {}  # model tensor name -> group key (filled by `specs`)

    @property
    def renames_anything(self) -> bool:
        """True when some key loads under another name or merged with others."""
        return any(g.converter is not None or g.sources != [g.key] for g in self.groups.values())

    def convert(self, group: Group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{model name: tensor} of `group` from its source tensors (meta tensors plan shapes)."""
        if group.converter is None:
            return {group.key: tensors[group.sources[0]]}
        converter = copy.deepcopy(group.converter)
        for source, pattern in zip(group.sources, group.patterns, strict=True):
            converter.add_tensor(group.key, source, pattern, tensors[source])
        try:
            out = converter.convert(group.key, model=self.model, config=getattr(self.model, "config", None))
        except Exception as error:
            raise CheckpointError(f"cannot convert {group.sources[0]!r} into {group.key!r}: {error}") from None
        return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}

    def specs(self, source: list[TensorSpec]) -> list[tuple[Group, list[TensorSpec]]]:
        """Per group in source order, the TensorSpecs (model names) it produces, planned on meta
        tensors (no data read)."""
        by_name = {spec.name: spec for spec in source}
        planned = []
        for key in self.order:
            group = self.groups[key]
            metas = {s: torch.empty(by_name[s].shape, dtype=by_name[s].dtype, device="meta") for s in group.sources}
            out = self.convert(group, metas)
            specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in out.items()]
            self._owner.update(dict.fromkeys(out, key))
            planned.append((group, specs))
        return planned

    def owner(self, name: str) -> Group | None:
        """The group producing model tensor `name` (after `specs`)."""
        key = self._owner.get(name)
        return None if key is None else self.groups[key]

    def iter_converted(self, reader) -> Iterator[tuple[Group, dict[str, torch.Tensor]]]:
        """(group, {model name: tensor}) for every group in source order, each read when its turn comes."""
        for key in self.order:
            group = self.groups[key]
            yield group, self.convert(group, reader.read(group.sources))


class ConvertedReader:
    """A `TensorReader` by model tensor names: each name is read as the group of source tensors
    that transformers merges into it (the group's other outputs are dropped, read again if asked)."""

    def __init__(self, reader, conversion: Conversion, source: list[TensorSpec]) -> None:
        self.reader, self.conversion = reader, conversion
        self.names = {spec.name for _, specs in conversion.specs(source) for spec in specs}

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [name for name in names if name not in self.names]
        if missing:
            raise CheckpointError(f"tensor {missing[0]!r} is not in the checkpoint; is the checkpoint complete?")
        out: dict[str, torch.Tensor] = {}
        for name in names:
            if name in out:
                continue
            group = self.conversion.owner(name)
            converted = self.conversion.convert(group, self.reader.read(group.sources))
            out.update((k, v) for k, v in converted.items() if k in names)
        return out


@dataclass(frozen=True)
class ExpertRows:
    """Rows [start, stop) of expert `expert` of a merged [E, N, K] tensor are the per-expert
    checkpoint tensor `name` (e.g. `model.layers.0.block_sparse_moe.experts.3.w1.weight`)."""

    name: str
    expert: int
    start: int
    stop: int


def per_expert_rows(model: nn.Module, name: str, shape: tuple[int, int, int]) -> list[ExpertRows]:
    """The per-expert checkpoint tensors that transformers' reverse conversion (save_pretrained)
    makes of the merged model tensor `name` [E, N, K], each as whole rows of one expert in order.
    CheckpointError if the rules do not split it that way (it is then written merged)."""
    from transformers.core_model_loading import revert_weight_conversion

    experts, rows, _ = shape
    probe = torch.arange(experts, dtype=torch.float64)[:, None] * rows + torch.arange(rows, dtype=torch.float64)
    try:
        parts = revert_weight_conversion(model, {name: probe.unsqueeze(-1)})
    except Exception as error:
        raise CheckpointError(f"cannot name the experts of {name!r} per expert: {error}") from None
    found = []
    for part_name, value in parts.items():
        flat = value.reshape(-1)
        if value.dim() != 2 or value.shape[-1] != 1 or flat.numel() == 0:
            raise CheckpointError(f"{name}: reverse conversion gave {part_name!r} of shape {list(value.shape)}")
        expert, start = divmod(int(flat[0]), rows)
        expected = probe[expert, start : start + flat.numel()]
        if flat.numel() > rows - start or not torch.equal(flat, expected):
            raise CheckpointError(f"{name}: {part_name!r} is not whole rows of one expert; cannot export it per expert")
        found.append(ExpertRows(part_name, expert, start, start + flat.numel()))
    covered = sorted((r.expert, r.start, r.stop) for r in found)
    if sum(stop - start for _, start, stop in covered) != experts * rows:
        raise CheckpointError(f"{name}: its per-expert tensors do not cover every row")
    return sorted(found, key=lambda r: (r.expert, r.start))
