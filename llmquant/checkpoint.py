"""Quantize a checkpoint on disk into a publishable llmquant folder, streaming tensor by tensor.

The source model is never built in memory: a meta-device skeleton says which tensors belong
to quantizable nn.Linear layers, and each tensor is read from its safetensors shard, quantized
if it is one of those, and written to the output shards. Output goes to a temporary folder
beside OUT that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .config import QuantConfig
from .convert import linear_layers, modules_to_skip
from .errors import first_line
from .kernels.pack import num_groups, packed_rows
from .modelcard import write_model_card
from .quantize import quantize_weight
from .shards import DTYPES, ShardedWriter, TensorSpec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CheckpointError(ValueError):
    """A problem with the user's input, reported as one line (the CLI exits with code 2)."""


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

    @property
    def bits_per_weight(self) -> float:
        """Stored bits (codes + scales + zeros) per weight of the quantized layers."""
        return 8 * self.quantized_bytes / max(self.params_quantized, 1)


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
    if not match:
        raise CheckpointError(f"max shard size {size!r} is not a size like '2GB' or '500MB'")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_KMGT".index(unit.upper() or "_"))


def resolve_source(src: str) -> Path:
    """A local folder, or a Hub id fetched (or found in the cache) with huggingface_hub."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"source {src!r} is a file; pass the model folder")
    if not HUB_ID.match(src):
        raise CheckpointError(f"source folder {src!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as error:  # the Hub client raises many types; all mean "could not get it"
        raise CheckpointError(
            f"source {src!r} is not a local folder and could not be fetched from the Hub: {first_line(error)}"
        ) from None


def read_config(src: Path) -> dict:
    config_path = src / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} not found: the source is not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {config_path}: {error}") from None
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "unknown")
        raise CheckpointError(f"{src} is already quantized (quant_method {method!r}); quantize a floating-point model")
    return config


def weight_files(src: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors if any, else PyTorch .bin (read weights_only)."""
    safetensors = sorted(src.glob("*.safetensors"))
    if safetensors:
        return safetensors
    pickles = sorted(p for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        return pickles
    raise CheckpointError(f"no weights in {src}: expected *.safetensors (or pytorch_model*.bin)")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every file, one at a time, naming a bad file."""
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as handle:
                    names = list(handle.keys())
            except Exception as error:  # SafetensorError and OSError: truncated or not safetensors
                raise CheckpointError(f"cannot read {path}: {error}") from None
            for name in names:
                try:
                    # A handle per tensor: the file's memory map is released after each read, so
                    # the pages of tensors already written do not stay resident until the end.
                    with safe_open(str(path), framework="pt") as handle:
                        tensor = handle.get_tensor(name)
                except Exception as error:
                    raise CheckpointError(f"cannot read tensor {name!r} from {path}: {error}") from None
                yield name, tensor
        else:
            try:
                # weights_only: never unpickle arbitrary objects from a .bin checkpoint
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:
                raise CheckpointError(f"cannot read {path} as a weights-only PyTorch file: {error}") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{path} does not hold a state dict")
            yield from state.items()


def quantizable_weights(src: Path, config: QuantConfig) -> tuple[dict[str, str], list[str]]:
    """{checkpoint tensor name of a Linear weight: module name} from a meta skeleton of the
    model, and the resolved modules_to_not_convert."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(src)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except Exception as error:
        raise CheckpointError(f"cannot build the model described by {src / 'config.json'}: {error}") from None
    layers = linear_layers(model, config)
    return {f"{name}.weight": name for name, _ in layers}, modules_to_skip(model, config)


def tensor_specs(files: list[Path]) -> list[TensorSpec]:
    """Name, dtype and shape of every source tensor, in file order, without reading the data."""
    specs = []
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in handle.keys():
                        view = handle.get_slice(name)
                        specs.append(TensorSpec(name, DTYPES[view.get_dtype()], tuple(view.get_shape())))
            except KeyError as error:
                raise CheckpointError(f"{path}: unsupported tensor dtype {error}") from None
            except Exception as error:  # SafetensorError and OSError: truncated or not safetensors
                raise CheckpointError(f"cannot read {path}: {error}") from None
        else:
            specs += [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in iter_tensors([path])]
    return specs


def output_specs(source: list[TensorSpec], targets: dict[str, str], config: QuantConfig) -> list[TensorSpec]:
    """What the quantized checkpoint holds: each target weight becomes qweight, scales (in the
    weight's dtype) and, asymmetric, qzeros; every other tensor is copied."""
    specs = []
    for spec in source:
        if spec.name not in targets:
            specs.append(spec)
            continue
        if len(spec.shape) != 2 or not spec.dtype.is_floating_point:
            raise CheckpointError(f"tensor {spec.name!r} is {spec.dtype} {spec.shape}, not a 2-D float linear weight")
        n, k = spec.shape
        module, groups = targets[spec.name], num_groups(k, config.group_size)
        specs.append(TensorSpec(f"{module}.qweight", torch.int32, (packed_rows(k, config.bits), n)))
        specs.append(TensorSpec(f"{module}.scales", spec.dtype, (groups, n)))
        if not config.sym:
            specs.append(TensorSpec(f"{module}.qzeros", torch.uint8, (groups, n)))
    return specs


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template...: every top-level file but weights,
    weight indexes, config.json (rewritten) and README.md (replaced by the model card)."""
    for path in src.iterdir():
        if (
            path.is_file()
            and path.suffix not in WEIGHT_SUFFIXES
            and path.name not in (*WEIGHT_INDEXES, "config.json", "README.md")
            and not path.name.startswith(".")
        ):
            shutil.copyfile(path, dst / path.name)


def quantize_checkpoint(
    src: str,
    out: str | Path,
    config: QuantConfig,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Summary:
    """Quantize the checkpoint at `src` (folder or Hub id) into the folder `out`."""
    start = time.perf_counter()
    out = Path(out).expanduser()
    max_bytes = parse_size(max_shard_size)
    if out.exists() and not overwrite:
        raise CheckpointError(f"output {out} already exists; pass --overwrite to replace it")
    source = resolve_source(src)
    model_config = read_config(source)
    files = weight_files(source)
    targets, skip = quantizable_weights(source, config)
    saved_config = QuantConfig(**{**config.to_dict(), "modules_to_not_convert": skip})

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    summary = Summary()
    try:
        source_specs = tensor_specs(files)
        missing = sorted(set(targets) - {spec.name for spec in source_specs})
        if missing:
            raise CheckpointError(
                f"{len(missing)} linear weights of the model are not in the checkpoint (first: {missing[0]!r}); "
                "is the checkpoint complete?"
            )
        writer = ShardedWriter(staging, output_specs(source_specs, targets, config), max_bytes)
        bar = tqdm(total=len(targets), desc="quantizing", unit="layer", disable=not progress)
        for name, tensor in iter_tensors(files):
            summary.bytes_before += tensor.numel() * tensor.element_size()
            summary.params_total += tensor.numel()
            if name not in targets:
                writer.write(name, tensor)
                continue
            packed = quantize_weight(
                tensor, config.bits, config.group_size, config.sym, method=config.method, name=name
            )
            module = targets[name]
            for key, value in packed.items():
                writer.write(f"{module}.{key}", value)
                summary.quantized_bytes += value.numel() * value.element_size()
            summary.params_quantized += tensor.numel()
            summary.layers.append(module)
            bar.update(1)
        bar.close()
        writer.close()
        summary.bytes_after = writer.total_bytes
        model_config["quantization_config"] = saved_config.to_dict()
        (staging / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
        copy_side_files(source, staging)
        write_model_card(staging / "README.md", base_model=src, config=saved_config, summary=summary)
        for path in staging.iterdir():
            path.chmod(0o644)  # safetensors writes owner-only files; a published folder is readable
        staging.chmod(0o755)
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            staging.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary.seconds = time.perf_counter() - start
    return summary
