"""Reading a floating-point source checkpoint: find the folder, its config and its weight tensors.

Everything here reads, nothing writes. Tensors are yielded one at a time from safetensors (or,
for old checkpoints, from PyTorch files opened with `weights_only=True`), so a caller can stream
a model of any size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError, first_line
from .shards import DTYPES, TensorSpec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


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
    """config.json of a floating-point model folder (an already quantized one is refused)."""
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
