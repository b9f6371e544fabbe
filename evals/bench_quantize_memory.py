"""Peak memory of `llmquant quantize` (rtn streaming vs a calibrated method) on SmolLM2-135M.

    python -m llmquant.evals.bench_quantize_memory [--model DIR] [--threads 2] [--calib FILE]
        [--out evals/results/quantize-memory-smollm2] [--before earlier.json]

Each command runs in a fresh child process; its peak resident memory is the kernel's VmHWM at
exit, so it is that command's own. Rows: the CLI importing everything and doing nothing, rtn
(the streaming writer: one tensor at a time), and each calibrated method. Beside them, what the
issue's target is measured against: one decoder block's float32 weights and one copy of the
calibration hidden states [nsamples, seqlen, hidden] float32. `--before` adds the rows of an
earlier run of this script (e.g. at the commit before a change) to the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .meta import environment

MIB = 1024 * 1024

_CHILD = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from llmquant.cli import main
code = main(sys.argv[2:]) if len(sys.argv) > 2 else 0
peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print("VMHWM_KB", peak)
sys.exit(code)
"""


def run_cli(args: list[str], threads: int) -> dict:
    """`llmquant ARGS` in a child process: exit code, wall seconds, peak resident bytes (VmHWM)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, str(threads), *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or "VMHWM_KB" not in done.stdout:
        raise SystemExit(f"llmquant {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    peak_kb = int(done.stdout.split("VMHWM_KB")[1].split()[0])
    return {"command": "llmquant " + " ".join(args), "seconds": seconds, "peak_rss_bytes": peak_kb * 1024}


def block_and_activation_bytes(model: Path, nsamples: int, seqlen: int) -> dict:
    """float32 bytes of one decoder block (from a meta skeleton) and of one copy of the
    calibration hidden states [nsamples, seqlen, hidden]."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmquant.calibration.loop import decoder_blocks

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    _, blocks = decoder_blocks(skeleton)
    block = sum(p.numel() for p in blocks[0].parameters()) * 4
    model_bytes = sum(p.numel() for p in skeleton.parameters()) * 4
    hidden = nsamples * seqlen * config.hidden_size * 4
    return {"block_fp32_bytes": block, "hidden_states_fp32_bytes": hidden, "model_fp32_bytes": model_bytes}


def markdown(payload: dict, before: dict | None) -> str:
    est = payload["estimates"]
    base = next(r for r in payload["rows"] if r["name"] == "rtn")["peak_rss_bytes"]
    lines = [
        f"`llmquant quantize` peak resident memory (VmHWM of a child process), {payload['model']}, "
        f"{payload['threads']} threads, calibration {payload['nsamples']} x {payload['seqlen']} tokens.",
        "",
        "| run | command | seconds | peak RSS MiB | above rtn (streaming baseline) MiB |",
        "|---|---|---:|---:|---:|",
    ]
    runs = [("this commit", payload)]
    if before:
        runs.append((before.get("label") or "before", before))
    for label, data in runs:
        for row in data["rows"]:
            above = (row["peak_rss_bytes"] - base) / MIB
            lines.append(
                f"| {label} | {row['name']} | {row['seconds']:.1f} | {row['peak_rss_bytes'] / MIB:.0f} | {above:+.0f} |"
            )
    lines += [
        "",
        f"One decoder block, float32: {est['block_fp32_bytes'] / MIB:.1f} MiB; one copy of the calibration hidden "
        f"states [{payload['nsamples']}, {payload['seqlen']}, hidden] float32: "
        f"{est['hidden_states_fp32_bytes'] / MIB:.1f} MiB"
        + (
            f"; the whole model, float32: {est['model_fp32_bytes'] / MIB:.1f} MiB."
            if "model_fp32_bytes" in est
            else "."
        ),
        "",
        f"commit {payload['environment'].get('git_commit')}, {payload['environment'].get('date')}, "
        f"{payload['environment'].get('device')}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path("~/.cache/llmquant/smollm2-135m").expanduser()))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["gptq"])
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--calib", default=None, help="calibration data passed to llmquant quantize (default: its own)")
    parser.add_argument("--label", default=None, help="a name for this run (recorded in the JSON)")
    parser.add_argument("--before", default=None, help="JSON of an earlier run to show beside this one")
    parser.add_argument("--out", default="evals/results/quantize-memory-smollm2")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)  # so that environment() records the threads the children use
    model = Path(args.model).expanduser()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        rows.append({"name": "import only", **run_cli([], args.threads)})
        rtn = ["quantize", str(model), "-o", f"{scratch}/rtn", "--quiet"]
        rows.append({"name": "rtn", **run_cli(rtn, args.threads)})
        for method in args.methods:
            calib = ["--nsamples", str(args.nsamples), "--calib-seqlen", str(args.calib_seqlen)]
            calib += ["--calib", args.calib] if args.calib else []
            cmd = ["quantize", str(model), "-o", f"{scratch}/{method}", "--method", method, "--quiet", *calib]
            rows.append({"name": method, **run_cli(cmd, args.threads)})
    payload = {
        "label": args.label,
        "model": str(model),
        "threads": args.threads,
        "nsamples": args.nsamples,
        "seqlen": args.calib_seqlen,
        "rows": rows,
        "estimates": block_and_activation_bytes(model, args.nsamples, args.calib_seqlen),
        "environment": environment("cpu"),
    }
    before = json.loads(Path(args.before).read_text()) if args.before else None
    if before:
        payload["before"] = before
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(payload, before)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
