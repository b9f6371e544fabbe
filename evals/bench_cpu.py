"""CPU figures of the core: quantize time and memory, bits per weight, logit error and forward speed.

    python -m llmquant.evals.bench_cpu [--model DIR] [--out evals/results]

On SmolLM2-135M (default: the fp16 folder made by scripts/prepare_smollm2.py) for int8 g128 and
int4 g128 against the unquantized model, all measured in one run:
- `llmquant quantize` wall time and peak RSS (a child process each);
- bits per weight of the quantized layers (codes + scales + zeros);
- relative logit error ||q - f|| / ||f|| on the first 2,048 tokens of WikiText-2 (float32);
- forward time at batch 1 × 512 tokens and for one decode step after them, as a ratio to float32.
Writes smollm2-135m-cpu.{json,md} under --out.
"""

from __future__ import annotations

import argparse
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

from .meta import REPO, console_table, environment, markdown_table

CONFIGS = {"int8-g128": llmquant.QuantConfig(bits=8, group_size=128), "int4-g128": llmquant.QuantConfig(bits=4)}
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw-v1-test.jsonl"


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


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def forward_times(model, tokens: torch.Tensor, repeats: int) -> dict:
    prompt = tokens[:, :512]
    prefill = median_seconds(lambda: model(prompt), repeats)
    cache = model(prompt, use_cache=True).past_key_values
    step = tokens[:, 512:513]

    def decode():
        model(step, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # drop the new token: every repetition decodes after the same 512

    return {"prefill_512_s": prefill, "decode_step_s": median_seconds(decode, repeats * 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="fp16 model folder (default: SmolLM2-135M)")
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "results")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.model is None:
        sys.path.insert(0, str(REPO / "scripts"))
        from prepare_smollm2 import prepare

        args.model = prepare()
    rows = [json.loads(line)["text"] for line in WIKITEXT.open()]
    tokens = AutoTokenizer.from_pretrained(args.model)("\n\n".join(rows), return_tensors="pt").input_ids[:, :2048]

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = base(tokens).logits
    results = {"float32": {"size_bytes": llmquant.model_size_bytes(base), **forward_times(base, tokens, args.repeats)}}
    with tempfile.TemporaryDirectory() as scratch:
        for name, config in CONFIGS.items():
            quantize = timed_quantize(args.model, Path(scratch) / name, config)
            # bits per weight as published (scales in the checkpoint's dtype), speed in float32
            stored_bits = llmquant.bits_per_weight(AutoModelForCausalLM.from_pretrained(Path(scratch) / name))
            model = AutoModelForCausalLM.from_pretrained(Path(scratch) / name, dtype=torch.float32).eval()
            with torch.no_grad():
                error = ((model(tokens).logits - reference).norm() / reference.norm()).item()
            results[name] = {
                "quantize": quantize,
                "bits_per_weight": stored_bits,
                "size_bytes": llmquant.model_size_bytes(model),
                "relative_logit_error": error,
                **forward_times(model, tokens, args.repeats),
            }
    checkpoint_bytes = sum(p.stat().st_size for p in args.model.glob("*.safetensors"))
    base_times = results["float32"]
    columns = [
        "model",
        "bits/weight",
        "logit err",
        "quantize s",
        "peak RSS",
        "prefill 512",
        "x fp32",
        "decode step",
        "x fp32",
    ]
    table = []
    for name, r in results.items():
        q = r.get("quantize")
        table.append(
            [
                name,
                f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "32",
                f"{r['relative_logit_error']:.4f}" if q else "0",
                f"{q['seconds']:.1f}" if q else "",
                f"{q['peak_rss_bytes'] / 2**20:.0f} MiB" if q else "",
                f"{r['prefill_512_s'] * 1e3:.1f} ms",
                f"{base_times['prefill_512_s'] / r['prefill_512_s']:.2f}",
                f"{r['decode_step_s'] * 1e3:.2f} ms",
                f"{base_times['decode_step_s'] / r['decode_step_s']:.2f}",
            ]
        )
    payload = {
        "model": str(args.model),
        "checkpoint_bytes": checkpoint_bytes,
        "tokens": tokens.shape[1],
        "env": environment("cpu"),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smollm2-135m-cpu.json").write_text(json.dumps(payload, indent=1) + "\n")
    note = (
        f"SmolLM2-135M ({checkpoint_bytes / 2**20:.0f} MiB fp16 checkpoint) on {payload['env']['device']}; "
        f"logit error on the first {tokens.shape[1]} WikiText-2 test tokens; speed ratios are float32 time / "
        "model time in the same run (higher is faster). Command: `python -m llmquant.evals.bench_cpu`. "
        f"Commit {payload['env']['git_commit']}, {payload['env']['date']}."
    )
    (args.out / "smollm2-135m-cpu.md").write_text(
        f"# llmquant core on CPU\n\n{note}\n\n{markdown_table(columns, table)}\n"
    )
    print(console_table(columns, table))
    print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
