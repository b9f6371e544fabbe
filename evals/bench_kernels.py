"""Microbenchmark of the fused dequant-matmul kernels against fp16 `F.linear` (a benchmark, not a test).

    python -m llmquant.evals.bench_kernels [--quick] [--out DIR]

For Llama-2-7B and Llama-3-70B linear shapes (N x K) and M tokens it reports the median time
(`triton.testing.do_bench`, L2 flushed between runs), the speedup over fp16 `F.linear` on the same
inputs, the achieved bandwidth over the bytes the kernel must move (packed weights + scales +
zeros + x + y) and that as a fraction of a device-to-device copy measured in the same run, plus
the max error against fp16 `F.linear` on the dequantized weight. Writes
`bench_kernels-<gpu>.json` and `.md` under `evals/results/` (or --out). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .meta import RESULTS, console_table, environment, require_cuda, write_results

SHAPES = {  # name: [(N, K), ...] as nn.Linear(out_features=N, in_features=K)
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama3-70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
}
M_VALUES = (1, 2, 4, 8, 16, 32, 64, 128, 512, 2048)
QUANTS = {"int4-g128-asym": (4, 128, False), "int8-g128-sym": (8, 128, True)}
QUICK_M = (1, 16, 128, 2048)


def random_quantized(n: int, k: int, bits: int, group: int, sym: bool, device: str = "cuda"):
    """Random packed weight of shape N x K: (qweight, scales fp16, qzeros | None, dequantized fp16 W [N, K])."""
    from llmquant.kernels import dequantize, pack_codes

    codes = torch.randint(0, 1 << bits, (n, k), device=device, dtype=torch.uint8)
    qweight = pack_codes(codes, bits)
    del codes
    n_groups = -(-k // group)
    scales = ((torch.rand(n_groups, n, device=device) + 0.5) / ((1 << bits) * k**0.5)).half()
    qzeros = None if sym else torch.randint(0, 1 << bits, (n_groups, n), device=device, dtype=torch.uint8)
    weight = dequantize(qweight, scales, qzeros, bits, group, k, dtype=torch.float16)
    return qweight, scales, qzeros, weight


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (read + write counted) of a `nbytes` buffer."""
    import triton

    big = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
    ms = triton.testing.do_bench(lambda: torch.empty_like(big).copy_(big), return_mode="median")
    return 2 * nbytes / (ms * 1e-3) / 1e9


COLUMNS = ["model", "N x K", "quant", "M", "fp16 us", "quant us", "speedup", "GB/s", "of copy", "max rel err"]


def measure(packed: tuple, bits: int, group: int, m: int) -> dict:
    """Time one (weight, M) pair: quantized kernel vs fp16 F.linear on the dequantized weight."""
    import triton
    from llmquant.kernels.triton_matmul import quant_matmul

    qweight, scales, qzeros, weight = packed
    x = torch.randn(m, weight.shape[1], device="cuda", dtype=torch.float16)

    def run_q():
        return quant_matmul(x, qweight, scales, qzeros, None, bits, group)

    y = run_q()  # tunes this shape once (then cached per GPU)
    ref = F.linear(x, weight)
    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
    ms_q = triton.testing.do_bench(run_q, return_mode="median")
    ms_f = triton.testing.do_bench(lambda: F.linear(x, weight), return_mode="median")
    moved = qweight.nbytes + scales.nbytes + (qzeros.nbytes if qzeros is not None else 0) + x.nbytes + y.nbytes
    return dict(fp16_ms=ms_f, quant_ms=ms_q, speedup=ms_f / ms_q, bytes=moved, max_rel_err=err, ok=err < 1e-2)


def bench(shape_sets: list[str], m_values: tuple[int, ...], quants: list[str]) -> tuple[dict, list[list[str]]]:
    copy_gbps = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s", flush=True)
    records, rows = [], []
    for model in shape_sets:
        for n, k in SHAPES[model]:
            for quant in quants:
                bits, group, sym = QUANTS[quant]
                packed = random_quantized(n, k, bits, group, sym)
                for m in m_values:
                    rec = dict(model=model, n=n, k=k, quant=quant, bits=bits, group_size=group, sym=sym, m=m)
                    rec.update(measure(packed, bits, group, m))
                    rec["gbps"] = rec["bytes"] / (rec["quant_ms"] * 1e-3) / 1e9
                    rec["frac_of_copy"] = rec["gbps"] / copy_gbps
                    records.append(rec)
                    row = [
                        model, f"{n}x{k}", quant, str(m), f"{rec['fp16_ms'] * 1e3:.1f}",
                        f"{rec['quant_ms'] * 1e3:.1f}", f"{rec['speedup']:.2f}x", f"{rec['gbps']:.0f}",
                        f"{rec['frac_of_copy']:.0%}", f"{rec['max_rel_err']:.1e}" + ("" if rec["ok"] else " FAIL"),
                    ]  # fmt: skip
                    rows.append(row)
                    print("  ".join(row), flush=True)
                del packed
                torch.cuda.empty_cache()
    return {"copy_gbps": copy_gbps, "results": records}, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Llama-2-7B shapes, int4 only, M in 1/16/128/2048")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown (%(default)s)")
    args = parser.parse_args(argv)
    require_cuda("bench_kernels")
    if args.quick:
        sets, m_values, quants = ["llama2-7b"], QUICK_M, ["int4-g128-asym"]
    else:
        sets, m_values, quants = list(SHAPES), M_VALUES, list(QUANTS)
    env = environment()
    print(", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    print("  ".join(COLUMNS), flush=True)
    data, rows = bench(sets, m_values, quants)
    payload = {"env": env, "quick": args.quick, **data}
    paths = write_results(args.out, "bench_kernels", payload, COLUMNS, rows, "Fused dequant-matmul vs fp16 F.linear")
    print("\n" + console_table(COLUMNS, rows))
    print("wrote " + ", ".join(map(str, paths)))
    bad = [r for r in data["results"] if not r["ok"]]
    if bad:
        print(f"{len(bad)} shapes exceed 1e-2 relative error against fp16 F.linear", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
