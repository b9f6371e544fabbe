"""CPU figures of the core: decode and prefill speed against float32, idle and under load; ops per step.

    python -m llmquant.evals.bench_cpu --dataset wikitext-2-raw-v1-test.jsonl [--quick] [--model DIR]

On SmolLM2-135M (default: the fp16 folder made by scripts/prepare_smollm2.py), int8 g128 and
int4 g128 checkpoints written by `llmquant quantize` and loaded with a plain `from_pretrained`
(no dtype: float32 compute on CPU) against the float32 model, all measured in one run:
- `llmquant quantize` wall time and peak RSS (a child process each);
- bits per weight of the quantized layers and memory of the loaded model (llmquant/stats.py);
- relative logit error ||q - f|| / ||f|| on the first WikiText-2 test tokens;
- decode tokens/s (greedy, one token per forward with the KV cache, after a 32-token prompt) and
  prefill of 512 tokens, idle and with one competing CPU-bound process (a busy loop in a child
  process, started and stopped here, killed at a deadline); models take turns in every round and
  each ratio to float32 is the median over rounds of same-round ratios;
- torch ops per decode step (torch.profiler, ops called from Python: top-level aten ops), and
  per quantized linear (ops inside QuantLinear.forward, with how many are views: no kernel).
Writes smollm2-135m-cpu[-quick].{json,md} under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmquant
from llmquant.nn.linear import QuantLinear

from . import EvalError
from .data import load_text
from .meta import REPO, RESULTS, console_table, environment, markdown_table

CONFIGS = {"int8-g128": llmquant.QuantConfig(bits=8, group_size=128), "int4-g128": llmquant.QuantConfig(bits=4)}
VIEW_OPS = {
    "aten::view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::as_strided",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::slice",
    "aten::select",
    "aten::t",
    "aten::transpose",
    "aten::permute",
    "aten::expand",
    "aten::detach",
    "aten::alias",
    "aten::_unsafe_view",
}

# The child reports its own VmHWM: unlike ru_maxrss, it belongs to the address space made at
# exec, so it does not inherit the (large) peak of this parent process.
_CHILD = """
import sys
from llmquant.cli import main
code = main(sys.argv[1:])
peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print("VMHWM_KB", peak)
sys.exit(code)
"""
_BUSY = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


def timed_quantize(src: Path, out: Path, config: llmquant.QuantConfig) -> dict:
    """Run `llmquant quantize` in a child process: its wall seconds and peak resident memory."""
    args = ["quantize", str(src), "-o", str(out), "--quiet", "--bits", str(config.bits)]
    args += ["--group-size", str(config.group_size)]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"llmquant {' '.join(args)} failed: {done.stderr.strip()}")
    peak_kb = int(done.stdout.split("VMHWM_KB")[1].split()[0])
    return {"command": "llmquant " + " ".join(args), "seconds": seconds, "peak_rss_bytes": peak_kb * 1024}


@contextlib.contextmanager
def competing_process(seconds: float):
    """One CPU-bound child process (a Python busy loop) for the block; it also stops by itself."""
    child = subprocess.Popen([sys.executable, "-c", _BUSY, str(seconds)])
    try:
        time.sleep(0.2)  # let it start spinning
        yield child.pid
    finally:
        child.kill()
        child.wait()


@torch.no_grad()
def decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds per token of greedy decoding after `prompt` [1, P], one token per forward (KV cache)."""
    out = model(prompt, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / new_tokens


@torch.no_grad()
def prefill_seconds(model, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    model(tokens)
    return time.perf_counter() - start


def timed_rounds(models: dict, fn, rounds: int) -> dict[str, list[float]]:
    """fn(model) seconds for every model, models taking turns (rotated order) in each round."""
    names = list(models)
    for name in names:  # warm-up (and the CPU kernel's one-time preparation, if not done at load)
        fn(models[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(fn(models[name]))
    return times


def ratios(times: dict[str, list[float]], base: str = "float32") -> dict[str, float]:
    """Median over rounds of base time / model time (same round): > 1 means faster than base."""
    return {name: statistics.median(b / t for b, t in zip(times[base], ts, strict=True)) for name, ts in times.items()}


@torch.no_grad()
def count_ops(model, prompt: torch.Tensor) -> dict:
    """Top-level aten ops in one decode step, and inside each QuantLinear.forward."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cache = model(prompt, use_cache=True).past_key_values
    token = prompt[:, -1:]
    model(token, past_key_values=cache, use_cache=True)  # warm
    cache.crop(-1)  # drop the warm-up token
    contexts, handles = [], []

    def enter(module, args):
        contexts.append(record_function("llmquant::QuantLinear"))
        contexts[-1].__enter__()

    def leave(module, args, output):
        contexts.pop().__exit__(None, None, None)

    for module in model.modules():
        if isinstance(module, QuantLinear):
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(token, past_key_values=cache, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    events = prof.events()

    def is_top(e) -> bool:  # an aten op called from Python (or from our record_function), not nested
        parent = e.cpu_parent
        return e.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::"))

    top = [e for e in events if is_top(e)]
    in_linear = [e for e in top if e.cpu_parent is not None and e.cpu_parent.name == "llmquant::QuantLinear"]
    linears = sum(1 for e in events if e.name == "llmquant::QuantLinear")
    per_linear: dict[str, int] = {}
    for e in in_linear:
        per_linear[e.name] = per_linear.get(e.name, 0) + 1
    return {
        "ops_per_step": len(top),
        "quantized_linears": linears,
        "ops_per_quantized_linear": len(in_linear) / linears if linears else None,
        "compute_ops_per_quantized_linear": (
            sum(1 for e in in_linear if e.name not in VIEW_OPS) / linears if linears else None
        ),
        "quantized_linear_ops": {k: v / linears for k, v in sorted(per_linear.items())} if linears else {},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="fp16 model folder (default: SmolLM2-135M)")
    parser.add_argument(
        "--dataset", default="wikitext2", help="WikiText-2 test: wikitext2 from the Hub, or its rows as a local .jsonl"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and tokens (development, noisy)")
    parser.add_argument("--rounds", type=int, default=None, help="decode rounds (default 5, quick 2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per decode round (default 32, quick 8)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    prefill_rounds = 1 if args.quick else 3
    error_tokens = 512 if args.quick else 2048
    try:
        text = load_text(args.dataset)
    except EvalError as error:
        parser.error(str(error))
    if args.model is None:
        if REPO is None:  # scripts/ is not installed with the package
            parser.error("--model is required outside the source checkout (its scripts/prepare_smollm2.py makes it)")
        sys.path.insert(0, str(REPO / "scripts"))
        from prepare_smollm2 import prepare

        args.model = prepare()
    tokens = AutoTokenizer.from_pretrained(args.model)(text, return_tensors="pt").input_ids[:, :2048]
    prompt, prefill = tokens[:, :32], tokens[:, :512]

    models = {"float32": AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()}
    with torch.no_grad():
        reference = models["float32"](tokens[:, :error_tokens]).logits
    results: dict[str, dict] = {
        "float32": {"memory_bytes": llmquant.model_size_bytes(models["float32"]), "relative_logit_error": 0.0}
    }
    with tempfile.TemporaryDirectory() as scratch:
        for name, config in CONFIGS.items():
            folder = Path(scratch) / name
            quantize = timed_quantize(args.model, folder, config)
            model = AutoModelForCausalLM.from_pretrained(folder).eval()  # the default a user gets
            with torch.no_grad():
                error = ((model(tokens[:, :error_tokens]).logits - reference).norm() / reference.norm()).item()
            results[name] = {
                "quantize": quantize,
                "compute_dtype": str(model.dtype).removeprefix("torch."),
                "bits_per_weight": llmquant.bits_per_weight(model, llmquant.stats.checkpoint_dtype(folder)),
                "memory_bytes": llmquant.model_size_bytes(model),
                "relative_logit_error": error,
            }
            models[name] = model

    for name, model in models.items():
        results[name].update(count_ops(model, prompt))
    budget = 120 if args.quick else 300  # the competitor stops by itself after this many seconds
    for load in ("idle", "loaded"):
        with competing_process(budget) if load == "loaded" else contextlib.nullcontext():
            decode = timed_rounds(models, lambda m: decode_seconds(m, prompt, new_tokens), rounds)
            pre = timed_rounds(models, lambda m: prefill_seconds(m, prefill), prefill_rounds)
        for name, ratio in ratios(decode).items():
            results[name][f"decode_{load}"] = {
                "tokens_per_s": 1 / statistics.median(decode[name]),
                "x_float32": ratio,
                "seconds_per_token": decode[name],
            }
        for name, ratio in ratios(pre).items():
            results[name][f"prefill_512_{load}"] = {
                "seconds": statistics.median(pre[name]),
                "x_float32": ratio,
                "all_seconds": pre[name],
            }

    checkpoint_bytes = sum(p.stat().st_size for p in args.model.glob("*.safetensors"))
    columns = [
        "model",
        "bits/w",
        "memory MiB",
        "logit err",
        "quantize s",
        "decode tok/s",
        "x fp32",
        "loaded tok/s",
        "x fp32",
        "prefill 512",
        "x fp32",
        "loaded",
        "x fp32",
        "ops/step",
        "ops/qlinear",
    ]
    table = []
    for name, r in results.items():
        q = r.get("quantize")
        di, dl, pi, pl = r["decode_idle"], r["decode_loaded"], r["prefill_512_idle"], r["prefill_512_loaded"]
        per = r["ops_per_quantized_linear"]
        table.append(
            [
                name,
                f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "32",
                f"{r['memory_bytes'] / 2**20:.1f}",
                f"{r['relative_logit_error']:.4f}",
                f"{q['seconds']:.1f}" if q else "",
                f"{di['tokens_per_s']:.1f}",
                f"{di['x_float32']:.2f}",
                f"{dl['tokens_per_s']:.1f}",
                f"{dl['x_float32']:.2f}",
                f"{pi['seconds'] * 1e3:.0f} ms",
                f"{pi['x_float32']:.2f}",
                f"{pl['seconds'] * 1e3:.0f} ms",
                f"{pl['x_float32']:.2f}",
                str(r["ops_per_step"]),
                f"{per:.0f} ({r['compute_ops_per_quantized_linear']:.0f} + views)" if per else "",
            ]
        )
    env = environment("cpu")
    payload = {
        "model": str(args.model),
        "quick": args.quick,
        "rounds": rounds,
        "new_tokens": new_tokens,
        "prefill_rounds": prefill_rounds,
        "logit_error_tokens": error_tokens,
        "checkpoint_bytes": checkpoint_bytes,
        "env": env,
        "results": results,
    }
    command = "python -m llmquant.evals.bench_cpu" + (" --quick" if args.quick else "")
    stem = "smollm2-135m-cpu" + ("-quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    notes = [
        f"SmolLM2-135M ({checkpoint_bytes / 2**20:.0f} MiB fp16 checkpoint) on {env['device']}; "
        f"torch {env['torch']}, transformers {env['transformers']}; commit {env['git_commit']}, {env['date']}. "
        f"Command: `{command}`."
        + (" QUICK MODE: few rounds, noisy; not for quoting." if args.quick else ""),
        "Quantized models: `llmquant quantize` output loaded with a plain `from_pretrained` (float32 compute on "
        "CPU). bits/w: quantized linear layers only (codes + scales + zeros, scales at the checkpoint's dtype). "
        "memory: all parameters and buffers of the loaded model (embeddings and lm_head in float32; the CPU "
        "kernel's copy of the codes included).",
        f"logit err: ||q - f|| / ||f|| on the first {error_tokens} WikiText-2 test tokens.",
        f"decode: greedy, {new_tokens} tokens after a 32-token prompt, median of {rounds} rounds; prefill: one "
        f"forward of 512 tokens, median of {prefill_rounds}. x fp32 = median over rounds of float32 time / model "
        "time in the same round (higher is faster). loaded: the same with one competing CPU-bound process "
        f"(a Python busy loop) on this {torch.get_num_threads()}-thread run.",
        "ops/step: top-level aten ops (called from Python) in one decode step, torch.profiler; ops/qlinear: the "
        "same inside one QuantLinear.forward (of which views: metadata only, no kernel).",
    ]
    (args.out / f"{stem}.md").write_text(
        "# llmquant core on CPU\n\n" + "\n\n".join(notes) + f"\n\n{markdown_table(columns, table)}\n"
    )
    print(console_table(columns, table))
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
