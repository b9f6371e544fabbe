"""The README.md model card of a quantized folder, with Hub metadata."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import QuantConfig
from ..methods import get_method

if TYPE_CHECKING:
    from .quantize import Summary

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


def card_base_model(folder: Path, fallback: str) -> str:
    """The model a quantized `folder` was made from, as its llmquant card names it (the Hub id in
    the front matter, else the source named in the text), or `fallback` when there is no card."""
    try:
        text = (folder / "README.md").read_text()
    except OSError:
        return fallback
    front = re.search(r"^base_model:\s*(\S+)\s*$", text.split("\n---", 1)[0], re.MULTILINE)
    if front:
        return front.group(1)
    body = re.search(r"Weight-only quantization of `([^`]+)`", text)
    return body.group(1) if body else fallback


def write_model_card(
    path: Path,
    base_model: str,
    config: QuantConfig,
    summary: Summary | None,
    fmt: str = "llmquant",
    quantization_config: dict | None = None,
    converted_from: str | None = None,
) -> None:
    """Card of a folder written in format `fmt` (a registered format, llmquant/formats/): what was
    quantized and how, which llmquant made it, and how each engine loads it. `base_model` is the
    float model; `converted_from` the quantized folder a `convert` read (named as such, never as
    the base model); `quantization_config` what config.json holds (default: computed from `config`)."""
    from .. import __version__
    from ..formats import get_format
    from ..formats.common import SERVING_RECOMMENDATION

    target = get_format(fmt)
    if quantization_config is None:
        quantization_config = target.quantization_config(config)
    group = "per row" if config.group_size == -1 else str(config.group_size)
    is_hub_id = not Path(base_model).expanduser().exists()
    front = ["---", "library_name: transformers"]
    if is_hub_id:
        front.append(f"base_model: {base_model}")
    front += ["tags:", "- llmquant", *([f"- {target.NAME}"] if target.NAME != "llmquant" else [])]
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
    converted = ""
    if converted_from:
        converted = f"\nRewritten without re-quantizing from `{converted_from}`.\n"
    body = f"""
# {Path(base_model).name} — int{config.bits}, group size {group} ({fmt} format)

Weight-only quantization of `{base_model}` made with [llmquant](https://pypi.org/project/llmquant/)
{__version__}, stored in the **{fmt}** format: linear layers hold {config.bits}-bit codes in groups of {group}
input columns with a scale {"" if config.sym else "and an integer zero point "}per group
({"symmetric" if config.sym else "asymmetric"}, method `{config.method}`). Kept in floating point:
{", ".join(config.modules_to_not_convert or []) or "nothing"} (and the embeddings).{_rotation_note(config)}
{converted}{table}{_calibration_row(config)}
## Load

{target.load_help(config)}

Serving: {SERVING_RECOMMENDATION}.

Quantization config (`config.json` → `quantization_config`):

```json
{json.dumps(quantization_config, indent=2, sort_keys=True)}
```
"""
    path.write_text("\n".join(front) + "\n" + body)
