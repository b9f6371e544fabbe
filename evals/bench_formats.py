"""Export/convert time and peak memory on SmolLM2-135M, and read-back by llmquant.load.

    python -m llmquant.evals.bench_formats [--model DIR] [--out evals/results/formats-smollm2]

Each step runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own; the baseline is the
peak of a process that only imports llmquant and builds the meta skeleton. Writes JSON + Markdown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .meta import environment

STEP = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
import llmquant
from llmquant.cli import main
argv = json.loads(sys.argv[1])
start = time.perf_counter()
code = main(argv) if argv else 0
print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

READBACK = r"""
import json, sys, torch
torch.set_num_threads(1)
import llmquant
from transformers import AutoModelForCausalLM
a = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
b = llmquant.load(sys.argv[2], dtype=torch.float32)
tokens = torch.randint(3, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    same = torch.equal(a(tokens).logits, b(tokens).logits)
print(json.dumps({"logits_identical": same}))
"""


def _run(code: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path("~/.cache/llmquant/smollm2-135m").expanduser()))
    parser.add_argument("--out", default="evals/results/formats-smollm2")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        baseline = _run(STEP, "[]")
        for group in (64, 128):
            for sym in (True, False):
                name = f"int4-g{group}" + ("-sym" if sym else "")
                flags = ["--bits", "4", "--group-size", str(group)] + (["--sym"] if sym else []) + ["--quiet"]
                src = root / f"{name}-llmquant"
                step = _run(STEP, json.dumps(["quantize", args.model, "-o", str(src), *flags]))
                rows.append({"config": name, "step": "quantize --format llmquant", **step})
                for fmt in ("gptq", "compressed-tensors"):
                    out = root / f"{name}-{fmt}"
                    step = _run(STEP, json.dumps(["quantize", args.model, "-o", str(out), *flags, "--format", fmt]))
                    rows.append({"config": name, "step": f"quantize --format {fmt}", **step})
                    if step.get("code") != 0:
                        continue
                    conv = root / f"{name}-{fmt}-convert"
                    step = _run(STEP, json.dumps(["convert", str(src), "-o", str(conv), "--format", fmt, "--quiet"]))
                    rows.append({"config": name, "step": f"convert llmquant -> {fmt}", **step})
                    rows.append({"config": name, "step": f"llmquant.load({fmt}) vs llmquant",
                                 **_run(READBACK, str(src), str(out))})
    payload = {"model": args.model, "baseline_peak_rss_mib": baseline.get("peak_rss_mib"), "rows": rows,
               "environment": environment("cpu")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["| config | step | exit | seconds | peak RSS MiB | result |", "|---|---|---|---|---|---|"]
    for row in rows:
        result = row.get("error") or ("identical logits" if row.get("logits_identical") else "")
        if "logits_identical" in row and not row["logits_identical"]:
            result = "LOGITS DIFFER"
        sec = f"{row['seconds']:.1f}" if "seconds" in row else ""
        rss = f"{row['peak_rss_mib']:.0f}" if "peak_rss_mib" in row else ""
        lines.append(f"| {row['config']} | {row['step']} | {row.get('code', '')} | {sec} | {rss} | {result} |")
    head = f"Baseline peak RSS (import + CLI, no work): {payload['baseline_peak_rss_mib']:.0f} MiB\n\n"
    text = head + "\n".join(lines)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
