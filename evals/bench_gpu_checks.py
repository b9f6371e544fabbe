"""Two GPU checks beside the kernel benchmarks (issue 21), each writing one JSON file.

    python -m llmquant.evals.bench_gpu_checks eval     [--out DIR] [--max-windows N] [--dry-run]
    python -m llmquant.evals.bench_gpu_checks quantize [--out DIR] [--layers 3] [--dry-run]

`eval`: `llmquant eval` of stories260k (`--configs int4-g32`, tinystories-valid-excerpt.txt,
seqlen 256, as the earlier H100 run of commit 84e7850) on CPU in float32 (the reference), then on CUDA in
float32 and in float16. The CUDA float32 perplexities (baseline and int4) must equal the CPU ones to
1e-3 (absolute); the float16 run is recorded beside them (another dtype: not held to 1e-3).
Writes `eval-stories260k-<device>.json` after every run.

`quantize`: `llmquant quantize --method gptq-rot` (default calibration: 64 x 256 tokens of the C4
sample) of a generated Llama-2-7B-shaped checkpoint (hidden 4096, MLP 11008, 32 heads, vocab
32000, random fp16 weights, the stories260k tokenizer) with `--layers` decoder blocks, in a child
process: wall seconds, seconds per decoder block (each block's load-to-release time, read by
wrapping the block store), peak GPU memory (`torch.cuda.max_memory_allocated`/reserved) and peak
resident memory (VmHWM). The 32-layer time is extrapolated from the blocks after the first (which also pays one-off
costs): (total - their sum) + one median block per further layer, and says so. Writes `quantize-gptq-rot-<device>.json`.

`--dry-run` needs no GPU: `eval` compares the CPU torch path with the Triton kernels under the
interpreter (`LLMQUANT_KERNEL=triton`, TRITON_INTERPRET=1) on the first windows, `quantize` runs a
tiny Llama-shaped checkpoint on CPU. Dry-run files are named `*-dryrun-*` and say `"dry_run": true`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench_kernels import result_paths, write_atomic
from .meta import REPO, environment

TOLERANCE = 1e-3
LLAMA2_7B_LAYER = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
DRY_RUN_LAYER = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4
)


def _save(out: Path, stem: str, payload: dict) -> Path:
    path = result_paths(out, stem, payload["env"]["device"])[0]
    write_atomic(path, json.dumps(payload, indent=1) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ eval


def run_eval(args) -> int:
    from llmquant.evals import cli as eval_cli

    device = "cpu" if args.dry_run else "cuda"
    env = environment(device)
    windows = ["--max-windows", str(args.max_windows)] if args.max_windows else []
    stories, text = args.data / "stories260k", args.data / "tinystories-valid-excerpt.txt"
    common = [str(stories), "--configs", "int4-g32", "--dataset", str(text), "--seqlen", "256"]
    common += [*windows, "--no-progress"]
    if args.dry_run:  # the Triton kernels under the interpreter stand in for the GPU
        runs = [("cpu-float32", "cpu", "float32", "torch"), ("interpreter-float32", "cpu", "float32", "triton")]
    else:
        runs = [("cpu-float32", "cpu", "float32", "auto"), ("cuda-float32", "cuda", "float32", "auto")]
        runs.append(("cuda-float16", "cuda", "float16", "auto"))
    stem = "eval-stories260k-dryrun" if args.dry_run else "eval-stories260k"
    payload = {
        "env": env,
        "dry_run": args.dry_run,
        "what": "llmquant eval stories260k --configs int4-g32, tinystories-valid-excerpt.txt, seqlen 256",
        "tolerance_abs": TOLERANCE,
        "runs": {},
    }
    # A correctness check: the kernels' default configs, no tuning of stories260k's tiny shapes in the budget.
    os.environ["LLMQUANT_AUTOTUNE"] = "0"
    payload["autotune"] = "off (LLMQUANT_AUTOTUNE=0): tokens/s are of untuned default configs"
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, dev, dtype, kernel in runs:
            os.environ["LLMQUANT_KERNEL"] = kernel
            json_path = Path(tmp) / f"{name}.json"
            start = time.perf_counter()
            code = eval_cli.main([*common, "--device", dev, "--dtype", dtype, "--json", str(json_path)])
            seconds = time.perf_counter() - start
            if code != 0 or not json_path.is_file():
                payload["runs"][name] = {"exit_code": code, "seconds": seconds}
                status = 1
            else:
                result = json.loads(json_path.read_text())
                payload["runs"][name] = {
                    "seconds": seconds,
                    "tokens_scored": result["meta"]["tokens_scored"],
                    "device": result["meta"]["device"],
                    "ppl": {m["name"]: m["ppl"] for m in result["models"]},
                    "tokens_per_s": {m["name"]: m.get("tokens_per_s") for m in result["models"]},
                }
            payload.update(compare(payload["runs"]))
            path = _save(args.out, stem, payload)
            print(f"{name}: {json.dumps(payload['runs'][name])}", flush=True)
    os.environ.pop("LLMQUANT_KERNEL", None)
    print(f"wrote {path}: equal to the CPU result within {TOLERANCE}: {payload.get('equal_to_cpu')}")
    return status or (0 if payload.get("equal_to_cpu") else 1)


def compare(runs: dict) -> dict:
    """Largest |ppl - CPU ppl| of the like-for-like (float32) run, and of the float16 run."""
    ref = runs.get("cpu-float32", {}).get("ppl")
    out = {}
    for name, key in (("cuda-float32", "max_abs_diff"), ("interpreter-float32", "max_abs_diff")):
        ppl = runs.get(name, {}).get("ppl")
        if ref and ppl:
            out[key] = max(abs(ppl[m] - ref[m]) for m in ref)
            out["equal_to_cpu"] = out[key] <= TOLERANCE
    ppl16 = runs.get("cuda-float16", {}).get("ppl")
    if ref and ppl16:
        out["float16_max_abs_diff"] = max(abs(ppl16[m] - ref[m]) for m in ref)
    return out


# -------------------------------------------------------------------------------------------- quantize

_CHILD = r"""
import json, sys, time
import torch
start = time.perf_counter()
from llmquant.calibration import stores
from llmquant.checkpoint import calibrated
from llmquant.cli import main

blocks = {}
def wrap(cls):
    load, release = cls.load, cls.release
    def timed_load(self, index, block, device):
        blocks.setdefault(index, [time.perf_counter(), None])
        return load(self, index, block, device)
    def timed_release(self, index, block, work):
        out = release(self, index, block, work)
        if index in blocks:
            blocks[index][1] = time.perf_counter()
            print(f"block {index}: {blocks[index][1] - blocks[index][0]:.2f} s", file=sys.stderr, flush=True)
        return out
    cls.load, cls.release = timed_load, timed_release
for module in (calibrated, stores):  # the modules defining block stores (load/release)
    for value in list(vars(module).values()):
        if isinstance(value, type) and value.__module__ == module.__name__:
            if callable(getattr(value, "load", None)) and callable(getattr(value, "release", None)):
                wrap(value)
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
cuda = torch.cuda.is_available()
print("CHILD_RESULT " + json.dumps({
    "exit_code": code,
    "seconds": seconds,
    "block_seconds": [b - a for a, b in (blocks[i] for i in sorted(blocks)) if b is not None],
    "peak_rss_bytes": int(peak) * 1024,
    "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
}))
sys.exit(code)
"""


def generate_checkpoint(path: Path, layers: int, shape: dict, device: str, stories: Path) -> int:
    """A Llama checkpoint of `shape` with `layers` blocks, random fp16 weights (HF's init), the
    stories260k tokenizer (its 512 ids are valid in any larger vocabulary). Returns its bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**shape, "num_hidden_layers": layers, "tie_word_embeddings": False})
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(path)
    del model
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (stories / name).is_file():
            shutil.copy(stories / name, path / name)
    if device == "cuda":
        torch.cuda.empty_cache()
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run_quantize(args) -> int:
    device = "cpu" if args.dry_run else "cuda"
    env = environment(device)
    shape = DRY_RUN_LAYER if args.dry_run else LLAMA2_7B_LAYER
    calib = ["--calib", str(args.data / "c4-calibration-sample.txt")]
    calib += ["--nsamples", "4", "--calib-seqlen", "32"] if args.dry_run else []
    stem = "quantize-gptq-rot-dryrun" if args.dry_run else "quantize-gptq-rot"
    payload = {
        "env": env,
        "dry_run": args.dry_run,
        "what": "llmquant quantize --method gptq-rot of a generated checkpoint, random fp16 weights",
        "shape": {**shape, "num_hidden_layers": args.layers},
        "calibration": " ".join(calib) + ("" if args.dry_run else " (64 x 256 tokens by default)"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "out"
        t0 = time.perf_counter()
        payload["checkpoint_bytes"] = generate_checkpoint(src, args.layers, shape, device, args.data / "stories260k")
        payload["generate_seconds"] = time.perf_counter() - t0
        path = _save(args.out, stem, payload)
        size, took = payload["checkpoint_bytes"] / 1e6, payload["generate_seconds"]
        print(f"generated {size:.1f} MB in {took:.1f} s", flush=True)
        cmd = [sys.executable, "-c", _CHILD, "quantize", str(src), "-o", str(dst), "--method", "gptq-rot"]
        cmd += ["--quiet", *calib]
        env_child = dict(os.environ)
        if args.dry_run:
            env_child["CUDA_VISIBLE_DEVICES"] = ""
        # cwd: not the project root, whose kernels/ folder would shadow the `kernels` package transformers probes
        # stderr (per-block times, errors) goes straight to the log, so a run killed at its limit shows progress
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env_child, cwd=tmp)
        sys.stdout.write(done.stdout.replace("CHILD_RESULT", "child:"))
        line = next((x for x in done.stdout.splitlines() if x.startswith("CHILD_RESULT ")), None)
        if line is None:
            payload["error"] = f"exit {done.returncode} (its stderr is in the log)"
            _save(args.out, stem, payload)
            return 1
        child = json.loads(line.removeprefix("CHILD_RESULT "))
        payload.update(child)
        payload["output_bytes"] = sum(f.stat().st_size for f in dst.glob("*.safetensors")) if dst.is_dir() else None
    blocks = payload["block_seconds"]
    if blocks:
        # The first block also pays one-off costs (lazy initialisation, first kernels): the steady
        # per-block time is the median of the others, and the first counts with the fixed part.
        steady = blocks[1:] or blocks
        per_block = statistics.median(steady)
        fixed = payload["seconds"] - sum(steady)
        payload["per_block_seconds_median"] = per_block
        payload["outside_steady_blocks_seconds"] = fixed
        payload["extrapolated_32_layer_seconds"] = fixed + (32 - (len(blocks) - len(steady))) * per_block
        payload["extrapolation"] = (
            "(child wall seconds - sum of the blocks after the first) + one block per further layer at the "
            f"median of those: an estimate from {len(blocks)} blocks, not a 32-layer measurement; peak memory "
            f"is that of the {args.layers}-layer run"
        )
    path = _save(args.out, stem, payload)
    print(json.dumps({k: v for k, v in payload.items() if k != "env"}, indent=1))
    print(f"wrote {path}")
    return payload["exit_code"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=("eval", "quantize"))
    parser.add_argument("--out", type=Path, default=REPO / "evals" / "results")
    parser.add_argument(
        "--data", type=Path, required=True, help="the shared data folder (stories260k/, tinystories and C4 texts)"
    )
    parser.add_argument("--max-windows", type=int, default=None, help="eval: score only the first N windows")
    parser.add_argument("--layers", type=int, default=3, help="quantize: decoder blocks of the generated checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: CPU and the Triton interpreter, tiny sizes")
    args = parser.parse_args(argv)
    if args.dry_run and args.check == "eval":
        from . import bench_kernels

        bench_kernels.dry_run_environment()
        args.max_windows = args.max_windows or 1  # ~0.2 s per interpreted launch
    elif args.dry_run:
        args.layers = min(args.layers, 2)
    else:
        from .meta import require_cuda

        require_cuda(f"bench_gpu_checks {args.check}")
    return run_eval(args) if args.check == "eval" else run_quantize(args)


if __name__ == "__main__":
    sys.exit(main())
