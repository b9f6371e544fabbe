"""The README.md model card of a quantized folder, with Hub metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .config import QuantConfig
from .methods import get_method

if TYPE_CHECKING:
    from .checkpoint import Summary

FORMAT_TAGS = {"llmquant": ["llmquant"], "gptq": ["gptq"], "compressed-tensors": ["compressed-tensors"]}


def _rotation_note(config: QuantConfig) -> str:
    """What a method with rotations did to the float tensors (empty otherwise)."""
    if not get_method(config.method).rotation:
        return ""
    return (
        "\nBefore quantization the residual stream and the attention heads were rotated by random orthogonal "
        "matrices folded into the weights (llmquant `rotation.py`): the model computes the same function, but the "
        "embedding, norms and output head differ from the base model's; a head tied to the embedding is "
        "stored on its own (`tie_word_embeddings: false`)."
    )


def _calibration_row(config: QuantConfig) -> str:
    """The table row recording a calibrated method's data (empty for rtn)."""
    c = config.calibration
    if not c:
        return ""
    return (
        f"| calibration data | `{c.get('dataset')}`: {c.get('nsamples')} samples x {c.get('seqlen')} tokens "
        f"= {c.get('tokens'):,} tokens (seed {c.get('seed')}) |\n"
    )


def write_model_card(
    path: Path, base_model: str, config: QuantConfig, summary: Summary | None, fmt: str = "llmquant"
) -> None:
    """Card of a folder written in format `fmt` (llmquant, gptq or compressed-tensors): what was
    quantized and how, which llmquant made it, and how each engine loads it."""
    from . import __version__
    from .formats import get_format

    target = get_format(fmt)
    group = "per row" if config.group_size == -1 else str(config.group_size)
    is_hub_id = not Path(base_model).expanduser().exists()
    front = ["---", "library_name: transformers"]
    if is_hub_id:
        front.append(f"base_model: {base_model}")
    front += ["tags:", "- llmquant", *(f"- {tag}" for tag in FORMAT_TAGS[fmt] if tag != "llmquant")]
    front += ["- quantized", f"- int{config.bits}", "---"]
    table = ""
    if summary is not None:
        table = f"""
| | |
|---|---|
| quantized parameters | {summary.params_quantized:,} of {summary.params_total:,} |
| bits per weight of the quantized layers (codes + scales + zeros) | {summary.bits_per_weight:.3f} |
| checkpoint size, all tensors | {summary.bytes_before / 2**20:.1f} MiB / {summary.bytes_after / 2**20:.1f} MiB |
"""
    body = f"""
# {Path(base_model).name} — int{config.bits}, group size {group} ({fmt} format)

Weight-only quantization of `{base_model}` made with [llmquant](https://pypi.org/project/llmquant/)
{__version__}, stored in the **{fmt}** format: linear layers hold {config.bits}-bit codes in groups of {group}
input columns with a scale {"" if config.sym else "and an integer zero point "}per group
({"symmetric" if config.sym else "asymmetric"}, method `{config.method}`). Kept in floating point:
{", ".join(config.modules_to_not_convert or []) or "nothing"} (and the embeddings).{_rotation_note(config)}
{table}{_calibration_row(config)}
## Load

{target.LOAD_HELP}

Quantization config (`config.json` → `quantization_config`):

```json
{json.dumps(target.quantization_config(config), indent=2, sort_keys=True)}
```
"""
    path.write_text("\n".join(front) + "\n" + body)
