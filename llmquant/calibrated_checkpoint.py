"""`llmquant quantize --method gptq`: the packed tensors of a calibrated method, computed up front.

Calibrated methods need activations, so the streaming writer cannot quantize one tensor at a
time from disk. Route: load the floating-point model on CPU (fp32 compute), quantize it block
by block (`llmquant.sequential`, one block on the compute device at a time), and hand the
writer {checkpoint tensor name: packed tensors}; it writes them in place of quantizing, so the
output layout is the same as for rtn. Scales are rounded to the source weights' dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .calibration import CalibrationSet, load_calibration
from .config import QuantConfig
from .errors import first_line
from .quantize import pack


def precompute_packed(
    src: Path,
    config: QuantConfig,
    scale_dtype: torch.dtype,
    calibration: CalibrationSet | None = None,
    progress: bool = True,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict]:
    """{"<module>.weight": packed tensors} for every quantized linear of the model in `src`,
    {tensor name: new float value} for tensors the method changed (norm weights under awq
    scaling), and the calibration record (dataset, samples, tokens, seed).

    calibration: default `load_calibration(tokenizer of src)` (the C4 sample).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sequential import quantize_blocks

    if calibration is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(src)
        except Exception as error:
            raise ValueError(f"{src}: a calibrated method needs the model's tokenizer: {first_line(error)}") from None
        calibration = load_calibration(tokenizer)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    except Exception as error:
        raise ValueError(f"cannot load {src} to calibrate it: {first_line(error)}") from None
    model.eval()
    changed: dict[str, torch.Tensor] = {}
    results = quantize_blocks(
        model, config, calibration.tokens, progress=progress, scale_dtype=scale_dtype, changed=changed
    )
    packed = {f"{name}.weight": pack(q, config.bits) for name, q in results.items()}
    return packed, changed, calibration.describe()
