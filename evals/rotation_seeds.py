"""How much gptq-rot's perplexity depends on its random rotations: one config, several rotation seeds.

    python -m evals.rotation_seeds MODEL_DIR --config int3-g128-gptq-rot --seeds 0 1 2 \\
        --dataset wikitext-2-raw-v1-test.jsonl --calib c4-calibration-sample.txt \\
        --out evals/results/rotation-seeds-smollm2

The rotations are Haar-random (`llmquant.methods.rotation.SEED`, 0 in the package); each seed
quantizes the float model afresh with the calibration set (--calib) and is scored on the same
windows as the float baseline of the same run (the issue-9 protocol: seqlen 2048, 16 windows,
float32). Prints a table and writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import llmquant
from llmquant.methods import rotation

from .cli import load_model, load_tokenizer
from .data import load_text, make_windows, tokenize
from .meta import environment
from .perplexity import score, summarize


def ppl(scored) -> float:
    return summarize(scored)["ppl"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.rotation_seeds", description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--config", default="int3-g128-gptq-rot")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dataset", required=True)
    p.add_argument("--calib", default=None, help="calibration data (default: c4 from the Hub; see llmquant quantize)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    config = llmquant.QuantConfig.from_short_name(args.config)
    if not llmquant.methods.get_method(config.method).rotation:
        p.error(f"--config {args.config}: method {config.method!r} has no rotation")
    tokenizer = load_tokenizer(args.model)
    tokens = tokenize(tokenizer, load_text(args.dataset))
    windows = make_windows(tokens.numel(), args.seqlen, max_windows=args.max_windows)
    calibration = llmquant.load_calibration(tokenizer, args.calib)
    device = torch.device("cpu")
    float_model = load_model(args.model, torch.float32, device)
    base = ppl(score({"float": float_model}, tokens, windows, progress=False)["float"])
    del float_model
    rows = []
    for seed in args.seeds:
        rotation.SEED = seed
        model = load_model(args.model, torch.float32, device)
        start = time.perf_counter()
        llmquant.quantize_(model, config, calibration=calibration, progress=False)
        seconds = time.perf_counter() - start
        value = ppl(score({"q": model}, tokens, windows, progress=False)["q"])
        rows.append({"seed": seed, "ppl": value, "delta_ppl": value - base, "quant_seconds": seconds})
        print(f"seed {seed}: ppl {value:.4f} (+{value - base:.3f}), quantize {seconds:.0f} s", flush=True)
    deltas = [r["delta_ppl"] for r in rows]
    calib = calibration.describe()
    payload = {
        "model": args.model,
        "config": args.config,
        "dataset": args.dataset,
        "seqlen": args.seqlen,
        "windows": len(windows),
        "scored_tokens": sum(w.n_scored for w in windows),
        "calibration": calib,
        "baseline_ppl": base,
        "rows": rows,
        "delta_ppl_mean": statistics.mean(deltas),
        "delta_ppl_spread": max(deltas) - min(deltas),
        "command": "python -m evals.rotation_seeds " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(device),
    }
    lines = [
        f"# {args.config}: Δppl per rotation seed",
        "",
        f"{args.dataset}, seqlen {args.seqlen}, {len(windows)} windows, float32 on CPU; baseline ppl {base:.4f} "
        f"in the same run; calibration {calib['nsamples']} x {calib['seqlen']} "
        "tokens of the default set (seed 0).",
        "",
        "| rotation seed | ppl | Δppl | quantize_ s |",
        "| ---: | ---: | ---: | ---: |",
        *[f"| {r['seed']} | {r['ppl']:.4f} | +{r['delta_ppl']:.3f} | {r['quant_seconds']:.0f} |" for r in rows],
        "",
        f"Mean Δppl +{payload['delta_ppl_mean']:.3f}, spread (max - min) {payload['delta_ppl_spread']:.3f}.",
        f"Command: `{payload['command']}`. Commit {payload['environment']['git_commit']}, "
        f"{payload['environment']['date']}.",
        "",
    ]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
