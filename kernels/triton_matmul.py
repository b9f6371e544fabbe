"""Fused dequant-matmul Triton kernels over the packed layout (see `pack.py`).

    y[..., N] = x[..., K] @ W^T + bias,   W[n, k] = (code(k, n) - zero[g, n]) * scale[g, n],  g = k // G

Two kernels share one dequantizing inner loop (`_dequant_dot`):

* `_gemm_kernel` (prefill, M > 16, and small M when no split pays off): one program per
  [BLOCK_M, BLOCK_N] output tile walks all of K, dequantizes a [BLOCK_K, BLOCK_N] weight tile
  per step in registers and feeds `tl.dot` with fp32 accumulation; bias and the cast to the
  activation dtype happen in the epilogue.
* `_splitk_kernel` + `_reduce_kernel` (decode, M <= 16): a single token has only N / BLOCK_N
  tiles, too few to fill the GPU, so K is also split over the grid. Each program writes an
  fp32 partial [M, BLOCK_N] into a workspace [SPLIT_K, M, N]; a second tiny pass sums the
  partials in a fixed order (deterministic, no atomics, no zero-fill), adds bias and casts.

Launch parameters come from a small per-regime config list, tuned once per
(regime, M bucket, N, K, bits, group, dtype) on the current GPU and stored as JSON under
`~/.cache/llmquant/triton/<gpu name>.json` (override the folder with LLMQUANT_TRITON_CACHE).
Under TRITON_INTERPRET=1 a single fixed config is used. No host sync happens in the forward
path once a shape is tuned; `quant_matmul` is registered as the torch custom op
`llmquant::quant_matmul` so torch.compile treats it as one opaque call.
"""

import functools
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from .pack import SUPPORTED_BITS, effective_group_size, num_groups, packed_rows

SMALL_M = 16  # M <= SMALL_M takes the decode (split-K) regime
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _load_codes(
    qw_ptr,
    k0,
    k_end,
    offs_k,
    offs_n,
    n_ok,
    stride_qw,
    BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Unsigned codes [BLOCK_K, BLOCK_N] int32 for k in offs_k = k0 + arange(BLOCK_K), n in offs_n.

    k0 is a multiple of BLOCK_K, hence of the codes per word V = 32 // BITS when V is a power of two.
    """
    if BITS != 3:
        # V = 16, 8, 4: load each packed word once ([BLOCK_K / V, BLOCK_N], coalesced along N) and
        # fan it out to its V rows in registers; row r * V + j of the tile is word r, shift j * BITS.
        rows = k0 // (32 // BITS) + tl.arange(0, BLOCK_K // (32 // BITS))
        row_ok = (rows * (32 // BITS) < k_end)[:, None] & n_ok[None, :]
        words = tl.load(qw_ptr + rows[:, None] * stride_qw + offs_n[None, :], mask=row_ok, other=0)
        shifts = tl.arange(0, 32 // BITS) * BITS
        # `>>` on int32 is arithmetic: the mask after the shift drops the sign-extended bits.
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
    else:
        # V = 10 is not a power of two, so no [BLOCK_K / V, V, BLOCK_N] tile: every row loads its
        # own word (repeats are L1 hits) and picks its code with a per-row shift.
        w_ok = (offs_k < k_end)[:, None] & n_ok[None, :]
        words = tl.load(qw_ptr + (offs_k // 10)[:, None] * stride_qw + offs_n[None, :], mask=w_ok, other=0)
        codes = (words >> ((offs_k % 10) * 3)[:, None]) & 7
    return codes


@triton.jit
def _dequant_dot(
    acc,
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    offs_m,
    offs_n,
    k_begin,
    k_end,
    M,
    N,
    stride_xm,
    stride_xk,
    stride_qw,
    stride_s,
    stride_z,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    ONE_GROUP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc[BM, BN] += x[offs_m, k_begin:k_end] @ W^T[k_begin:k_end, offs_n], dequantizing W on the fly.

    ONE_GROUP: every BLOCK_K step lies inside one quantization group (GROUP % BLOCK_K == 0,
    or a single group), so scales/zeros are one [BN] row per step instead of a [BK, BN] gather.
    """
    m_ok = offs_m < M
    n_ok = offs_n < N
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_ok = k_ok[:, None] & n_ok[None, :]
        codes = _load_codes(qw_ptr, k0, k_end, offs_k, offs_n, n_ok, stride_qw, BITS, BLOCK_K, BLOCK_N)
        if ONE_GROUP:
            g = k0 // GROUP
            scale = tl.load(s_ptr + g * stride_s + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_ZEROS:
                zero = tl.load(z_ptr + g * stride_z + offs_n, mask=n_ok, other=0).to(tl.int32)[None, :]
            else:
                zero = 1 << (BITS - 1)
        else:
            g = offs_k // GROUP
            scale = tl.load(s_ptr + g[:, None] * stride_s + offs_n[None, :], mask=w_ok, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = tl.load(z_ptr + g[:, None] * stride_z + offs_n[None, :], mask=w_ok, other=0).to(tl.int32)
            else:
                zero = 1 << (BITS - 1)
        w = ((codes - zero).to(tl.float32) * scale).to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _gemm_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_qw,
    stride_s,
    stride_z,
    stride_om,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ONE_GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[M, N] = x[M, K] @ W^T + bias. Grid: (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M))."""
    # N tiles vary fastest so the programs running together share one x row-block.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _dequant_dot(
        acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, offs_n, 0, K, M, N,
        stride_xm, stride_xk, stride_qw, stride_s, stride_z,
        BITS, GROUP, HAS_ZEROS, ONE_GROUP, BLOCK_K, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=out_ok)


@triton.jit
def _splitk_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    ws_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_qw,
    stride_s,
    stride_z,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    ONE_GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """ws[s, M, N] = partial product over K slice s. Grid: (cdiv(N, BLOCK_N), SPLIT_K); M <= BLOCK_M.

    k_per_split is a multiple of BLOCK_K, so a BLOCK_K step never straddles two slices; a slice
    past K (small K, many splits) runs no step and stores zeros, so the workspace is fully written.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _dequant_dot(
        acc, x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, offs_n, k_begin, k_end, M, N,
        stride_xm, stride_xk, stride_qw, stride_s, stride_z,
        BITS, GROUP, HAS_ZEROS, ONE_GROUP, BLOCK_K, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    out_ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(ws_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=out_ok)


@triton.jit
def _reduce_kernel(ws_ptr, b_ptr, out_ptr, M, N, SPLIT_K, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[M, N] = sum_s ws[s] + bias, summed in fixed order (deterministic). Grid: cdiv(M*N, BLOCK)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters. split_k > 1 selects the split-K kernel (only for M <= SMALL_M)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


# One fixed config under the interpreter: big enough tiles to keep the program count (and so the
# CPU time) low, split_k=2 so the split-K reduction is exercised by the CPU tests.
_INTERPRET_SMALL = KernelConfig(16, 64, 64, split_k=2, num_warps=4, num_stages=1)
_INTERPRET_LARGE = KernelConfig(32, 64, 64, split_k=1, num_warps=4, num_stages=1)


# Triton decides at @triton.jit time (module import) whether kernels are interpreted; read the
# variable once, at the same time, which also keeps os.environ out of torch.compile's trace.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 4096)


@functools.cache
def candidate_configs(m: int, n: int, k: int, sms: int = 132) -> tuple[KernelConfig, ...]:
    """The small config set for the regime of M (sms: the GPU's SM count); the first is the untuned default."""
    if m <= SMALL_M:
        out = []
        for block_n, block_k, warps in (
            (64, 128, 4),
            (128, 128, 4),
            (64, 256, 4),
            (128, 64, 4),
            (256, 64, 8),
        ):
            for split in (1, 2, 4, 8, 16):
                # Each split must own at least one full BLOCK_K step.
                if split == 1 or triton.cdiv(k, split) >= block_k:
                    out.append(KernelConfig(16, block_n, block_k, split, warps, 4))
        # Default: enough (N tile, K slice) programs for ~2 per SM, each slice >= one 128-wide step.
        tiles = triton.cdiv(n, 64)
        split = 1
        while split < 16 and tiles * split < 2 * sms and triton.cdiv(k, split * 2) >= 128:
            split *= 2
        default = KernelConfig(16, 64, 128, split, 4, 4)
        return (default, *(c for c in out if c != default))
    block_ms = [bm for bm in (32, 64, 128) if bm <= max(32, _m_bucket(m))]
    shapes = ((64, 64, 4, 4), (128, 64, 4, 4), (128, 32, 4, 4), (256, 64, 8, 3), (128, 128, 8, 3))
    out = [KernelConfig(bm, bn, bk, 1, w, s) for bm in block_ms for bn, bk, w, s in shapes]
    default = KernelConfig(block_ms[-1], 128, 64, 1, 4 if block_ms[-1] < 128 else 8, 3)
    return (default, *(c for c in out if c != default))


@functools.cache
def _device_info(index: int) -> tuple[str, int]:
    """(file-safe GPU name, SM count) of CUDA device `index`."""
    props = torch.cuda.get_device_properties(index)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", props.name), props.multi_processor_count


@functools.cache
def _cache_file(index: int, root: str | None) -> Path:
    """JSON of tuned configs for CUDA device `index`; root: LLMQUANT_TRITON_CACHE or None."""
    folder = Path(root) if root else Path.home() / ".cache" / "llmquant" / "triton"
    return folder / f"{_device_info(index)[0]}.json"


@functools.cache
def _tuned(path: Path) -> dict[str, KernelConfig]:
    """Configs tuned earlier on this GPU model (mutable dict, shared for the process)."""
    try:
        raw = json.loads(path.read_text())
        return {key: KernelConfig(**cfg) for key, cfg in raw.get("configs", {}).items()}
    except (OSError, ValueError, TypeError):
        return {}


def _save_tuned(path: Path, table: dict[str, KernelConfig]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "triton": triton.__version__,
            "configs": {key: asdict(c) for key, c in sorted(table.items())},
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs re-tuning in the next process


def _pick_config(x2d, qweight, scales, qzeros, bias, bits, group, out) -> KernelConfig:
    m, k = x2d.shape
    n = qweight.shape[1]
    if _INTERPRET:
        return _INTERPRET_SMALL if m <= SMALL_M else _INTERPRET_LARGE
    index = x2d.device.index if x2d.device.index is not None else torch.cuda.current_device()
    candidates = candidate_configs(m, n, k, _device_info(index)[1])
    if os.environ.get("LLMQUANT_AUTOTUNE", "1") == "0" or torch.cuda.is_current_stream_capturing():
        return candidates[0]  # tuning syncs, which a CUDA-graph capture forbids
    regime = "small" if m <= SMALL_M else "gemm"
    key = f"{regime}|m{_m_bucket(m)}|n{n}|k{k}|b{bits}|g{group}|{str(x2d.dtype).removeprefix('torch.')}"
    path = _cache_file(index, os.environ.get("LLMQUANT_TRITON_CACHE"))
    table = _tuned(path)
    if key not in table:
        best, best_ms = candidates[0], float("inf")
        for cfg in candidates:
            try:
                ms = triton.testing.do_bench(
                    lambda cfg=cfg: _launch(x2d, qweight, scales, qzeros, bias, bits, group, out, cfg),
                    warmup=5,
                    rep=20,
                )
            except Exception:  # e.g. out of shared memory for this tile on this GPU
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        table[key] = best
        _save_tuned(path, table)
    return table[key]


# --------------------------------------------------------------------------------------------- launch


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """All output/workspace allocation goes through here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(x2d, qweight, scales, qzeros, bias, bits, group, out, cfg: KernelConfig) -> torch.Tensor:
    m, k = x2d.shape
    n = qweight.shape[1]
    one_group = group % cfg.block_k == 0 or group >= k
    precision = "ieee" if x2d.dtype == torch.float32 else "tf32"
    zeros = qzeros if qzeros is not None else scales  # dummy pointer when HAS_ZEROS is False
    bias_arg = bias if bias is not None else scales
    common = dict(
        BITS=bits, GROUP=group, HAS_ZEROS=qzeros is not None, ONE_GROUP=one_group, DOT_PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if cfg.split_k == 1:
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))
        _gemm_kernel[grid](
            x2d, qweight, scales, zeros, bias_arg, out, m, n, k,
            x2d.stride(0), x2d.stride(1), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, **common,
        )  # fmt: skip
        return out
    # Slices are whole BLOCK_K steps so no step straddles two of them.
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    ws = _empty((cfg.split_k, m, n), torch.float32, x2d.device)
    _splitk_kernel[(triton.cdiv(n, cfg.block_n), cfg.split_k)](
        x2d, qweight, scales, zeros, ws, m, n, k, k_per_split,
        x2d.stride(0), x2d.stride(1), qweight.stride(0), scales.stride(0), zeros.stride(0), **common,
    )  # fmt: skip
    block = 1024
    _reduce_kernel[(triton.cdiv(m * n, block),)](
        ws, bias_arg, out, m, n, cfg.split_k, HAS_BIAS=bias is not None, BLOCK=block
    )
    return out


def _check(x, qweight, scales, qzeros, bias, bits, group_size) -> None:
    """Raise ValueError naming the offending tensor; shapes and dtypes only (no host sync)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"group_size must be -1 or a positive int, got {group_size!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be a float16/bfloat16/float32 tensor [..., K], got {getattr(x, 'dtype', type(x))}")
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(
            f"qweight must be a 2-D int32 tensor [ceil(K/{32 // bits}), N], got "
            f"{getattr(qweight, 'dtype', type(qweight))} of shape {tuple(getattr(qweight, 'shape', ()))}"
        )
    k = x.shape[-1]
    rows, n = qweight.shape
    if rows != packed_rows(k, bits):
        raise ValueError(
            f"qweight has {rows} packed rows but x has K={k} inputs, which at {bits} bits need {packed_rows(k, bits)}"
        )
    n_groups = num_groups(k, group_size)
    if not isinstance(scales, torch.Tensor) or scales.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"scales must be a float16/bfloat16/float32 tensor, got {getattr(scales, 'dtype', None)}")
    if tuple(scales.shape) != (n_groups, n):
        raise ValueError(f"scales must have shape {(n_groups, n)} (groups, N), got {tuple(scales.shape)}")
    if qzeros is not None:
        if not isinstance(qzeros, torch.Tensor) or qzeros.dtype != torch.uint8:
            raise ValueError(f"qzeros must be a uint8 tensor or None, got {getattr(qzeros, 'dtype', type(qzeros))}")
        if tuple(qzeros.shape) != (n_groups, n):
            raise ValueError(f"qzeros must have shape {(n_groups, n)} (groups, N), got {tuple(qzeros.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"bias must be a float tensor or None, got {getattr(bias, 'dtype', type(bias))}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    named = {"x": x, "qweight": qweight, "scales": scales, "qzeros": qzeros, "bias": bias}
    for name, t in named.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"x is on {x.device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


def _quant_matmul_2d(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """x2d [M, K] -> [M, N] in x2d.dtype; inputs already validated. `config` forces a launch config."""
    m, k = x2d.shape
    n = qweight.shape[1]
    group = effective_group_size(group_size, k)
    qweight, scales = qweight.contiguous(), scales.contiguous()
    qzeros = qzeros.contiguous() if qzeros is not None else None
    bias = bias.contiguous() if bias is not None else None
    out = _empty((m, n), x2d.dtype, x2d.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    cfg = config or _pick_config(x2d, qweight, scales, qzeros, bias, bits, group, out)
    if m > cfg.block_m and cfg.split_k > 1:
        raise ValueError(f"split_k={cfg.split_k} needs M <= block_m={cfg.block_m}, got M={m}")
    return _launch(x2d, qweight, scales, qzeros, bias, bits, group, out, cfg)


@torch.library.custom_op("llmquant::quant_matmul", mutates_args=())
def _quant_matmul_op(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    return _quant_matmul_2d(x2d, qweight, scales, qzeros, bias, bits, group_size)


@_quant_matmul_op.register_fake
def _(x2d, qweight, scales, qzeros, bias, bits, group_size):
    return x2d.new_empty((x2d.shape[0], qweight.shape[1]))


def quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """y = x @ dequantize(qweight, scales, qzeros)^T + bias with the fused Triton kernels.

    x: [..., K] float16/bfloat16/float32 (CUDA, or CPU under TRITON_INTERPRET=1)
    qweight: [ceil(K / (32 // bits)), N] int32, the layout of `pack.py`
    scales: [ceil(K / G), N] float (any of the three float dtypes; cast in the kernel)
    qzeros: [ceil(K / G), N] uint8, or None for symmetric (zero = 2^(bits-1))
    bias: [N] float or None;  bits: 2, 3, 4 or 8;  group_size: G, or -1 for one group per row
    returns: [..., N] in x.dtype, accumulated in fp32.
    Raises ValueError naming the bad tensor before any launch. M = prod(x.shape[:-1]) <= 16 uses
    the split-K decode kernel, larger M the tiled GEMM.
    """
    _check(x, qweight, scales, qzeros, bias, bits, group_size)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    y = _quant_matmul_op(x2d, qweight, scales, qzeros, bias, bits, group_size)
    return y.reshape(*lead, qweight.shape[1])
