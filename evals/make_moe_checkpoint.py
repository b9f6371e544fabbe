"""A random-weight Mixtral checkpoint of a few hundred MB, written by transformers' own
`save_pretrained` (per-expert tensors, as the Hub's Mixtral checkpoints store them), with the
stories260k tokenizer: the subject of the MoE peak-memory measurement.

    python -m llmquant.evals.make_moe_checkpoint OUT --tokenizer TOKENIZER_DIR \
        [--layers 8 --experts 8 --hidden 512 --intermediate 1536]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def make(out: Path, layers: int, experts: int, hidden: int, intermediate: int, tokenizer: Path) -> Path:
    """Write the checkpoint (float16, seed 0) into `out`, with the tokenizer files of the folder
    `tokenizer` (stories260k's: 512 ids), and return it."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=512,  # the stories260k tokenizer's
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with stories260k's tokenizer files")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    args = parser.parse_args()
    make(Path(args.out), args.layers, args.experts, args.hidden, args.intermediate, args.tokenizer)


if __name__ == "__main__":
    main()
