"""Microbenchmark of the quantized matmul against fp16 cuBLAS, torch tinygemm and gemlite in the
same run (a benchmark, not a test).

    python -m llmquant.evals.bench_kernels [--quick | --full] [--budget-s S] [--out DIR] [--dry-run]

For Llama-2-7B and Llama-3-70B linear shapes (N x K) and M tokens it reports, per row:

* GPU time by CUDA-graph replay (`triton.testing.do_bench_cudagraph`, median) of fp16 `F.linear`,
  bf16 `F.linear`, llmquant `quant_matmul`, torch tinygemm (`aten._weight_int4pack_mm`, bf16,
  int4 rows only; compared with bf16 cuBLAS) and gemlite (int4 rows, when importable; on a GPU
  without a shipped gemlite config table, e.g. the H200, its H100 table is loaded so that gemlite
  does not autotune inside the time budget);
* eager us per call (plain loop, synchronised once) of fp16 `F.linear` and of `QuantLinear.forward`:
  what an un-compiled `generate` pays per layer, CPU launch cost included;
* llmquant's speedup over fp16, its GB/s over the bytes it must move and that as a fraction of a
  device-to-device copy measured in the same run, the route taken and the max error against fp16
  `F.linear` on the dequantized weight.

Rows run in order of priority (int4 M = 1 on every shape first, then M = 16, int8 M = 1, ...), so
a run stopped by `--budget-s` (no new row starts after it) or killed by a time limit has measured
the rows that matter most. `bench_kernels-<gpu>.json` and `.md` under `evals/results/` (or --out)
are rewritten (atomically) after every row: a run cut short leaves every row measured until then.

`--dry-run` needs no GPU: tiny shapes on CPU through the Triton interpreter (TRITON_INTERPRET=1),
every step of a real run (packing, anchors, QuantLinear, timing, ratios, incremental files)
executed; its files are named `bench_kernels-dryrun-<cpu>` and every row says `"dry_run": true`
(times are CPU wall time of the interpreter, not GPU figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .meta import RESULTS, console_table, environment, markdown_table, require_cuda

SHAPES = {  # name: [(N, K), ...] as nn.Linear(out_features=N, in_features=K)
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama3-70b": [(8192, 8192), (28672, 8192), (8192, 28672)],
    "dry-run": [(64, 256)],  # CPU interpreter only
}
QUANTS = {"int4-g128-asym": (4, 128, False), "int8-g128-sym": (8, 128, True)}
# Rows in order of priority: (quant, M) passes, each over every shape of the mode. The standard mode
# covers the targets of issues 8 and 21: int4 M = 1/4/16/64/256/2048 and int8 M = 1/16.
STANDARD_PASSES = [
    ("int4-g128-asym", 1), ("int4-g128-asym", 16), ("int8-g128-sym", 1), ("int4-g128-asym", 4),
    ("int4-g128-asym", 64), ("int4-g128-asym", 2048), ("int4-g128-asym", 256), ("int8-g128-sym", 16),
]  # fmt: skip
MODES = {
    "quick": (["llama2-7b"], [("int4-g128-asym", m) for m in (1, 16, 256, 2048)]),
    "standard": (["llama2-7b", "llama3-70b"], STANDARD_PASSES),
    "full": (
        ["llama2-7b", "llama3-70b"],
        [(q, m) for m in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048) for q in QUANTS],
    ),
    # gemv (int4 and int8), split-K gemm and dequant + matmul: every route of the standard mode once
    "dry-run": (
        ["dry-run"],
        [(q, m) for q, m in STANDARD_PASSES if m in (1, 16, 2048) and (q, m) != ("int8-g128-sym", 16)],
    ),
}

COLUMNS = [
    "N x K", "quant", "M", "route", "fp16 us", "llmquant us", "llmquant x fp16", "of copy", "tinygemm us",
    "tinygemm x bf16", "gemlite us", "gemlite x fp16", "F.linear eager us", "QuantLinear eager us", "max rel err",
]  # fmt: skip

# "cuda" for a measurement; "cpu" in a dry run (Triton interpreter, few repetitions).
DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def random_quantized(n: int, k: int, bits: int, group: int, sym: bool, device: str | None = None):
    """Random packed weight N x K: (codes [N, K] uint8, qweight, scales fp16, qzeros | None, W fp16 [N, K])."""
    from llmquant.kernels import dequantize, pack_codes

    device = device or DEVICE
    codes = torch.randint(0, 1 << bits, (n, k), device=device, dtype=torch.uint8)
    qweight = pack_codes(codes, bits)
    n_groups = -(-k // group)
    scales = ((torch.rand(n_groups, n, device=device) + 0.5) / ((1 << bits) * k**0.5)).half()
    qzeros = None if sym else torch.randint(0, 1 << bits, (n_groups, n), device=device, dtype=torch.uint8)
    weight = dequantize(qweight, scales, qzeros, bits, group, k, dtype=torch.float16)
    return codes, qweight, scales, qzeros, weight


def _cpu_us(fn) -> float:
    """Dry run: wall time of one call of fn on CPU, in us (the interpreter is slow: one call is enough
    to exercise the path, and no figure of a dry run is a measurement to keep)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def graph_us(fn) -> float:
    """Median GPU time of fn by CUDA-graph replay, in us (NaN if the capture fails)."""
    if DEVICE != "cuda":
        return _cpu_us(fn)
    import triton

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3
    except Exception as e:  # noqa: BLE001 - an anchor that cannot be captured is reported as n/a
        print(f"  cudagraph failed: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
        return math.nan


def eager_us(fn, calls: int = 200) -> float:
    """us per call of fn from a plain Python loop (CPU launch cost included), synchronised once."""
    if DEVICE != "cuda":
        return _cpu_us(fn)
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (read + write counted) of a `nbytes` buffer (dry run: 8 MiB on CPU)."""
    if DEVICE != "cuda":
        nbytes = 1 << 23
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=DEVICE)
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


def gemlite_config() -> str | None:
    """Make sure gemlite has a config table for this GPU: gemlite loads the shipped table whose tag
    is in the device name; for a GPU with none (e.g. 'NVIDIA H200', the H100's chip with more memory)
    load the H100 table rather than let gemlite autotune every shape inside the time budget.
    Returns the table used (file name), None when gemlite is not importable."""
    try:
        import gemlite
        from gemlite import core
    except Exception as e:  # noqa: BLE001 - optional anchor
        print(f"  gemlite unavailable: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
        return None
    shipped = core.get_default_cache_config() if DEVICE == "cuda" else None
    if shipped:
        return Path(shipped).name
    fallback = Path(gemlite.__file__).parent / "configs" / "h100.json"
    if fallback.is_file() and core.GemLiteLinear.load_config(str(fallback)):
        print(f"  gemlite: no shipped table for this GPU, loaded {fallback.name}", flush=True)
        return fallback.name
    return "autotune"


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

    module = QuantLinear(k, n, bits, group, sym, bias=False, dtype=torch.float16, device=DEVICE)
    module.load_packed({"qweight": qweight, "scales": scales, **({} if sym else {"qzeros": qzeros})})
    return module


def measure(packed, bits: int, group: int, sym: bool, m: int, anchors: dict) -> dict:
    """Time one (weight, M) pair against the anchors; all times in us."""
    from llmquant.kernels import dispatch

    codes, qweight, scales, qzeros, weight = packed
    n, k = weight.shape
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    xb, wb = x.bfloat16(), anchors["wb"]
    module = quant_linear(qweight, scales, qzeros, bits, group, sym, n, k)
    y = module(x)  # tunes this shape once (then cached per GPU and Triton version)
    ref = F.linear(x.float(), weight.float()) if DEVICE != "cuda" else F.linear(x, weight).float()
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
        try:
            yt = torch.ops.aten._weight_int4pack_mm(xb, wpk, group, sz).float()
            rec["tinygemm_err"] = ((yt - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
            rec["tinygemm_us"] = graph_us(lambda: torch.ops.aten._weight_int4pack_mm(xb, wpk, group, sz))
        except Exception as e:  # noqa: BLE001 - optional anchor
            print(f"  tinygemm failed: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
    if anchors.get("gemlite") is not None:
        rec["gemlite_us"] = graph_us(lambda: anchors["gemlite"](x))
    moved = qweight.nbytes + scales.nbytes + (qzeros.nbytes if qzeros is not None else 0) + x.nbytes + y.nbytes
    rec["bytes"] = moved
    return rec


def derive(rec: dict, copy_gbps: float | None) -> dict:
    """Ratios: speedups over fp16 (tinygemm over bf16), GB/s and the fraction of copy bandwidth."""
    q = rec.get("quant_us")
    rec["speedup"] = rec["fp16_us"] / q if q and rec.get("fp16_us") else None
    rec["gbps"] = rec["bytes"] / (q * 1e-6) / 1e9 if q and rec.get("bytes") else None
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


def result_paths(out_dir: Path, stem: str, device: str) -> tuple[Path, Path]:
    import re

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", device)
    return out_dir / f"{stem}-{name}.json", out_dir / f"{stem}-{name}.md"


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and os.replace: a reader (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_files(out_dir: Path, stem: str, payload: dict, columns, rows, title: str) -> tuple[Path, Path]:
    """<stem>-<device>.json (the payload) and .md (title, environment, table), each replaced atomically."""
    json_path, md_path = result_paths(out_dir, stem, payload["env"]["device"])
    write_atomic(json_path, json.dumps(payload, indent=1) + "\n")
    header = ", ".join(f"{k} {v}" for k, v in payload["env"].items())
    notes = "".join(f"\n{line}\n" for line in payload.get("notes", []))
    write_atomic(md_path, f"# {title}\n\n{header}\n{notes}\n{markdown_table(columns, rows)}\n")
    return json_path, md_path


def plan(mode: str) -> list[tuple[str, int, int, int]]:
    """The rows of a mode in order of priority: (quant, M, N, K)."""
    sets, passes = MODES[mode]
    return [(quant, m, n, k) for quant, m in passes for model in sets for n, k in SHAPES[model]]


def model_of(n: int, k: int) -> str:
    return next(name for name, shapes in SHAPES.items() if (n, k) in shapes)


def bench(mode: str, budget_s: float, save) -> dict:
    """Measure the rows of `mode` in order until `budget_s` has passed; `save(data)` after every row."""
    start = time.perf_counter()
    copy_gbps = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s", flush=True)
    data = {"copy_gbps": copy_gbps, "gemlite_config": gemlite_config(), "results": [], "rows_not_measured": []}
    weights: dict[tuple, tuple] = {}  # (quant, N, K) -> (packed, anchors), built once, reused by every M
    for quant, m, n, k in plan(mode):
        bits, group, sym = QUANTS[quant]
        rec = dict(model=model_of(n, k), n=n, k=k, quant=quant, bits=bits, group_size=group, sym=sym, m=m)
        if time.perf_counter() - start > budget_s:
            data["rows_not_measured"].append(rec)
            continue
        if (quant, n, k) not in weights:
            packed = random_quantized(n, k, bits, group, sym)
            anchors = {"wb": packed[4].bfloat16()}
            if bits == 4:
                try:
                    anchors["tinygemm"] = tinygemm_pack(packed[0], packed[2], packed[3], group)
                except Exception as e:  # noqa: BLE001 - optional anchor
                    print(f"  tinygemm unavailable: {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
                if data["gemlite_config"]:
                    anchors["gemlite"] = gemlite_layer(packed[0], packed[2], packed[3], group, n, k)
            weights[(quant, n, k)] = (packed, anchors)
        packed, anchors = weights[(quant, n, k)]
        t0 = time.perf_counter()
        try:
            rec.update(measure(packed, bits, group, sym, m, anchors))
        except Exception as e:  # noqa: BLE001 - one failing row must not cost the others
            print(f"  {n}x{k} {quant} M={m} failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
            rec.update(error=f"{type(e).__name__}: {str(e)[:300]}", ok=False, fp16_us=None, quant_us=None, bytes=0)
        rec["seconds"] = time.perf_counter() - t0
        if DEVICE != "cuda":
            rec["dry_run"] = True
        data["results"].append(derive(rec, copy_gbps))
        print("  ".join(table_row(rec)) + f"  ({rec['seconds']:.1f} s)", flush=True)
        save(data)
    if data["rows_not_measured"]:
        missing = len(data["rows_not_measured"])
        print(f"time budget of {budget_s:.0f} s reached: {missing} rows not measured", flush=True)
    data["rows_skipped_for_time"] = len(data["rows_not_measured"])
    save(data)
    return data


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="Llama-2-7B shapes, int4 only, M in 1/16/256/2048")
    group.add_argument("--full", action="store_true", help="every M from 1 to 2048, int4 and int8")
    parser.add_argument("--budget-s", type=float, default=300.0, help="start no new row after this many seconds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown (%(default)s)")
    parser.add_argument(
        "--dry-run", action="store_true", help="no GPU: tiny shapes on CPU through the Triton interpreter"
    )
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full" if args.full else "standard"
    if args.dry_run:
        mode, DEVICE = "dry-run", "cpu"
        dry_run_environment()
    else:
        require_cuda("bench_kernels")
    env = environment(DEVICE)
    print(", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    print("  ".join(COLUMNS), flush=True)
    stem = "bench_kernels-dryrun" if args.dry_run else "bench_kernels"
    title = "Quantized matmul vs fp16 cuBLAS, torch tinygemm (bf16) and gemlite; GPU time by CUDA-graph replay"
    notes = []
    if args.dry_run:
        title = "DRY RUN (CPU, Triton interpreter, tiny shapes; no GPU figure): " + title
        notes.append("Dry run: times are CPU wall time of the Triton interpreter, not GPU measurements.")
    paths = []

    def save(data: dict) -> None:
        payload = {"env": env, "mode": mode, "dry_run": args.dry_run, "budget_s": args.budget_s, **data}
        rows = [table_row(r) for r in data["results"]]
        missing = len(data["rows_not_measured"])
        extra = [f"Not measured (time budget): {missing} rows."] if missing else []
        paths[:] = write_files(args.out, stem, {**payload, "notes": notes + extra}, COLUMNS, rows, title)

    data = bench(mode, args.budget_s, save)
    print("\n" + console_table(COLUMNS, [table_row(r) for r in data["results"]]))
    print("wrote " + ", ".join(map(str, paths)))
    bad = [r for r in data["results"] if r.get("ok") is False]
    if bad:
        print(f"{len(bad)} rows failed or exceed 1e-2 relative error against fp16 F.linear", file=sys.stderr)
    return 1 if bad else 0


def dry_run_environment() -> None:
    """Dry run: the Triton kernels on CPU tensors through the interpreter, QuantLinear on its Triton
    path. TRITON_INTERPRET must be set before the kernel modules are imported (Triton reads it when a
    kernel is defined), so this refuses to continue if they were imported without it."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["LLMQUANT_KERNEL"] = "triton"
    from llmquant.kernels import gemm

    if type(gemm._gemm_kernel).__name__ != "InterpretedFunction":
        raise SystemExit("dry run: the Triton kernels were imported before TRITON_INTERPRET=1 was set")


if __name__ == "__main__":
    sys.exit(main())
