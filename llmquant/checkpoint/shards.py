"""A streaming safetensors writer: tensors go to disk one at a time, never a whole shard in memory.

safetensors' own `save_file` needs every tensor of a file at once; a quantized checkpoint is
written tensor by tensor instead, from a plan of names, dtypes and shapes known up front (the
header of each file is written first, then the data in plan order). The files are ordinary
safetensors (8-byte little-endian header length, JSON header, data), sharded the Hugging Face
way (`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a tensor to be written."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Split specs, in order, into shards of at most max_bytes (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: list[TensorSpec]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        entries[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


class ShardedWriter:
    """Writes the planned tensors into `folder`, in plan order, one `write` call per tensor."""

    def __init__(self, folder: Path, specs: list[TensorSpec], max_bytes: int) -> None:
        seen: set[str] = set()
        for spec in specs:  # two entries of one name would make an unreadable header (or a lost tensor)
            if spec.name in seen:
                raise ValueError(f"tensor {spec.name!r} is planned twice; a checkpoint holds each name once")
            seen.add(spec.name)
        self.folder = folder
        self.shards = plan_shards(specs, max_bytes)
        count = len(self.shards)
        self.names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        self.total_bytes = sum(spec.nbytes for spec in specs)
        self._shard = -1
        self._next = 0
        self._file: BinaryIO | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._file is None or self._next == len(self.shards[self._shard]):
            self._open_next()
        spec = self.shards[self._shard][self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (spec.name, spec.dtype, spec.shape):
            raise RuntimeError(
                f"tensor {name} {tensor.dtype} {tuple(tensor.shape)} does not match the plan: "
                f"{spec.name} {spec.dtype} {spec.shape}"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        self._shard += 1
        if self._shard >= len(self.shards):
            raise RuntimeError("more tensors written than planned")
        self._file = open(self.folder / self.names[self._shard], "wb")  # noqa: SIM115 (closed in close())
        self._file.write(_header(self.shards[self._shard]))
        self._next = 0

    def close(self) -> None:
        """Finish the last file, check every planned tensor was written, write the index."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._shard != len(self.shards) - 1 or self._next != len(self.shards[-1]):
            raise RuntimeError("fewer tensors written than planned")
        if len(self.shards) > 1:
            weight_map = {
                spec.name: file for file, shard in zip(self.names, self.shards, strict=True) for spec in shard
            }
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max shard size {size!r} is not a size like '2GB' or '500MB'")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_KMGT".index(unit.upper() or "_"))
