"""`llmquant convert`: rewrite a quantized checkpoint (llmquant, GPTQ or compressed-tensors) into
another of the three without re-quantizing. Codes, scales and zero points are carried over bit
for bit; nothing is dequantized.

Streaming as `quantize` is: a meta skeleton of the model gives every linear's shape, the output
is planned from the source tensors' names, dtypes and shapes (no data read), and then each
source layer's few tensors are read, converted and written before the next layer is touched,
into a staging folder published atomically (`publish.py`). Everything a format cannot express is
refused while planning, before a byte is written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from ..config import QuantConfig
from ..errors import CheckpointError, FormatError
from ..formats import detect_format, get_format
from ..formats.experts import expert_specs, export_experts, import_experts, source_names
from ..nn.experts import MEMBERS as EXPERT_MEMBERS
from ..nn.experts import PROJECTIONS, is_experts
from ..nn.linears import is_linear, linear_features
from ..nn.surgery import router_linears
from ..progress import progress_bar
from .conversion import Conversion, per_expert_rows
from .modelcard import card_base_model, write_model_card
from .plan import Skeleton, check_shapes, may_be_missing
from .publish import check_output, copy_side_files, side_files, staged_output
from .shards import ShardedWriter, TensorSpec, parse_size
from .source import TensorReader, meta_model, read_quantized_config, resolve_source, tensor_specs, weight_files
from .verify import check_packed


@dataclass
class ConvertSummary:
    """What `convert_checkpoint` did."""

    source_format: str = ""
    target_format: str = ""
    layers: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


@dataclass
class Layer:
    """A quantized linear of the source: its module name, shape and source tensor names."""

    module: str
    n: int
    k: int
    has_bias: bool
    members: dict[str, str] = field(default_factory=dict)  # suffix -> full tensor name


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int, bool]]:
    """{module name: (out_features N, in_features K, has bias)} of every nn.Linear of `model`."""
    return {
        name: (*linear_features(module)[::-1], module.bias is not None)
        for name, module in model.named_modules()
        if is_linear(module)  # nn.Linear and GPT-2's Conv1D (written as a QuantLinear)
    }


def float_plan(model: torch.nn.Module, layers: dict[str, Layer], experts: set[str] = frozenset()) -> Skeleton:
    """What the source's float tensors (everything but the quantized layers' own tensors and the
    experts tensors, read by their own rules) must be, as `plan.check_shapes` reads it: {name:
    shape} of the skeleton's state dict without those, and the names a checkpoint may lack (tied copies)."""
    shapes = {
        name: tuple(tensor.shape)
        for name, tensor in model.state_dict().items()
        if name.rpartition(".")[0] not in layers and name not in experts
    }
    return Skeleton(targets={}, skip=[], shapes=shapes, optional=may_be_missing(model))


def source_reader(files: list[Path]) -> TensorReader:
    """The reader of the source's tensors; convert reads safetensors checkpoints only."""
    for path in files:
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: convert reads safetensors checkpoints only")
    return TensorReader(files)


def read_tensor(reader: TensorReader, name: str) -> torch.Tensor:
    return reader.read([name])[name]


def find_layers(
    specs: list[TensorSpec], source: ModuleType, shapes: dict[str, tuple[int, int, bool]]
) -> dict[str, Layer]:
    """The source's quantized linears, keyed by module name, with the tensors belonging to each."""
    names = {spec.name for spec in specs}
    marker = source.MARKER
    layers = {}
    for name in sorted(names):
        module, _, suffix = name.rpartition(".")
        if suffix != marker:
            continue
        if module not in shapes:
            raise FormatError(f"{name}: {module!r} is not a linear layer of the model in config.json")
        n, k, has_bias = shapes[module]
        layer = Layer(module, n, k, has_bias)
        for member in (*source.MEMBERS, "bias"):
            if f"{module}.{member}" in names:
                layer.members[member] = f"{module}.{member}"
        layers[module] = layer
    if not layers:
        raise FormatError(f"no quantized layers found ({marker} tensors) in a {source.NAME} checkpoint")
    return layers


def owned(layers: dict[str, Layer]) -> set[str]:
    """Names of the source tensors that belong to quantized layers (read and converted per layer)."""
    return {name for layer in layers.values() for name in layer.members.values()}


def plan(
    specs: list[TensorSpec], layers: dict[str, Layer], source: ModuleType, target: ModuleType, config: QuantConfig
) -> tuple[list[TensorSpec], list[tuple[str, object]]]:
    """Output specs and the write steps, in source order: ("copy", name) or ("layer", Layer),
    a layer emitted where its first tensor was. Checks every layer against the target first."""
    for layer in layers.values():
        target.check_layer(layer.module, layer.n, layer.k, config)
    target.check_model(list(layers), config.modules_to_not_convert or [])
    owner = {name: layer for layer in layers.values() for name in layer.members.values()}
    by_name = {spec.name: spec for spec in specs}
    out, steps, done = [], [], set()
    for spec in specs:
        layer = owner.get(spec.name)
        if layer is None:
            out.append(spec)
            steps.append(("copy", spec.name))
            continue
        if layer.module in done:
            continue
        done.add(layer.module)
        scale_name = layer.members.get(source.SCALE_MEMBER)
        if scale_name is None:
            raise FormatError(f"{layer.module}: no {source.SCALE_MEMBER} tensor in the checkpoint")
        out += target.layer_specs(layer.module, layer.n, layer.k, by_name[scale_name].dtype, config)
        if layer.has_bias:
            if "bias" not in layer.members:
                raise FormatError(f"{layer.module}.bias is missing from the checkpoint")
            out.append(by_name[layer.members["bias"]])
        steps.append(("layer", layer))
    return out, steps


def expert_names_of(model: torch.nn.Module) -> list[str]:
    """The experts tensors ("<experts>.gate_up_proj", ...) of the model (llmquant/nn/experts.py)."""
    return [f"{n}.{p}" for n, m in model.named_modules() if is_experts(m) for p in PROJECTIONS]


def _stacked_names(name: str) -> list[str]:
    """The QuantExperts buffer names of the experts tensor `name` (llmquant's stacked layout)."""
    return [f"{name.rpartition('.')[2]}_{member}" for member in EXPERT_MEMBERS]


def _rows(model: torch.nn.Module, fmt: ModuleType, name: str, shape: tuple[int, int, int]) -> list | None:
    """Per-expert checkpoint tensors of `name` in `fmt` (None: llmquant stacks them)."""
    return None if fmt.NAME == "llmquant" else per_expert_rows(model, name, shape)


def _stored_experts(
    model: torch.nn.Module, source: ModuleType, specs: list[TensorSpec], config: QuantConfig, raw_of: dict[str, str]
) -> tuple[dict[str, tuple[tuple[int, int, int], list | None]], set[str]]:
    """({experts tensor: (shape [E, N, K], its per-expert source tensors)} of the experts stored
    quantized in the source, and the stored names of all their source tensors). raw_of: {model
    name: stored name} where transformers' rules rename (save_pretrained writes Mixtral's `mlp`
    as `block_sparse_moe`)."""
    present = {spec.name for spec in specs}
    modules = dict(model.named_modules())
    found, names = {}, set()
    for name in expert_names_of(model):
        owner, _, proj = name.rpartition(".")
        shape = tuple(getattr(modules[owner], proj).shape)
        rows = _rows(model, source, name, shape)
        members = [raw_of.get(n, n) for n in source_names(source, name, rows, config) if raw_of.get(n, n) in present]
        if members:
            found[name] = (shape, rows)
            names.update(members)
    return found, names


def convert_checkpoint(
    src: str,
    out: str | Path,
    fmt: str,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertSummary:
    """Rewrite the quantized checkpoint at `src` into the folder `out` in format `fmt`."""
    start = time.perf_counter()
    out = Path(out).expanduser()
    target = get_format(fmt)
    max_bytes = parse_size(max_shard_size)
    source_dir = resolve_source(src)
    check_output(out, source_dir, overwrite)
    model_config = read_quantized_config(source_dir)
    source_qc = model_config["quantization_config"]
    source = get_format(detect_format(source_qc))
    side_files(source_dir)  # a link out of the source is refused now, before writing
    files = weight_files(source_dir)
    reader = source_reader(files)
    specs = tensor_specs(files)
    model = meta_model(source_dir)
    shapes = linear_shapes(model)
    parsed = source.parse_config(source_qc)
    stacked = [f"{name.rpartition('.')[0]}.{b}" for name in expert_names_of(model) for b in _stacked_names(name)]
    conversion = Conversion(model, [spec.name for spec in specs], extra=stacked)
    raw_of = {key: g.sources[0] for key, g in conversion.groups.items() if g.converter is None}
    experts, expert_names = _stored_experts(model, source, specs, parsed, raw_of)
    specs = [spec for spec in specs if spec.name not in expert_names]  # converted by `_convert_experts`
    layers = find_layers(specs, source, shapes)
    # the float tensors (embeddings, norms, head) must be the model's, as quantize checks them,
    # under the model's names (transformers' renames, e.g. GPT-NeoX's embed_out)
    members = owned(layers)
    model_name = {raw: key for key, raw in raw_of.items()}
    check_shapes(
        [TensorSpec(model_name.get(s.name, s.name), s.dtype, s.shape) for s in specs if s.name not in members],
        float_plan(model, layers, set(expert_names_of(model))),
        source_dir / "config.json",
    )
    router_modules = router_linears(model)
    routers = {module_name for module_name, module in model.named_modules() if module in router_modules}
    kept = sorted(name for name in shapes if name not in layers and name not in routers)  # routers: always float
    kept += sorted(
        {name.rpartition(".")[0] for name in expert_names_of(model)} - {n.rpartition(".")[0] for n in experts}
    )
    # llmquant's method as llmquant wrote it (GPTQ: meta.method, the top-level `method` being GPTQModel's)
    method = (
        (source_qc.get("meta") or {}).get("method")
        or (source_qc.get("provenance") or {}).get("method")
        or source_qc.get("method")
        or "rtn"
    )
    config = QuantConfig(
        bits=parsed.bits, group_size=parsed.group_size, sym=parsed.sym, method=method, modules_to_not_convert=kept
    )
    output_specs, steps = plan(specs, layers, source, target, config)
    by_name = {spec.name: spec for spec in tensor_specs(files)}
    for name, (shape, source_rows) in experts.items():  # after the other tensors: order does not matter to loaders
        scale = next(by_name[raw_of.get(n, n)] for n in source_names(source, name, source_rows, config) if "scale" in n)
        output_specs += expert_specs(target, name, shape, _rows(model, target, name, shape), scale.dtype, config)
        steps.append(("experts", name))
    summary = ConvertSummary(
        source.NAME, target.NAME, len(layers) + len(experts), warnings=target.engine_warnings(config)
    )

    with staged_output(out, overwrite) as staging:
        writer = ShardedWriter(staging, output_specs, max_bytes)
        bar = progress_bar(total=len(layers), enabled=progress, desc=f"{source.NAME} -> {target.NAME}", unit="layer")
        for kind, item in steps:
            if kind == "copy":
                writer.write(item, read_tensor(reader, item))
                continue
            if kind == "experts":
                shape, source_rows = experts[item]

                def read(name: str) -> torch.Tensor | None:
                    stored = raw_of.get(name, name)
                    return read_tensor(reader, stored) if stored in reader else None

                packed = import_experts(source, item, shape, source_rows, read, config, source_qc)
                target_rows = _rows(model, target, item, shape)
                for key, tensor in export_experts(target, item, shape, target_rows, packed, config).items():
                    writer.write(key, tensor)
                bar.update(1)
                continue
            layer: Layer = item
            stored = reader.read([name for m, name in layer.members.items() if m != "bias"])
            tensors = {m: stored[name] for m, name in layer.members.items() if m != "bias"}
            packed = source.import_layer(layer.module, tensors, layer.n, layer.k, config, source_qc)
            # the same checks as loading (shapes, dtypes, values): nothing is carried over unchecked
            check_packed(layer.module, packed, layer.n, layer.k, config)
            for suffix, tensor in target.export_layer(layer.module, packed, layer.n, layer.k, config).items():
                writer.write(f"{layer.module}.{suffix}", tensor)
            if layer.has_bias:
                writer.write(layer.members["bias"], read_tensor(reader, layer.members["bias"]))
            elif "bias" in layer.members and bool(read_tensor(reader, layer.members["bias"]).any()):
                # GPTQ writers store a zero bias even for bias-free layers: dropped; a real one is not
                raise FormatError(f"{layer.members['bias']} is non-zero but the model's layer has no bias")
            bar.update(1)
        bar.close()
        writer.close()
        summary.bytes_after = writer.total_bytes
        model_config["quantization_config"] = target.quantization_config(config, list(layers))
        (staging / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
        copy_side_files(source_dir, staging)
        write_model_card(
            staging / "README.md", base_model=card_base_model(source_dir, src), config=config, summary=None,
            fmt=target.NAME, quantization_config=model_config["quantization_config"], converted_from=src,
        )
    summary.seconds = time.perf_counter() - start
    return summary
