"""Microbenchmark of the quantized matmul against fp16 cuBLAS, torch tinygemm and gemlite in the
same run (a benchmark, not a test).

    python -m llmquant.evals.bench_kernels [--quick | --full] [--budget-s S] [--out DIR] [--dry-run]

For Llama-2-7B and Llama-3-70B linear shapes (N x K) and M tokens it reports, per row:

* GPU time by CUDA-graph replay (`triton.testing.do_bench_cudagraph`, median) of fp16 `F.linear`,
  bf16 `F.linear`, llmquant `quant_matmul`, torch tinygemm (`aten._weight_int4pack_mm`, bf16,
  int4 rows only; compared with bf16 cuBLAS) and gemlite (int4 rows, when importable);
* eager us per call (plain loop, synchronised once) of fp16 `F.linear` and of `QuantLinear.forward`:
  what an un-compiled `generate` pays per layer, CPU launch cost included;
* llmquant's speedup over fp16, its GB/s over the bytes it must move and that as a fraction of a
  device-to-device copy measured in the same run, the route taken and the max error against fp16
  `F.linear` on the dequantized weight.

Writes `bench_kernels-<gpu>.json` and `.md` under `evals/results/` (or --out). Needs a CUDA device;
`--dry-run` exercises the table and file writing on CPU with no measurement (every time "n/a").
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .meta import RESULTS, console_table, environment, require_cuda, write_results

SHAPES = {  # name: [(N, K), ...] as nn.Linear(out_features=N, in_features=K)
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama3-70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
}
QUANTS = {"int4-g128-asym": (4, 128, False), "int8-g128-sym": (8, 128, True)}
# (quant, M values) per mode; the standard mode covers the targets of issue 8 in a few minutes.
MODES = {
    "quick": (["llama2-7b"], {"int4-g128-asym": (1, 16, 256, 2048)}),
    "standard": (list(SHAPES), {"int4-g128-asym": (1, 4, 16, 64, 256, 2048), "int8-g128-sym": (1, 16)}),
    "full": (list(SHAPES), {q: (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048) for q in QUANTS}),
}

COLUMNS = [
    "N x K", "quant", "M", "route", "fp16 us", "llmquant us", "llmquant x fp16", "of copy", "tinygemm us",
    "tinygemm x bf16", "gemlite us", "gemlite x fp16", "F.linear eager us", "QuantLinear eager us", "max rel err",
]  # fmt: skip


def random_quantized(n: int, k: int, bits: int, group: int, sym: bool, device: str = "cuda"):
    """Random packed weight N x K: (codes [N, K] uint8, qweight, scales fp16, qzeros | None, W fp16 [N, K])."""
    from llmquant.kernels import dequantize, pack_codes

    codes = torch.randint(0, 1 << bits, (n, k), device=device, dtype=torch.uint8)
    qweight = pack_codes(codes, bits)
    n_groups = -(-k // group)
    scales = ((torch.rand(n_groups, n, device=device) + 0.5) / ((1 << bits) * k**0.5)).half()
    qzeros = None if sym else torch.randint(0, 1 << bits, (n_groups, n), device=device, dtype=torch.uint8)
    weight = dequantize(qweight, scales, qzeros, bits, group, k, dtype=torch.float16)
    return codes, qweight, scales, qzeros, weight


def graph_us(fn) -> float:
    """Median GPU time of fn by CUDA-graph replay, in us (NaN if the capture fails)."""
    import triton

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3
    except Exception as e:  # noqa: BLE001 - an anchor that cannot be captured is reported as n/a
        print(f"  cudagraph failed: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
        return math.nan


def eager_us(fn, calls: int = 200) -> float:
    """us per call of fn from a plain Python loop (CPU launch cost included), synchronised once."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (read + write counted) of a `nbytes` buffer."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    us = graph_us(lambda: dst.copy_(src))
    return 2 * nbytes / (us * 1e-6) / 1e9


def tinygemm_pack(codes, scales, qzeros, group: int):
    """torch tinygemm's layout for int4 codes: (packed weight, scales_and_zeros [G, N, 2] bf16) with
    w = (c - 8) * s + zt, zt = (8 - z) * s, the same weight as llmquant's (c - z) * s."""
    packed_u8 = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
    wpk = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
    z = torch.full_like(scales, 8.0) if qzeros is None else qzeros.float()
    zt = (8.0 - z) * scales.float()
    return wpk, torch.stack([scales.float(), zt], dim=2).bfloat16().contiguous()


def gemlite_layer(codes, scales, qzeros, group: int, n: int, k: int):
    """A gemlite int4 layer for the same weight (HQQ convention (Wq - z) * s), or None if unavailable."""
    try:
        from gemlite import DType, GemLiteLinear

        layer = GemLiteLinear(
            4, group_size=group, in_features=k, out_features=n, input_dtype=DType.FP16, output_dtype=DType.FP16
        )
        zeros = torch.full_like(scales, 8.0) if qzeros is None else qzeros.half()
        layer.pack(codes, scales.t().contiguous(), zeros.t().contiguous(), None)
        return layer
    except Exception as e:  # noqa: BLE001 - optional anchor
        print(f"  gemlite unavailable: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
        return None


def quant_linear(qweight, scales, qzeros, bits: int, group: int, sym: bool, n: int, k: int):
    from llmquant import QuantLinear

    module = QuantLinear(k, n, bits, group, sym, bias=False, dtype=torch.float16, device="cuda")
    module.load_packed({"qweight": qweight, "scales": scales, **({} if sym else {"qzeros": qzeros})})
    return module


def measure(packed, bits: int, group: int, sym: bool, m: int, anchors: dict) -> dict:
    """Time one (weight, M) pair against the anchors; all times in us."""
    from llmquant.kernels import dispatch

    codes, qweight, scales, qzeros, weight = packed
    n, k = weight.shape
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    xb, wb = x.bfloat16(), anchors["wb"]
    module = quant_linear(qweight, scales, qzeros, bits, group, sym, n, k)
    y = module(x)  # tunes this shape once (then cached per GPU and Triton version)
    ref = F.linear(x, weight).float()
    err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    cfg = next(iter(module.__dict__["_triton_prepared"].configs.values()))
    rec = dict(route=cfg.route, config=dataclasses.asdict(cfg), max_rel_err=err, ok=err < 1e-2)
    rec["fp16_us"] = graph_us(lambda: F.linear(x, weight))
    rec["bf16_us"] = graph_us(lambda: F.linear(xb, wb))
    rec["quant_us"] = graph_us(lambda: dispatch.quant_matmul(x, qweight, scales, qzeros, None, bits, group))
    rec["fp16_eager_us"] = eager_us(lambda: F.linear(x, weight))
    rec["quantlinear_eager_us"] = eager_us(lambda: module(x))
    if anchors.get("tinygemm") is not None:
        wpk, sz = anchors["tinygemm"]
        yt = torch.ops.aten._weight_int4pack_mm(xb, wpk, group, sz).float()
        rec["tinygemm_err"] = ((yt - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
        rec["tinygemm_us"] = graph_us(lambda: torch.ops.aten._weight_int4pack_mm(xb, wpk, group, sz))
    if anchors.get("gemlite") is not None:
        rec["gemlite_us"] = graph_us(lambda: anchors["gemlite"](x))
    moved = qweight.nbytes + scales.nbytes + (qzeros.nbytes if qzeros is not None else 0) + x.nbytes + y.nbytes
    rec["bytes"] = moved
    return rec


def derive(rec: dict, copy_gbps: float) -> dict:
    """Ratios: speedups over fp16 (tinygemm over bf16), GB/s and the fraction of copy bandwidth."""
    q = rec.get("quant_us")
    rec["speedup"] = rec["fp16_us"] / q if q else None
    rec["gbps"] = rec["bytes"] / (q * 1e-6) / 1e9 if q else None
    rec["frac_of_copy"] = rec["gbps"] / copy_gbps if rec["gbps"] and copy_gbps else None
    if rec.get("tinygemm_us"):
        rec["tinygemm_x_bf16"] = rec["bf16_us"] / rec["tinygemm_us"]
    if rec.get("gemlite_us"):
        rec["gemlite_x_fp16"] = rec["fp16_us"] / rec["gemlite_us"]
    return rec


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def table_row(r: dict) -> list[str]:
    return [
        f"{r['n']}x{r['k']}", r["quant"], str(r["m"]), r.get("route") or "n/a",
        _fmt(r.get("fp16_us"), ".1f"), _fmt(r.get("quant_us"), ".1f"), _fmt(r.get("speedup"), ".2f"),
        _fmt(r.get("frac_of_copy"), ".0%"), _fmt(r.get("tinygemm_us"), ".1f"), _fmt(r.get("tinygemm_x_bf16"), ".2f"),
        _fmt(r.get("gemlite_us"), ".1f"), _fmt(r.get("gemlite_x_fp16"), ".2f"),
        _fmt(r.get("fp16_eager_us"), ".1f"), _fmt(r.get("quantlinear_eager_us"), ".1f"),
        _fmt(r.get("max_rel_err"), ".1e") + ("" if r.get("ok", True) else " FAIL"),
    ]  # fmt: skip


def bench(mode: str, budget_s: float) -> tuple[dict, list[list[str]]]:
    start = time.perf_counter()
    copy_gbps = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s", flush=True)
    sets, quants = MODES[mode]
    records, rows, skipped = [], [], 0
    for model in sets:
        for n, k in SHAPES[model]:
            for quant, m_values in quants.items():
                if time.perf_counter() - start > budget_s:
                    skipped += len(m_values)
                    continue
                bits, group, sym = QUANTS[quant]
                packed = random_quantized(n, k, bits, group, sym)
                anchors = {"wb": packed[4].bfloat16()}
                if bits == 4:
                    try:
                        anchors["tinygemm"] = tinygemm_pack(packed[0], packed[2], packed[3], group)
                    except Exception as e:  # noqa: BLE001 - optional anchor
                        print(f"  tinygemm unavailable: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
                    anchors["gemlite"] = gemlite_layer(packed[0], packed[2], packed[3], group, n, k)
                for m in m_values:
                    rec = dict(model=model, n=n, k=k, quant=quant, bits=bits, group_size=group, sym=sym, m=m)
                    rec.update(measure(packed, bits, group, sym, m, anchors))
                    records.append(derive(rec, copy_gbps))
                    rows.append(table_row(rec))
                    print("  ".join(rows[-1]), flush=True)
                del packed, anchors
                torch.cuda.empty_cache()
    if skipped:
        print(f"time budget of {budget_s:.0f} s reached: {skipped} rows not measured", flush=True)
    return {"copy_gbps": copy_gbps, "results": records, "rows_skipped_for_time": skipped}, rows


def dry_run_data(mode: str) -> tuple[dict, list[list[str]]]:
    """The shape of a result file with nothing measured (CPU check of the writing path)."""
    sets, quants = MODES[mode]
    records = [
        dict(model=model, n=n, k=k, quant=q, m=m, route=None, fp16_us=None, quant_us=None, bytes=0)
        for model in sets
        for n, k in SHAPES[model]
        for q, ms in quants.items()
        for m in ms
    ]
    records = [derive(r, None) for r in records]
    return {"copy_gbps": None, "results": records, "dry_run": True}, [table_row(r) for r in records]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="Llama-2-7B shapes, int4 only, M in 1/16/256/2048")
    group.add_argument("--full", action="store_true", help="every M from 1 to 2048, int4 and int8")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting new shapes after this")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown (%(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: write the table with nothing measured")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full" if args.full else "standard"
    if not args.dry_run:
        require_cuda("bench_kernels")
    env = environment()
    print(", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    print("  ".join(COLUMNS), flush=True)
    data, rows = dry_run_data(mode) if args.dry_run else bench(mode, args.budget_s)
    payload = {"env": env, "mode": mode, **data}
    stem = "bench_kernels-dryrun" if args.dry_run else "bench_kernels"
    title = "Quantized matmul vs fp16 cuBLAS, torch tinygemm (bf16) and gemlite; GPU time by CUDA-graph replay"
    paths = write_results(args.out, stem, payload, COLUMNS, rows, title)
    print("\n" + console_table(COLUMNS, rows))
    print("wrote " + ", ".join(map(str, paths)))
    bad = [r for r in data["results"] if r.get("ok") is False]
    if bad:
        print(f"{len(bad)} shapes exceed 1e-2 relative error against fp16 F.linear", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
