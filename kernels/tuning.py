"""Launch configurations: candidate lists per kernel family, a shared-memory fit filter, the tuner
and its per-GPU JSON cache.

A `KernelConfig` names a route (kernel family) and its tile sizes:

* ``gemv``    (M <= GEMV_MAX_M): `gemv.py`, no `tl.dot`; `block_m` = next_pow2(M);
* ``gemm``    (small M with split_k > 1, or the tiled GEMM with split_k = 1): `gemm.py`;
* ``dequant`` (large M): `prefill.py`, dequantize into a scratch buffer, then cuBLAS.

Tuned choices are stored as JSON in ``<cache>/<gpu name>-triton<version>.json`` (cache folder:
LLMQUANT_TRITON_CACHE, default ``~/.cache/llmquant/triton``): a config tuned with one Triton
version is never reused with another. Writes go to a per-process temporary file renamed over the
target (atomic), after merging what other processes wrote meanwhile.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from .layout import values_per_word

GEMV_MAX_M = 4  # M <= this: the GEMV family (one token per row, no tl.dot padding to 16 rows)
SMALL_M = 64  # GEMV_MAX_M < M <= this: the split-K tl.dot family (decode batches, short chunks)
# Widths `gemv` takes: codes that fill a word exactly (V = 16, 8, 4); 3-bit words take `gemm`.
GEMV_BITS = (2, 4, 8)
# M >= this takes the dequantize + cuBLAS route when the shape is untuned: the fused GEMM falls
# well behind fp16 cuBLAS at large M (docs/KERNELS.md, "Routing"), while a dequantize pass costs
# about one read of the packed weight plus one fp16 write (~the time of fp16 cuBLAS at M = 1), so
# it pays once cuBLAS' own time is a few times that, around M = 128. Per-device override: LLMQUANT_PREFILL_M; with
# autotuning on, the route itself is one of the timed candidates, so the crossover is measured.
DEFAULT_PREFILL_M = 128
ROUTES = ("gemv", "gemm", "dequant")


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one route. For ``gemm``, split_k > 1 selects the split-K kernel."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    route: str = "gemm"


def m_bucket(m: int) -> int:
    """Configs are tuned per power-of-two bucket of M (capped at 4096)."""
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def prefill_threshold() -> int:
    """Smallest M routed to dequantize + cuBLAS when untuned (LLMQUANT_PREFILL_M overrides)."""
    value = os.environ.get("LLMQUANT_PREFILL_M")
    return int(value) if value and value.isdigit() else DEFAULT_PREFILL_M


# ------------------------------------------------------------------------------------ shared memory


def _words_rows(block_k: int, bits: int) -> int:
    """Rows of packed words one BLOCK_K step loads: BLOCK_K / V, or BLOCK_K for 3 bits (V = 10)."""
    per_word = values_per_word(bits)
    return block_k // per_word if per_word & (per_word - 1) == 0 else block_k


def smem_bytes(cfg: KernelConfig, bits: int, elt: int = 2) -> int:
    """Conservative estimate of the shared memory a config needs (elt: activation bytes).

    tl.dot routes (``gemm``): Triton keeps num_stages buffers of every pipelined global load (x
    tile [BM, BK] and packed words; the H100 failure of 233,472 bytes was 3 x (8 KB + 64 KB) plus
    12 KB, for BM 64, BN 256, BK 64 at 3 bits), and stages the dequantized [BK, BN] operand once;
    the epilogue may reuse the buffers for a layout change of the fp32 accumulator. ``gemv`` and
    ``dequant`` use shared memory only for cross-warp reductions and layout changes.
    """
    words = _words_rows(cfg.block_k, bits) * cfg.block_n * 4
    if cfg.route == "gemm":
        per_stage = cfg.block_m * cfg.block_k * elt + words + cfg.block_n * (4 + 1)
        staged = max(cfg.num_stages, 1) * per_stage + cfg.block_k * cfg.block_n * elt
        return max(staged, cfg.block_m * cfg.block_n * 4)
    return cfg.block_m * cfg.block_n * 4 * cfg.num_warps + words


def fit(configs: list[KernelConfig], bits: int, max_smem: int | None, elt: int = 2) -> list[KernelConfig]:
    """The configs whose shared-memory estimate fits max_smem (None: no limit known); never empty:
    when none fits, the one with the smallest estimate stays (the tuner skips it if it fails)."""
    if max_smem is None:
        return configs
    kept = [c for c in configs if smem_bytes(c, bits, elt) <= max_smem]
    return kept or [min(configs, key=lambda c: smem_bytes(c, bits, elt))]


# ------------------------------------------------------------------------------------ candidates


def _default_split(tiles: int, k: int, block_k: int, sms: int, cap: int = 32) -> int:
    """Enough (N tile, K slice) programs for ~4 per SM, each slice owning >= 2 BLOCK_K steps."""
    split = 1
    while split < cap and tiles * split < 4 * sms and triton.cdiv(k, split * 2) >= 2 * block_k:
        split *= 2
    return split


def _gemv_candidates(m: int, n: int, k: int, group: int, sms: int) -> list[KernelConfig]:
    bm = triton.next_power_of_2(max(m, 1))
    # A BLOCK_K inside one group lets the kernel apply scale and zero once per step and column.
    bks = [bk for bk in (32, 64, 128, 256) if group % bk == 0 or group >= k] or [64]
    out = []
    for bn, warps in ((64, 2), (128, 4), (256, 4), (256, 8), (512, 8)):
        for bk in bks[-2:]:
            for split in (1, 2, 4, 8, 16, 32, 64):
                if split == 1 or triton.cdiv(k, split) >= bk:
                    out.append(KernelConfig(bm, bn, bk, split, warps, 2, "gemv"))
    bk = bks[-1] if bks[-1] <= 128 else 128
    default = KernelConfig(bm, 128, bk, _default_split(triton.cdiv(n, 128), k, bk, sms), 4, 2, "gemv")
    return [default, *(c for c in out if c != default)]


def _splitk_candidates(m: int, n: int, k: int, sms: int) -> list[KernelConfig]:
    bm = max(16, triton.next_power_of_2(m))
    out = []
    for bn, bk, warps in ((64, 128, 4), (128, 128, 4), (64, 256, 4), (128, 64, 4), (256, 64, 8)):
        for split in (1, 2, 4, 8, 16, 32):
            if split == 1 or triton.cdiv(k, split) >= bk:
                out.append(KernelConfig(bm, bn, bk, split, warps, 3))
    default = KernelConfig(bm, 64, 128, _default_split(triton.cdiv(n, 64), k, 64, sms, cap=16), 4, 3)
    return [default, *(c for c in out if c != default)]


def _gemm_candidates(m: int) -> list[KernelConfig]:
    block_ms = [bm for bm in (32, 64, 128) if bm <= max(32, m_bucket(m))]
    shapes = ((64, 64, 4, 4), (128, 64, 4, 4), (128, 32, 4, 4), (256, 64, 8, 3), (128, 128, 8, 3))
    out = [KernelConfig(bm, bn, bk, 1, w, s) for bm in block_ms for bn, bk, w, s in shapes]
    default = KernelConfig(block_ms[-1], 128, 64, 1, 4 if block_ms[-1] < 128 else 8, 3)
    return [default, *(c for c in out if c != default)]


DEQUANT = KernelConfig(1, 128, 128, 1, 4, 1, "dequant")  # dequantize-kernel tile; block_m unused


@functools.cache
def candidate_configs(
    m: int,
    n: int,
    k: int,
    sms: int = 132,
    bits: int = 4,
    group: int = 128,
    max_smem: int | None = None,
    elt: int = 2,
    prefill_m: int = DEFAULT_PREFILL_M,
) -> tuple[KernelConfig, ...]:
    """Candidates for M (sms: the GPU's SM count; max_smem: its per-block shared-memory limit in
    bytes, None if unknown; elt: activation bytes; prefill_m: the untuned dequant-route crossover);
    the first is the untuned default."""
    if m <= GEMV_MAX_M and bits in GEMV_BITS:
        out = _gemv_candidates(m, n, k, group, sms)
    elif m <= SMALL_M:
        out = _splitk_candidates(m, n, k, sms)
    else:
        out = _gemm_candidates(m) + [DEQUANT]
        if m >= prefill_m:
            out = [DEQUANT] + out[:-1]
    return tuple(fit(out, bits, max_smem, elt))


# ------------------------------------------------------------------------------------ device + cache


@functools.cache
def device_info(index: int) -> tuple[str, int, int | None]:
    """(file-safe GPU name, SM count, max shared memory per block in bytes) of CUDA device `index`."""
    props = torch.cuda.get_device_properties(index)
    try:
        max_smem = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    except Exception:  # older/other drivers: fall back to torch's figure when it has one
        max_smem = getattr(props, "shared_memory_per_block_optin", None)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", props.name), props.multi_processor_count, max_smem


def cache_file(gpu_name: str, root: str | None = None) -> Path:
    """JSON of tuned configs for one GPU model and the running Triton version."""
    folder = Path(root) if root else Path.home() / ".cache" / "llmquant" / "triton"
    version = re.sub(r"[^A-Za-z0-9_.-]+", "_", triton.__version__)
    return folder / f"{gpu_name}-triton{version}.json"


def _read(path: Path) -> dict[str, KernelConfig]:
    try:
        raw = json.loads(path.read_text())
        if raw.get("triton") != triton.__version__:
            return {}
        return {key: KernelConfig(**cfg) for key, cfg in raw.get("configs", {}).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


@functools.cache
def tuned(path: Path) -> dict[str, KernelConfig]:
    """Configs tuned earlier on this GPU model and Triton version (mutable, shared in the process)."""
    return _read(path)


def save(path: Path, table: dict[str, KernelConfig]) -> None:
    """Merge `table` into the file: entries another process wrote meanwhile are kept."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read(path), **table}
        payload = {"triton": triton.__version__, "configs": {key: asdict(c) for key, c in sorted(merged.items())}}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: no two writers share it
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs re-tuning in the next process


def tune(
    key: str,
    candidates: tuple[KernelConfig, ...],
    bench: Callable[[KernelConfig], float],
    path: Path,
) -> KernelConfig:
    """The tuned config for `key`: from the table, or by timing every candidate with `bench`
    (ms; a candidate that raises, e.g. out of resources, is skipped) and storing the fastest."""
    table = tuned(path)
    if key not in table:
        best, best_ms = candidates[0], float("inf")
        for cfg in candidates:
            try:
                ms = bench(cfg)
            except Exception:
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        table[key] = best
        save(path, table)
    return table[key]
