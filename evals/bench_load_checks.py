"""What the load-time value checks (scales finite and positive, zero points in range) cost.

    python -m llmquant.evals.bench_load_checks [--model DIR] [--rounds 7] [--out evals/results]
    python -m llmquant.evals.bench_load_checks --show evals/results/load-checks-smollm2-*.json

Quantizes SmolLM2-135M (fp16, `scripts/prepare_smollm2.py`) to int4 g64 once, then loads it with
a plain `from_pretrained` `--rounds` times with the checks and as many times with
`llmquant.checkpoint.verify.check_stored_values` (read the scales and zeros from the files, check them) replaced
by a no-op, alternating (so drift in machine load hits both
sides alike), after one warm-up load that fills the page cache. Also times the checks alone (the same
call on the loaded model's layers and the checkpoint file), which is the cost without the loads' noise.
Writes JSON + Markdown (device, versions, commit, date); `--show` prints the table of a result file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .meta import REPO, RESULTS, console_table, environment, write_results

COLUMNS = ["load", "median s", "min s", "rounds"]


def _load_seconds(folder: Path) -> float:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(folder)
    return time.perf_counter() - start


def measure(model_dir: Path, rounds: int) -> dict:
    import llmquant
    from llmquant.checkpoint import verify
    from llmquant.checkpoint.quantize import quantize_checkpoint

    with tempfile.TemporaryDirectory(prefix="llmquant-load-checks-") as scratch:
        folder = Path(scratch) / "int4-g64"
        quantize_checkpoint(str(model_dir), folder, llmquant.QuantConfig(bits=4, group_size=64), progress=False)
        real = verify.check_stored_values
        _load_seconds(folder)  # warm-up: page cache, lazy imports
        timings: dict[str, list[float]] = {"with checks": [], "without checks": []}
        for _ in range(rounds):
            for label in timings:
                verify.check_stored_values = real if label == "with checks" else (lambda *args, **kwargs: None)
                try:
                    timings[label].append(_load_seconds(folder))
                finally:
                    verify.check_stored_values = real
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder)
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, llmquant.QuantLinear)]
        files = sorted(folder.glob("*.safetensors"))
        alone = []
        for _ in range(rounds):
            start = time.perf_counter()
            real(model, files)
            alone.append(time.perf_counter() - start)
        scanned = sum(m.scales.numel() + (m.qzeros.numel() if m.qzeros is not None else 0) for _, m in layers)
    with_checks, without = (statistics.median(timings[k]) for k in ("with checks", "without checks"))
    return {
        "model": str(model_dir),
        "config": "int4-g64 (asymmetric, rtn)",
        "loader": "AutoModelForCausalLM.from_pretrained(folder) (CPU, float32 compute)",
        "rounds": rounds,
        "quantized_layers": len(layers),
        "values_scanned": scanned,
        "load_seconds": timings,
        "median_with_checks_s": with_checks,
        "median_without_checks_s": without,
        "added_percent_of_load": 100 * (with_checks - without) / without,
        "checks_alone_median_ms": 1000 * statistics.median(alone),
        "checks_alone_percent_of_load": 100 * statistics.median(alone) / without,
    }


def rows(result: dict) -> list[list[str]]:
    table = [
        [label, f"{statistics.median(values):.3f}", f"{min(values):.3f}", str(len(values))]
        for label, values in result["load_seconds"].items()
    ]
    table.append(
        [
            "checks alone (all layers)",
            f"{result['checks_alone_median_ms'] / 1000:.4f}",
            "",
            str(result["rounds"]),
        ]
    )
    return table


def summary(result: dict) -> str:
    """The verdict: the checks' own time against the fastest load without them (the least disturbed
    one, so the largest share); the medians' difference is mostly other processes' noise."""
    fastest = min(result["load_seconds"]["without checks"])
    alone = result["checks_alone_median_ms"] / 1000
    return (
        f"the checks alone: {1000 * alone:.1f} ms = {100 * alone / fastest:.2f}% of the fastest load without them "
        f"({fastest:.2f} s; {result['checks_alone_percent_of_load']:.2f}% of the median), {result['quantized_layers']} "
        f"layers, {result['values_scanned']:,} scales and zeros; median load with/without: "
        f"{result['added_percent_of_load']:+.1f}% (noise of a shared machine, not the checks)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="fp16 SmolLM2 folder (default: prepare it)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--show", type=Path, default=None, help="print the table of a result JSON and exit")
    args = parser.parse_args()
    if args.show is not None:
        result = json.loads(args.show.read_text())
        print(console_table(COLUMNS, rows(result)))
        print(summary(result))
        return
    if args.model is None:
        import importlib.util

        if REPO is None:
            parser.error("--model is required outside a source checkout (the default is prepared by its scripts/)")
        scripts = REPO / "scripts" / "prepare_smollm2.py"  # a source checkout's (found through git)
        spec = importlib.util.spec_from_file_location("prepare_smollm2", scripts)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        args.model = module.prepare()
    result = measure(args.model, args.rounds)
    result["env"] = environment(torch.device("cpu"))
    write_report(args.out, result)


def write_report(out: Path, result: dict) -> None:
    """JSON + Markdown of a measurement (also used to re-render the Markdown of a stored JSON)."""
    json_path, md_path = write_results(
        out, "load-checks-smollm2", result, COLUMNS, rows(result), "Load-time value checks, SmolLM2-135M"
    )
    with md_path.open("a") as handle:
        handle.write(f"\n{summary(result)}\n\n`python -m llmquant.evals.bench_load_checks`\n")
    print(console_table(COLUMNS, rows(result)))
    print(summary(result))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
