"""A tiny random Llama whose every linear is exportable at int4/int8 with groups of 32, 64 or 128
(stories260k's 172-wide MLP admits only int8 per-row), built from LlamaConfig alone.

Imports only torch and transformers: the reference-writer script (scripts/reference_exports.py)
and the reader checks (tests/readers/) load this file by path in environments without llmquant.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stories260k"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def tiny_llama_config(tied: bool = False):
    """LlamaConfig: hidden 128, MLP 256, 2 layers, 4 heads of 32 (2 kv heads: k/v_proj N = 64),
    vocabulary 512 (stories260k's tokenizer)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_tiny_llama(out: Path, tied: bool = False, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write a random tiny Llama (weights N(0, 0.02), seeded) to the folder `out`, in `dtype`,
    with stories260k's tokenizer files when they are at hand. Returns `out`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tied)).to(dtype).eval()
    out = Path(out)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (STORIES / name).is_file():
            shutil.copy(STORIES / name, out / name)
    return out
