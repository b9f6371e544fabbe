"""`llmquant quantize`: a checkpoint on disk into a publishable llmquant folder, tensor by tensor.

The source model is never built in memory: a meta-device skeleton says which tensors belong
to quantizable nn.Linear layers (`plan.py`), and each tensor is read from its shard
(`source.py`), quantized if it is one of those, and written to the output shards (`shards.py`)
inside a staging folder that is renamed into place only when complete (`publish.py`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibration.data import CalibrationSet, check_seqlen_for
from ..config import QuantConfig
from ..formats import get_format
from ..formats.experts import export_experts
from ..kernels.layout import bits_from_bytes
from ..methods.codes import check_finite, quantize_weight
from ..methods.presets import get_preset
from ..progress import progress_bar
from .calibrated import precompute_packed
from .conversion import Conversion
from .modelcard import write_model_card
from .plan import check_shapes, expert_rows, output_specs, quantizable_weights
from .publish import check_output, copy_side_files, side_files, staged_output
from .shards import ShardedWriter, TensorSpec, parse_size
from .source import TensorReader, iter_tensors, read_config, resolve_source, tensor_specs, weight_files


@dataclass
class Summary:
    """What `quantize_checkpoint` did."""

    params_quantized: int = 0
    params_total: int = 0
    quantized_bytes: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    layers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits (codes + scales + zeros) per weight of the quantized layers (`layout.bits_from_bytes`)."""
        return bits_from_bytes(self.quantized_bytes, self.params_quantized)


def _model_tensors(files: list[Path], conversion: Conversion) -> Iterator[tuple[str, torch.Tensor]]:
    """(model tensor name, tensor) in the planned order: the stored tensors one at a time, or,
    when transformers' rules rename or merge some (conversion.py), each group as it is converted
    (a layer's experts at once)."""
    if not conversion.renames_anything:
        yield from iter_tensors(files)
        return
    for _, tensors in conversion.iter_converted(TensorReader(files)):
        yield from tensors.items()


def quantize_checkpoint(
    src: str,
    out: str | Path,
    config: QuantConfig,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    calibration=None,
    fmt: str = "llmquant",
) -> Summary:
    """Quantize the checkpoint at `src` (folder or Hub id) into the folder `out`, written in
    format `fmt`: "llmquant", "gptq" or "compressed-tensors" (llmquant/formats/).

    Calibrated methods (`get_method(config.method).calibrated`) compute every packed tensor first
    from the float model, block by block (`calibrated.py`; `calibration`: a CalibrationSet or a
    callable returning one, called once the plan is checked; default c4 from the Hub); the loop
    below then writes those instead of quantizing."""
    start = time.perf_counter()
    out = Path(out).expanduser()
    max_bytes = parse_size(max_shard_size)
    # Every check that can fail runs before the first byte is written.
    source = resolve_source(src)
    model_config = read_config(source)
    check_output(out, source, overwrite)
    side_files(source)  # a link out of the source is refused now, not after the work
    # a callable is checked once called (calibrated.py)
    if isinstance(calibration, CalibrationSet) and get_preset(config.method).calibrated:
        check_seqlen_for(source, calibration.tokens.shape[1])
    files = weight_files(source)
    skeleton = quantizable_weights(source, config)
    targets = skeleton.targets
    # llmquant's own config keeps the names as given (suffixes match); GPTQ and compressed-tensors
    # readers match full module names, so those formats get every float linear by its full name.
    kept = skeleton.skip if fmt == "llmquant" else skeleton.float_linears
    saved_config = QuantConfig(**{**config.to_dict(), "modules_to_not_convert": kept})
    # the source's tensors under the model's names, as from_pretrained converts them (conversion.py)
    stored_specs = tensor_specs(files)
    conversion = Conversion(skeleton.model, [spec.name for spec in stored_specs])
    source_specs = [spec for _, group_specs in conversion.specs(stored_specs) for spec in group_specs]
    check_shapes(source_specs, skeleton, source / "config.json")
    layout = get_format(fmt)
    layout.check_model(list(targets.values()), kept)
    # a Conv1D weight [K, N] is planned, quantized and written as the linear weight [N, K] it is
    as_linear = [
        TensorSpec(spec.name, spec.dtype, spec.shape[::-1]) if spec.name in skeleton.transposed else spec
        for spec in source_specs
    ]
    specs = output_specs(as_linear, targets, config, fmt, skeleton)
    precomputed, changed, added = {}, {}, {}
    if get_preset(config.method).calibrated:
        scale_dtype = next(spec.dtype for spec in source_specs if spec.name in targets or spec.name in skeleton.experts)
        precomputed, changed, record = precompute_packed(source, config, scale_dtype, calibration, progress)
        saved_config.calibration = record
        # tensors the source lacks (a rotated model's head, tied to the embedding before): written last
        stored = {spec.name for spec in source_specs}
        added = {name: value for name, value in changed.items() if name not in stored}
        specs += [TensorSpec(name, value.dtype, tuple(value.shape)) for name, value in added.items()]

    summary = Summary(warnings=layout.engine_warnings(saved_config))
    with staged_output(out, overwrite) as staging:
        writer = ShardedWriter(staging, specs, max_bytes)
        bar = progress_bar(
            total=len(targets) + len(skeleton.experts), enabled=progress, desc="quantizing", unit="layer"
        )
        for name, tensor in _model_tensors(files, conversion):
            summary.bytes_before += tensor.numel() * tensor.element_size()
            summary.params_total += tensor.numel()
            if name in skeleton.experts:
                packed_experts = precomputed.pop(name, None) or [
                    quantize_weight(w, config.bits, config.group_size, config.sym, name=f"{name}[{e}]")
                    for e, w in enumerate(tensor)
                ]
                rows = expert_rows(skeleton, name, fmt)
                for key, value in export_experts(
                    layout, name, tensor.shape, rows, packed_experts, saved_config
                ).items():
                    writer.write(key, value)
                    summary.quantized_bytes += value.numel() * value.element_size()
                summary.params_quantized += tensor.numel()
                summary.layers.append(name)
                bar.update(1)
                continue
            if name not in targets:
                if tensor.is_floating_point():
                    check_finite(tensor, name, refusing="write a checkpoint with it")  # NaN in a norm: every output
                writer.write(name, changed[name].to(tensor.dtype) if name in changed else tensor)
                continue
            if name in skeleton.transposed:
                tensor = tensor.t().contiguous()
            packed = precomputed.pop(name, None) or quantize_weight(
                tensor, config.bits, config.group_size, config.sym, method=config.method, name=name
            )
            module = targets[name]
            packed = layout.export_layer(module, packed, *tensor.shape, saved_config)
            for key, value in packed.items():
                writer.write(f"{module}.{key}", value)
                summary.quantized_bytes += value.numel() * value.element_size()
            summary.params_quantized += tensor.numel()
            summary.layers.append(module)
            bar.update(1)
        bar.close()
        for name, value in added.items():
            check_finite(value, name, refusing="write a checkpoint with it")
            writer.write(name, value)
            summary.params_total += value.numel()
        writer.close()
        summary.bytes_after = writer.total_bytes
        model_config["quantization_config"] = layout.quantization_config(saved_config, list(targets.values()))
        if added:  # the head has its own tensor now
            model_config["tie_word_embeddings"] = False
        (staging / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
        copy_side_files(source, staging)
        write_model_card(
            staging / "README.md", base_model=src, config=saved_config, summary=summary, fmt=fmt,
            quantization_config=model_config["quantization_config"],
        )
    summary.seconds = time.perf_counter() - start
    return summary
