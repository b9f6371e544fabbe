"""End-to-end speed of a Llama-2-7B-shaped model, fp16 against int4 g128 (a benchmark, not a test).

    python -m llmquant.evals.bench_e2e [--layers N] [--out DIR]

Builds `transformers.LlamaForCausalLM` with Llama-2-7B shapes and random weights in fp16 on CUDA,
measures it, quantizes it in place with `llmquant.quantize_(model, QuantConfig(bits=4,
group_size=128))` and measures again, so both runs share weights, prompt and treatment:

* decode ms/token at batch 1: one greedy decode step with a static KV cache captured in a CUDA
  graph and replayed (no Python, no host sync per token; CUDA events), next to the bound
  weight bytes / device-to-device copy bandwidth measured in the same run. (The earlier figure,
  `generate` compiled by transformers with per-token timestamps, sat at 9.15 ms/token for both
  models, twice the fp16 bound: it measured the generate loop, not the weights; `--hf-compile`
  still times it);
* plain eager `generate` tokens/s (dynamic cache, no compile): what an un-compiled user gets;
* prefill: one eager forward over `--prefill-tokens` (2048) tokens, median of a few runs;
* weight memory (parameters + buffers) and peak allocated memory.

Writes `bench_e2e-<gpu>.json` and `.md` under `evals/results/` (or --out), rewritten (atomically)
after every measurement in the order graph decode, eager generate, prefill (fp16, then int4), so a
run killed by a time limit leaves what it measured. Needs a CUDA device; `--layers 2` makes a smoke
run. `--dry-run` needs none: a tiny Llama on CPU, int4 through the Triton interpreter, every
measurement executed with a few tokens (the decode step eagerly: no CUDA graph on CPU), files named
`bench_e2e-dryrun-<cpu>` with `"dry_run": true` (CPU wall times, not GPU figures).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import llmquant

from .meta import RESULTS, console_table, environment, require_cuda

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
def static_decode(model, prompt: torch.Tensor, steps: int, use_graph: bool, warmup: int = 3):
    """Greedy batch-1 decode with a static KV cache, one step = one forward of one token.

    With use_graph (CUDA) one decode step is captured in a CUDA graph (token, position and cache
    are static tensors updated in place by the step itself) and replayed `steps` times with no
    host sync in between; the time comes from CUDA events around the replays. Without it the
    same step runs eagerly (CPU check of the logic). Returns (generated tokens [steps], ms per token).
    """
    from transformers import StaticCache

    device = prompt.device
    length = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=length + steps + warmup + 1)
    logits = model(prompt, past_key_values=cache, cache_position=torch.arange(length, device=device)).logits
    token = logits[:, -1:].argmax(-1)  # [1, 1] static input of the step
    position = torch.tensor([length], device=device)
    out = torch.empty(steps + warmup, dtype=torch.long, device=device)
    index = torch.zeros((), dtype=torch.long, device=device)

    def step():
        logits = model(token, past_key_values=cache, cache_position=position, use_cache=True).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.index_copy_(0, index.view(1), nxt.view(1))
        token.copy_(nxt)
        position.add_(1)
        index.add_(1)

    if not use_graph:
        for _ in range(steps):
            step()
        return out[:steps].tolist(), None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture: tuning, allocator, lazy init
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # The capture recorded the step without running it: restart the count after the warm-up steps.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return out[warmup : warmup + steps].tolist(), start.elapsed_time(end) / steps


@torch.no_grad()
def eager_generate_rate(model, new_tokens: int, prompt_len: int = 16) -> float:
    """Plain eager `generate` (dynamic cache, no compile) tokens/s at batch 1, the prefill included."""
    device = next(model.parameters()).device
    prompt = torch.randint(100, model.config.vocab_size, (1, prompt_len), device=device)
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, disable_compile=True
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warm = min(4, new_tokens)
    model.generate(prompt, **{**kwargs, "max_new_tokens": warm, "min_new_tokens": warm})  # warm-up, tuning
    sync()
    start = time.perf_counter()
    model.generate(prompt, **kwargs)
    sync()
    return new_tokens / (time.perf_counter() - start)


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


def measure(model, name: str, args, copy_gbps: float, save) -> dict:
    """The measurements of one model, most important first; `save(rec)` after each one."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    weight_bytes = llmquant.model_size_bytes(model)
    rec = {"model": name, "weight_bytes": weight_bytes, "bound_ms_per_token": weight_bytes / (copy_gbps * 1e9) * 1e3}
    prompt = torch.randint(100, model.config.vocab_size, (1, 16), device=device)
    start = time.perf_counter()
    _, graph_ms = static_decode(model, prompt, args.decode_tokens, use_graph=cuda)
    if graph_ms is None:  # dry run: the same step eagerly on CPU, wall time (prefill and warm-up included)
        graph_ms = (time.perf_counter() - start) * 1e3 / args.decode_tokens
    rec.update(graph_ms_per_token=graph_ms, graph_tok_s=1e3 / graph_ms)
    save(rec)
    rec["eager_generate_tok_s"] = eager_generate_rate(model, args.eager_tokens)
    save(rec)
    prefill = prefill_ms(model, args.prefill_tokens, repeats=args.prefill_repeats)
    rec.update(prefill_ms=prefill, prefill_tok_s=args.prefill_tokens / prefill * 1e3)
    if cuda:
        rec["peak_alloc_bytes"] = torch.cuda.max_memory_allocated()
    save(rec)
    if args.hf_compile:
        rec["hf_compiled_generate_tok_s"] = decode_rate(model, args.decode_tokens, eager=False)
        save(rec)
    return rec


COLUMNS = [
    "model", "decode ms/token (CUDA graph)", "bound ms/token", "decode tok/s", "eager generate tok/s",
    "prefill ms", "weights GB", "peak GB",
]  # fmt: skip


def _f(value, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value / scale, spec)


def row(r: dict) -> list[str]:
    return [
        r["model"],
        _f(r.get("graph_ms_per_token"), ".2f"),
        _f(r.get("bound_ms_per_token"), ".2f"),
        _f(r.get("graph_tok_s"), ".1f"),
        _f(r.get("eager_generate_tok_s"), ".1f"),
        _f(r.get("prefill_ms"), ".1f"),
        _f(r.get("weight_bytes"), ".2f", 1e9),
        _f(r.get("peak_alloc_bytes"), ".2f", 1e9),
    ]


def _ratio(a: dict, b: dict, key: str, invert: bool = False) -> float | None:
    """fp16 a over int4 b for a time (or b over a for a rate, invert=True); None until both exist."""
    if a.get(key) is None or b.get(key) is None:
        return None
    return b[key] / a[key] if invert else a[key] / b[key]


DRY_RUN_MODEL = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, vocab_size=512
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-2-7B; 2 for a smoke run)")
    parser.add_argument("--decode-tokens", type=int, default=128, help="CUDA-graph decode steps timed")
    parser.add_argument("--eager-tokens", type=int, default=32, help="new tokens of the plain eager generate")
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--prefill-repeats", type=int, default=5, help="timed prefills (median), after one untimed")
    parser.add_argument("--hf-compile", action="store_true", help="also time generate compiled by transformers")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown (%(default)s)")
    parser.add_argument(
        "--dry-run", action="store_true", help="no GPU: a tiny Llama on CPU, int4 through the Triton interpreter"
    )
    args = parser.parse_args(argv)
    from .bench_kernels import write_files

    if args.dry_run:
        from . import bench_kernels

        bench_kernels.DEVICE = "cpu"
        bench_kernels.dry_run_environment()
        # The interpreter takes ~0.1-0.3 s per kernel launch: one block, a few tokens, every path once.
        args.layers, args.decode_tokens, args.eager_tokens = 1, 2, 1
        args.prefill_tokens, args.prefill_repeats, args.hf_compile = 16, 1, False
        device, shape, overrides = "cpu", "tiny Llama (dry run)", DRY_RUN_MODEL
    else:
        require_cuda("bench_e2e")
        device, shape, overrides = "cuda", "Llama-2-7B", {}
    from .bench_kernels import copy_bandwidth

    env = environment(device)
    print(", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    copy_gbps = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s", flush=True)
    results: list[dict] = []
    title = f"{shape} shapes ({args.layers} layers), fp16 vs int4 g128, batch 1"
    notes = []
    if args.dry_run:
        title = "DRY RUN (CPU, Triton interpreter, tiny model; no GPU figure): " + title
        notes.append("Dry run: CPU wall times, decode step run eagerly (no CUDA graph); not GPU measurements.")
    setup = {
        "shape": shape,
        "layers": args.layers,
        "decode_tokens": args.decode_tokens,
        "eager_tokens": args.eager_tokens,
        "prefill_tokens": args.prefill_tokens,
        "prefill_repeats": args.prefill_repeats,
        "decode": "one decode step with a static cache captured in a CUDA graph, replayed; CUDA events",
        "bound": "weight bytes / device-to-device copy bandwidth",
        "eager": "generate, dynamic cache, no compile, prefill included",
        "prefill": "eager forward, logits_to_keep=1",
    }
    stem = "bench_e2e-dryrun" if args.dry_run else "bench_e2e"
    paths = []

    def save(rec: dict | None = None) -> None:
        if rec is not None and (not results or results[-1] is not rec):
            results.append(rec)
        fp16 = next((r for r in results if r["model"] == "fp16"), {})
        q = next((r for r in results if r["model"] == "int4-g128"), {})
        payload = {
            "env": env,
            "dry_run": args.dry_run,
            "copy_gbps": copy_gbps,
            "setup": setup,
            "results": results,
            "decode_speedup": _ratio(fp16, q, "graph_ms_per_token"),
            "eager_generate_speedup": _ratio(fp16, q, "eager_generate_tok_s", invert=True),
            "prefill_speedup": _ratio(fp16, q, "prefill_ms"),
            "notes": notes,
        }
        paths[:] = write_files(args.out, stem, payload, COLUMNS, [row(r) for r in results], title)

    torch.manual_seed(0)
    model = build_model(args.layers, device=device, **overrides)
    measure(model, "fp16", args, copy_gbps, save)
    print(console_table(COLUMNS, [row(results[-1])]), flush=True)
    llmquant.quantize_(model, llmquant.QuantConfig(bits=4, group_size=128))
    replaced = sum(isinstance(m, llmquant.QuantLinear) for m in model.modules())
    # Drop the fp16 run's compiled graphs so an --hf-compile int4 run compiles afresh.
    torch._dynamo.reset()
    model.__dict__.pop("_compiled_call", None)
    if device == "cuda":
        torch.cuda.empty_cache()
    measure(model, "int4-g128", args, copy_gbps, lambda rec: save(rec.update(quant_linear_layers=replaced) or rec))
    print("\n" + console_table(COLUMNS, [row(r) for r in results]))
    fp16, q = results[0], results[-1]
    print(
        f"decode (CUDA graph) speedup {_ratio(fp16, q, 'graph_ms_per_token'):.2f}x, eager generate "
        f"{_ratio(fp16, q, 'eager_generate_tok_s', invert=True):.2f}x, prefill {_ratio(fp16, q, 'prefill_ms'):.2f}x"
    )
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
