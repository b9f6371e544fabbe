"""Reading a floating-point source checkpoint: find the folder, its config and its weight tensors.

Everything here reads, nothing writes. Tensors are yielded one at a time from safetensors (or,
for old checkpoints, from PyTorch files opened with `weights_only=True`), so a caller can stream
a model of any size.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError, first_line
from ..hub import HUB_ID, looks_like_path
from .shards import DTYPES, TensorSpec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def resolve_source(src: str) -> Path:
    """A local folder, or a Hub id fetched (or found in the cache) with huggingface_hub."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"source {src!r} is a file; pass the model folder")
    if looks_like_path(src) or not HUB_ID.match(src):
        raise CheckpointError(f"source folder {src!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as error:  # the Hub client raises many types; all mean "could not get it"
        raise CheckpointError(
            f"source {src!r} is not a local folder and could not be fetched from the Hub: {first_line(error)}"
        ) from None


def _hub_blobs(src: Path) -> Path | None:
    """The `blobs` folder of the Hub cache repo when `src` is one of its snapshots
    (`models--ORG--NAME/snapshots/REVISION`), else None."""
    snapshots = src.resolve().parent
    repo = snapshots.parent
    if snapshots.name == "snapshots" and repo.name.startswith(("models--", "datasets--", "spaces--")):
        return repo / "blobs"
    return None


def check_inside(path: Path, src: Path) -> None:
    """Refuse a file of the source folder `src` that is a symbolic link resolving outside it.

    What is read from the source ends up in the output folder, the one users publish: a link such
    as `special_tokens_map.json -> /etc/passwd` or `notes.txt -> ~/private.txt` would publish a
    file that is not the model's. Allowed: regular files, links resolving inside `src`, and the Hub
    cache's own layout, where every file of `snapshots/REVISION/` links to `../../blobs/HASH` of
    the same repo. Refused rather than skipped (with a warning): the user asked for the folder as
    it is, and an output silently lacking a tokenizer file is as broken as one that holds the
    wrong file; the error names the link so it can be replaced by a copy or removed."""
    if not path.is_symlink():
        return
    target, root = path.resolve(), src.resolve()
    if root in target.parents:
        return
    blobs = _hub_blobs(src)
    if blobs is not None and target.parent == blobs.resolve():
        return
    raise CheckpointError(
        f"{path} is a symbolic link outside the source folder (to {target}); refusing to read it into the output "
        "(copy the file into the folder, or remove the link)"
    )


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object, as a dict (CheckpointError naming the file otherwise)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {first_line(error)}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got a {type(value).__name__}")
    return value


def read_model_config(src: Path, links: bool = False) -> dict:
    """config.json of a model folder, a JSON object whose quantization_config, when present, is an
    object too; CheckpointError naming the file otherwise (missing, unreadable, or, unless `links`
    (a folder only read, never copied to an output), a link out of `src`: `check_inside`)."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} not found: the source is not a Hugging Face model folder")
    if not links:
        check_inside(config_path, src)
    config = read_json_object(config_path)
    quantization = config.get("quantization_config")
    if quantization not in (None, {}) and not isinstance(quantization, dict):
        raise CheckpointError(f"{config_path}: quantization_config must be an object, got {quantization!r}")
    return config


def read_config(src: Path) -> dict:
    """config.json of a floating-point model folder (an already quantized one is refused)."""
    config = read_model_config(src)
    quantization = config.get("quantization_config")
    if quantization in (None, {}):
        return config
    method = quantization.get("quant_method", "unknown")
    raise CheckpointError(f"{src} is already quantized (quant_method {method!r}); quantize a floating-point model")


def read_quantized_config(src: Path) -> dict:
    """config.json of a quantized model folder (a floating-point one is refused)."""
    config = read_model_config(src)
    if not config.get("quantization_config"):
        raise CheckpointError(f"{src} is not quantized (no quantization_config); use `llmquant quantize`")
    return config


def meta_model(src: Path, dtype: torch.dtype | None = None, buffers_on_cpu: bool = False) -> torch.nn.Module:
    """The floating-point model described by src/config.json (its quantization_config ignored),
    parameters on the meta device (no memory, no weights); with `buffers_on_cpu`, buffers are
    created on CPU (non-persistent ones such as rotary frequencies computed, as loading would).
    CheckpointError naming config.json when transformers cannot build it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(src)
        if hasattr(model_config, "quantization_config"):
            del model_config.quantization_config  # the skeleton is the float architecture
        kwargs = {} if dtype is None else {"dtype": dtype}
        if buffers_on_cpu:
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):
                return AutoModelForCausalLM.from_config(model_config, **kwargs)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config, **kwargs)
    except Exception as error:
        raise CheckpointError(f"cannot build the model described by {src / 'config.json'}: {error}") from None


# Files that sit beside the weights in many repos but are not the model: adapters, a
# consolidated copy of the shards, trainer state. Reading them would merge or duplicate tensors.
NOT_MODEL_WEIGHTS = re.compile(
    r"^(adapter_model|consolidated|optimizer|scheduler|scaler|training_args|rng_state|trainer_state)\b"
)


def weight_files(src: Path) -> list[Path]:
    """The files holding the model's weights, as transformers would load them: the files named by
    model.safetensors.index.json (or pytorch_model.bin.index.json) when there is one, else the
    safetensors files (else PyTorch files, read weights_only) that are not adapters, consolidated
    copies or training state."""
    for index_name in WEIGHT_INDEXES:
        index_path = src / index_name
        if index_path.is_file():
            check_inside(index_path, src)
            return _checked_inside(_indexed_files(index_path), src)
    for suffixes in ((".safetensors",), (".bin", ".pt", ".pth")):
        files = sorted(
            p for p in src.iterdir() if p.is_file() and p.suffix in suffixes and not NOT_MODEL_WEIGHTS.match(p.name)
        )
        if files:
            return _checked_inside(files, src)
    raise CheckpointError(f"no weights in {src}: expected model.safetensors (or an index, or pytorch_model.bin)")


def _checked_inside(files: list[Path], src: Path) -> list[Path]:
    for path in files:
        check_inside(path, src)
    return files


def _indexed_files(index_path: Path) -> list[Path]:
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to file names")
    files = []
    for name in dict.fromkeys(weight_map.values()):
        path = index_path.parent / name
        if Path(name).name != name or not path.is_file():
            raise CheckpointError(f"{index_path} names {name!r}, which is not a file beside it")
        files.append(path)
    return files


def safetensors_names(path: Path) -> list[str]:
    """The tensor names of a safetensors file, or CheckpointError naming it (truncated, not safetensors)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:  # SafetensorError and OSError
        raise CheckpointError(f"cannot read {path}: {error}") from None


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every file, one at a time, naming a bad file."""
    for path in files:
        if path.suffix == ".safetensors":
            for name in safetensors_names(path):
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
                # mmap needs the zip format; a legacy (pre-1.6) file is read whole, still weights_only
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            except Exception as error:
                raise CheckpointError(f"cannot read {path} as a weights-only PyTorch file: {error}") from None
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise CheckpointError(f"{path} does not hold a state dict of tensors")
            yield from state.items()


class TensorReader:
    """Reads named tensors of a source checkpoint on demand: only those tensors' bytes from
    safetensors files (a PyTorch file is memory-mapped once and kept, weights_only)."""

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, Path] = {}
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        for path in files:
            if path.suffix == ".safetensors":
                names = safetensors_names(path)
            else:
                self._loaded[path] = dict(iter_tensors([path]))
                names = list(self._loaded[path])
            self._where.update(dict.fromkeys(names, path))

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """{name: tensor} (CPU, the stored dtype) for `names`; CheckpointError naming a missing one."""
        missing = [name for name in names if name not in self._where]
        if missing:
            raise CheckpointError(f"tensor {missing[0]!r} is not in the checkpoint; is the checkpoint complete?")
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._where[name], []).append(name)
        tensors = {}
        for path, file_names in by_file.items():
            if path in self._loaded:
                tensors.update((name, self._loaded[path][name]) for name in file_names)
                continue
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in file_names:
                        tensors[name] = handle.get_tensor(name)
            except Exception as error:
                raise CheckpointError(f"cannot read {file_names[0]!r} from {path}: {error}") from None
        return tensors


def tensor_specs(files: list[Path]) -> list[TensorSpec]:
    """Name, dtype and shape of every source tensor, in file order, without reading the data.
    A tensor name held by two files is refused, naming both."""
    specs, seen = [], {}
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as handle:
                    file_specs = []
                    for name in handle.keys():
                        view = handle.get_slice(name)
                        file_specs.append(TensorSpec(name, DTYPES[view.get_dtype()], tuple(view.get_shape())))
            except KeyError as error:
                raise CheckpointError(f"{path}: unsupported tensor dtype {error}") from None
            except Exception as error:  # SafetensorError and OSError: truncated or not safetensors
                raise CheckpointError(f"cannot read {path}: {error}") from None
        else:
            file_specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in iter_tensors([path])]
        for spec in file_specs:
            if spec.name in seen:
                raise CheckpointError(
                    f"tensor {spec.name!r} is in both {seen[spec.name].name} and {path.name}; "
                    "remove the extra copy (or give the folder a model.safetensors.index.json)"
                )
            seen[spec.name] = path
        specs += file_specs
    return specs
