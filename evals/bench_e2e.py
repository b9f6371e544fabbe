"""End-to-end speed of a Llama-2-7B-shaped model, fp16 against int4 g128 (a benchmark, not a test).

    python -m llmquant.evals.bench_e2e [--layers N] [--out DIR]

Builds `transformers.LlamaForCausalLM` with Llama-2-7B shapes and random weights in fp16 on CUDA,
measures it, quantizes it in place with `llmquant.quantize_(model, QuantConfig(bits=4,
group_size=128))` and measures again, so both runs share weights, prompt and treatment:

* decode tokens/s at batch 1: `generate` with a static KV cache, which transformers compiles
  (torch.compile, CUDA graphs) automatically on CUDA; `--eager` turns that off for both. The rate
  is taken from per-token timestamps, the prefill step excluded;
* prefill: one forward over `--prefill-tokens` (2048) tokens, eager, median of a few runs;
* weight memory (parameters + buffers) and peak allocated memory.

Writes `bench_e2e-<gpu>.json` and `.md` under `evals/results/` (or --out). Needs a CUDA device;
`--layers 2` makes a smoke run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import llmquant

from .meta import RESULTS, console_table, environment, require_cuda, write_results

LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)


def build_model(layers: int, device: str = "cuda", **overrides):
    """Llama-2-7B-shaped LlamaForCausalLM with random fp16 weights (HF's default init), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": layers, **overrides})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # build in fp16 directly: a 7B fp32 copy would not be needed
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


class _Stamps:
    """A generate() streamer that timestamps every step (generate already syncs once per token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def decode_rate(model, new_tokens: int, eager: bool, prompt_len: int = 16, repeats: int = 2) -> float:
    """Batch-1 decode tokens/s with a static cache; the first call (compile, warm-up) is not timed."""
    device = next(model.parameters()).device
    prompt = torch.randint(100, model.config.vocab_size, (1, prompt_len), device=device)
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        cache_implementation="static",
        disable_compile=eager,
        pad_token_id=0,
    )
    rates = []
    for i in range(repeats + 1):
        stamps = _Stamps()
        model.generate(prompt, streamer=stamps, **kwargs)
        # put() sees the prompt first, then one call per new token; the first new token is the prefill.
        decode = stamps.times[2:]
        if i > 0 and len(decode) > 1:
            rates.append((len(decode) - 1) / (decode[-1] - decode[0]))
    return statistics.median(rates)


@torch.no_grad()
def prefill_ms(model, tokens: int, repeats: int = 5) -> float:
    """Median ms of one eager forward over `tokens` tokens at batch 1 (only the last logits)."""
    device = next(model.parameters()).device
    ids = torch.randint(100, model.config.vocab_size, (1, tokens), device=device)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first run tunes the kernels for this shape
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(model, name: str, args) -> dict:
    torch.cuda.reset_peak_memory_stats()
    prefill = prefill_ms(model, args.prefill_tokens)
    rate = decode_rate(model, args.decode_tokens, args.eager)
    return {
        "model": name,
        "decode_tok_s": rate,
        "decode_ms_per_token": 1e3 / rate,
        "prefill_ms": prefill,
        "prefill_tok_s": args.prefill_tokens / prefill * 1e3,
        "weight_bytes": llmquant.model_size_bytes(model),
        "peak_alloc_bytes": torch.cuda.max_memory_allocated(),
    }


COLUMNS = ["model", "decode tok/s", "ms/token", "prefill ms", "prefill tok/s", "weights GB", "peak GB"]


def row(r: dict) -> list[str]:
    return [
        r["model"],
        f"{r['decode_tok_s']:.1f}",
        f"{r['decode_ms_per_token']:.2f}",
        f"{r['prefill_ms']:.1f}",
        f"{r['prefill_tok_s']:.0f}",
        f"{r['weight_bytes'] / 1e9:.2f}",
        f"{r['peak_alloc_bytes'] / 1e9:.2f}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-2-7B; 2 for a smoke run)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs in decode (both models)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown (%(default)s)")
    args = parser.parse_args(argv)
    require_cuda("bench_e2e")

    env = environment()
    print(", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    torch.manual_seed(0)
    model = build_model(args.layers)
    results = [measure(model, "fp16", args)]
    print(console_table(COLUMNS, [row(results[-1])]), flush=True)
    llmquant.quantize_(model, llmquant.QuantConfig(bits=4, group_size=128))
    replaced = sum(isinstance(m, llmquant.QuantLinear) for m in model.modules())
    # Drop the fp16 run's compiled graphs and CUDA graphs so the int4 run compiles afresh.
    torch._dynamo.reset()
    model.__dict__.pop("_compiled_call", None)
    torch.cuda.empty_cache()
    results.append(measure(model, "int4-g128", args))
    results[-1]["quant_linear_layers"] = replaced
    fp16, q = results
    payload = {
        "env": env,
        "setup": {
            "shape": "Llama-2-7B",
            "layers": args.layers,
            "decode_tokens": args.decode_tokens,
            "prefill_tokens": args.prefill_tokens,
            "decode": "generate, static cache, " + ("eager" if args.eager else "transformers auto-compile"),
            "prefill": "eager forward, logits_to_keep=1",
        },
        "results": results,
        "decode_speedup": q["decode_tok_s"] / fp16["decode_tok_s"],
        "prefill_speedup": fp16["prefill_ms"] / q["prefill_ms"],
    }
    rows = [row(r) for r in results]
    title = f"Llama-2-7B shapes ({args.layers} layers), fp16 vs int4 g128, batch 1"
    paths = write_results(args.out, "bench_e2e", payload, COLUMNS, rows, title)
    print("\n" + console_table(COLUMNS, rows))
    print(f"decode speedup {payload['decode_speedup']:.2f}x, prefill speedup {payload['prefill_speedup']:.2f}x")
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
