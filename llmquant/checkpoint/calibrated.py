"""`llmquant quantize --method gptq`: the packed tensors of a calibrated method, computed up front.

Calibrated methods need activations, so the streaming writer cannot quantize one tensor at a
time from disk. Route: build the model as a weightless skeleton (parameters on the meta device;
buffers such as rotary frequencies computed on CPU, as loading would), read from the source
files only what runs before the first decoder block (embeddings) to capture the calibration
activations, then quantize block by block (`llmquant.calibration.loop`), each block read from the
source files straight to the compute device in float32 and freed (back to meta) when done.
Peak memory: about one block and its activations above the streaming writer's; the packed
results are kept (about a quarter of the float weights at int4 over fp16) and handed to the
writer, which writes them in place of quantizing, so the output layout is the same as for rtn.
Scales are rounded to the source weights' dtype.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..calibration.capture import decoder_blocks
from ..calibration.data import CalibrationSet, check_seqlen_for, load_calibration
from ..calibration.loop import quantize_blocks
from ..config import QuantConfig
from ..errors import first_line
from ..methods.blocks import module_name
from ..methods.codes import pack
from ..methods.presets import get_preset
from .conversion import Conversion, ConvertedReader
from .source import TensorReader, meta_model, tensor_specs, weight_files


def skeleton(src: Path) -> nn.Module:
    """The float32 model described by src/config.json with every parameter and persistent
    buffer on the meta device, in eval mode; non-persistent buffers are computed on CPU."""
    return meta_model(src, dtype=torch.float32, buffers_on_cpu=True).eval()


def _stored_names(module: nn.Module) -> list[str]:
    """Names of the tensors a checkpoint holds for `module` (its state dict)."""
    return list(module.state_dict(keep_vars=True))


def _get(module: nn.Module, name: str) -> torch.Tensor:
    owner_name, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner_name), attr)


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer `name` of `module` by `value` (a parameter stays one)."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def materialise(
    module: nn.Module, names: list[str], reader: TensorReader | ConvertedReader, prefix: str, device
) -> None:
    """Give `module`'s tensors `names` their values from the source tensors `prefix + name`, on
    `device`, floating-point ones in the skeleton's dtype (as from_pretrained(dtype=...) would)."""
    tensors = reader.read([prefix + name for name in names])
    for name in names:
        value = tensors.pop(prefix + name)
        dtype = _get(module, name).dtype if value.is_floating_point() else value.dtype
        _set(module, name, value.to(device=device, dtype=dtype))


def return_freed_memory() -> None:
    """Hand memory freed on the C heap back to the OS (glibc malloc_trim; a no-op elsewhere).

    glibc raises its mmap threshold after a large free, so the next blocks' tensors come from
    the heap, whose freed pages it keeps: measured on SmolLM2, reading and freeing 30 blocks
    grew the resident set by ~360 MiB without this, not at all with it."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def map_large_allocations() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mapping, returned to the
    OS when freed (a no-op elsewhere). Process-wide, for the quantizing process.

    Setting the threshold also stops glibc from raising it after large frees, so a block's
    activations (MLP intermediates of 96 MiB on SmolLM2 at 64 x 256 tokens) no longer land on a
    heap that keeps their pages until the next malloc_trim; page faults on every large tensor
    instead. evals/results/quantize-memory-smollm2.md: gptq peak 1020 MiB, 1078 MiB before."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (find_library runs ldconfig: not something to do per block)."""
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


class SourceBlocks:
    """A `BlockStore` (llmquant.calibration.stores) for a skeleton: each block is read from the source
    files when its turn comes and returned to the meta device (freed) after."""

    def __init__(self, reader: TensorReader | ConvertedReader, prefix: str, head: bool = False) -> None:
        self.reader, self.prefix, self.head = reader, prefix, head

    @contextlib.contextmanager
    def embeddings(self, model: nn.Module) -> Iterator[None]:
        """Everything outside the decoder blocks but the linear layers (the head runs after the
        last block), on CPU while entered; with `head`, also the output head's tensors stored in
        the source (rotations rewrite it; a tied head has none)."""
        linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        tied = set()  # the head's tensors a tied source does not store
        if self.head:
            head = model.get_output_embeddings()
            head_name = module_name(model, head)
            linears.discard(head_name)
            tied = {f"{head_name}.{n}" for n in _stored_names(head) if f"{head_name}.{n}" not in self.reader}
        names = [
            name
            for name in _stored_names(model)
            if not name.startswith(self.prefix + ".") and name.rpartition(".")[0] not in linears and name not in tied
        ]
        materialise(model, names, self.reader, "", "cpu")
        try:
            yield
        finally:
            for name in names:  # freed: back to the meta device
                _set(model, name, torch.empty_like(_get(model, name), device="meta"))

    def load(self, index: int, block: nn.Module, device: torch.device) -> nn.Module:
        materialise(block, _stored_names(block), self.reader, f"{self.prefix}.{index}.", device)
        return block.to(device)  # non-persistent buffers, computed on CPU

    def release(self, index: int, block: nn.Module, work: nn.Module) -> None:
        block.to("meta")
        return_freed_memory()


def precompute_packed(
    src: Path,
    config: QuantConfig,
    scale_dtype: torch.dtype,
    calibration: CalibrationSet | Callable[[], CalibrationSet] | None = None,
    progress: bool = True,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict]:
    """{"<module>.weight": packed tensors} for every quantized linear of the model in `src`,
    {tensor name: new float value} for tensors the method changed (norm weights under awq
    scaling; under rotations also the embedding and the head, which a tied source lacks), and
    the calibration record (dataset, samples, tokens, seed).

    calibration: default `load_calibration(tokenizer of src)` (c4 from the Hub); a callable is called
    here, so that a caller can defer loading it until the plan is checked.
    """
    from transformers import AutoTokenizer

    if callable(calibration):
        calibration = calibration()
    if calibration is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(src)
        except Exception as error:
            raise ValueError(f"{src}: a calibrated method needs the model's tokenizer: {first_line(error)}") from None
        calibration = load_calibration(tokenizer)
    check_seqlen_for(src, calibration.tokens.shape[1])
    map_large_allocations()
    model = skeleton(src)
    prefix, _ = decoder_blocks(model)
    files = weight_files(src)
    specs = tensor_specs(files)
    # the model's tensor names, read as from_pretrained converts them (renames, merged experts)
    reader = ConvertedReader(TensorReader(files), Conversion(model, [spec.name for spec in specs]), specs)
    store = SourceBlocks(reader, prefix, head=get_preset(config.method).rotation)
    changed: dict[str, torch.Tensor] = {}
    results = quantize_blocks(
        model,
        config,
        calibration.tokens,
        progress=progress,
        scale_dtype=scale_dtype,
        changed=changed,
        store=store,
        keep=lambda q: pack(q, config.bits),  # packed codes: half the bytes of uint8 codes at int4
    )
    # linears by weight tensor name; experts ({"<experts>.gate_up_proj": [one per expert]}) as they are
    packed = {name if isinstance(value, list) else f"{name}.weight": value for name, value in results.items()}
    return packed, changed, calibration.describe()
