"""The README.md model card of a quantized folder, with Hub metadata."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .config import QuantConfig

if TYPE_CHECKING:
    from .checkpoint import Summary


def _calibration_row(config: QuantConfig) -> str:
    """The table row recording a calibrated method's data (empty for rtn)."""
    c = config.calibration
    if not c:
        return ""
    return (
        f"| calibration data | `{c.get('dataset')}`: {c.get('nsamples')} samples x {c.get('seqlen')} tokens "
        f"= {c.get('tokens'):,} tokens (seed {c.get('seed')}) |\n"
    )


def write_model_card(path: Path, base_model: str, config: QuantConfig, summary: Summary) -> None:
    group = "per row" if config.group_size == -1 else str(config.group_size)
    is_hub_id = not Path(base_model).expanduser().exists()
    front = ["---", "library_name: transformers"]
    if is_hub_id:
        front.append(f"base_model: {base_model}")
    front += [
        "tags:",
        "- llmquant",
        "- quantized",
        f"- int{config.bits}",
        "---",
    ]
    body = f"""
# {Path(base_model).name} — llmquant int{config.bits}, group size {group}

Weight-only quantization of `{base_model}` with [llmquant](https://pypi.org/project/llmquant/):
linear layers hold {config.bits}-bit codes in groups of {group} input columns with a scale
{"" if config.sym else "and an integer zero point "}per group ({"symmetric" if config.sym else "asymmetric"},
method `{config.method}`). Kept in floating point: {", ".join(config.modules_to_not_convert or []) or "nothing"}
(and the embeddings).

| | |
|---|---|
| quantized parameters | {summary.params_quantized:,} of {summary.params_total:,} |
| bits per weight of the quantized layers (codes + scales + zeros) | {summary.bits_per_weight:.3f} |
| checkpoint size, all tensors | {summary.bytes_before / 2**20:.1f} MiB / {summary.bytes_after / 2**20:.1f} MiB |
{_calibration_row(config)}
## Load

`pip install llmquant` first: without it, transformers skips the unknown quantization method with
a warning and leaves the quantized layers randomly initialised.

```python
import llmquant  # registers the "llmquant" quantization method with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")
tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER_OR_REPO")
```

Quantization config (`config.json` → `quantization_config`):

```json
{config.to_json_string(use_diff=False).strip()}
```
"""
    path.write_text("\n".join(front) + "\n" + body)
