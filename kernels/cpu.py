"""The CPU path of QuantLinear: torch's weight-only int4 kernel for decode, dequantize + GEMM for prefill.

Decode (few rows) runs `torch._weight_int4pack_mm_for_cpu` ("tinygemm"), one op per call, on a
copy of the codes repacked once (at load, or on the first CPU forward) into the kernel's layout:

- tinygemm computes W = (q - 8) * scale + zero with unsigned 4-bit q, one (scale, zero) pair per
  group of K. Our W = (q - z) * s maps to scale = s, zero = (8 - z) * s. 2- and 3-bit codes are
  4-bit codes that use fewer values (shifted to the middle of 0..15 so that the zero stays small).
- Our groups may end ragged (K = 576, group 128): tinygemm's group is the largest of 256..32 that
  divides both our group and K, with each (s, z) repeated over the groups it spans (exact).
- 8-bit codes q = 16 * hi + lo are two 4-bit matrices stacked along N: hi with scale 16 s and
  zero (136 - z) * s, lo with scale s and zero 0; the two halves of the [M, 2N] output are summed
  (in the same op that casts back to the activation dtype).
- The kernel is fast for bfloat16/float16 activations only (float32 ones take a much slower
  path, docs/KERNELS.md), so float32 inputs are rounded to bfloat16 for this one GEMM (and the
  output cast back): 3 ops per call. The rounding error (relative 2^-9 per activation) is well
  under the int4 quantization error, and comparable to the int8 one.

Threads: tinygemm splits its rows evenly over torch's intra-op threads, so when another process
keeps one of the cores busy, the thread sharing that core makes every call wait for it, while
MKL's float GEMV at one row is effectively single-threaded and is not slowed (measured with
bench_cpu beside a busy process: docs/KERNELS.md, "CPU path"). So decode calls use fewer threads
while the machine is oversubscribed (`decode_threads`): the number of runnable threads in
/proc/loadavg minus torch's own (they run or spin between the ops of a decode step) is the number
of cores busy elsewhere; sampled at most every 0.1 s, the median of the last 3 samples counts.

Prefill (many rows) is GEMM-bound: dequantize W in the activation dtype and call F.linear.

The repacked weight is a non-persistent buffer: counted by `model_size_bytes` (it is memory the
model holds) but not written by `state_dict`/`save_pretrained`, which keep the packed layout of
docs/FORMAT.md.
"""

from __future__ import annotations

import collections
import os
import time

import torch

from .layout import effective_group_size, implicit_zero, unpack_codes

# Rows (tokens) up to which the int4 kernel beat dequantize + GEMM on SmolLM2 shapes (docs/KERNELS.md,
# "CPU path"); 8 bits runs two int4 GEMMs, so it stops paying at fewer rows.
DECODE_MAX_ROWS_ENV = "LLMQUANT_CPU_DECODE_ROWS"
DECODE_MAX_ROWS = {2: 32, 3: 32, 4: 32, 8: 16}
TINYGEMM_GROUPS = (256, 128, 64, 32)
INNER_K_TILES = 2
DECODE_THREADS_ENV = "LLMQUANT_CPU_DECODE_THREADS"
LOAD_SAMPLE_SECONDS = 0.1
LOAD_SAMPLES = 3  # busy cores: the median of the last samples (one snapshot can be off by a process)


def decode_max_rows(bits: int) -> int:
    """Most rows sent to the int4 kernel; LLMQUANT_CPU_DECODE_ROWS overrides (0: always dequantize)."""
    override = os.environ.get(DECODE_MAX_ROWS_ENV)
    return int(override) if override else DECODE_MAX_ROWS[bits]


def runnable_threads() -> int | None:
    """Threads runnable on the machine right now (Linux: /proc/loadavg field 4), None if unknown."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].partition("/")[0])
    except (OSError, ValueError, IndexError):
        return None


class _Load:
    """What decode_threads last saw: when, which thread count it chose, cores busy elsewhere."""

    sampled_at = float("-inf")
    threads = 0
    busy: collections.deque = collections.deque(maxlen=LOAD_SAMPLES)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_threads(limit: int) -> int:
    """Intra-op threads for one decode GEMM: `limit` (torch's count), fewer while other processes
    keep cores busy (see the module docstring); LLMQUANT_CPU_DECODE_THREADS fixes it."""
    override = os.environ.get(DECODE_THREADS_ENV)
    if override:
        if not override.isdigit() or int(override) < 1:
            raise ValueError(f"{DECODE_THREADS_ENV} must be a thread count >= 1, got {override!r}")
        return min(int(override), limit)
    if limit == 1:
        return 1
    now = time.monotonic()
    if now - _Load.sampled_at >= LOAD_SAMPLE_SECONDS:
        runnable = runnable_threads()
        # torch's own `limit` threads run (or spin) between the decode calls: the other ops use them all
        _Load.busy.append(0 if runnable is None else max(0, runnable - limit))
        _Load.sampled_at = now
        busy = sorted(_Load.busy)[len(_Load.busy) // 2]
        _Load.threads = max(1, min(limit, _Load.cores - busy))
    return _Load.threads


def tinygemm_group(group_size: int, in_features: int, out_features: int, bits: int) -> int | None:
    """tinygemm's group for our layout, or None when the kernel cannot take it (N % 16, K % 32)."""
    rows = out_features * (2 if bits == 8 else 1)
    if rows % 16:
        return None
    group = effective_group_size(group_size, in_features)
    for candidate in TINYGEMM_GROUPS:
        if group % candidate == 0 and in_features % candidate == 0:
            return candidate
    return None


def repack_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Our packed layout -> (tinygemm weight [N', K/2] uint8, scales_and_zeros [K/g', N', 2] dtype, g').

    qweight [ceil(K/V), N] int32, scales [G, N], qzeros [G, N] uint8 or None (symmetric: zero
    2^(bits-1)). N' = N, or 2N for 8 bits (hi rows, then lo rows). None if the kernel cannot take it.
    """
    n = qweight.shape[1]
    tg = tinygemm_group(group_size, in_features, n, bits)
    if tg is None:
        return None
    group = effective_group_size(group_size, in_features)
    codes = unpack_codes(qweight, bits, in_features).to(torch.int32)  # [N, K]
    s = scales.to(torch.float32)  # [G, N]
    z = torch.full_like(s, float(implicit_zero(bits))) if qzeros is None else qzeros.to(torch.float32)
    if bits == 8:
        codes = torch.cat((codes >> 4, codes & 15), dim=0)  # [2N, K]
        scale = torch.cat((16 * s, s), dim=1)  # [G, 2N]
        zero = torch.cat(((136 - z) * s, torch.zeros_like(s)), dim=1)
    else:
        # Shift 2-/3-bit codes to the middle of 0..15 (q + o, z + o) so tinygemm's zero
        # (8 - z - o) * s stays small: it is rounded to bfloat16 and is shared by a whole group.
        offset = 8 - implicit_zero(bits)
        codes = codes + offset
        scale, zero = s, (8 - offset - z) * s
    repeat = group // tg
    # Our group g covers tinygemm groups g*repeat ..; the ragged last one covers fewer.
    tg_groups = in_features // tg
    index = torch.arange(tg_groups) // repeat
    scales_and_zeros = torch.stack((scale[index], zero[index]), dim=-1).to(dtype).contiguous()
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), INNER_K_TILES)
    return packed, scales_and_zeros, tg


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    tg_group: int,
    out_features: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [..., K] float -> [..., N] in x's dtype, through tinygemm in scales_and_zeros' dtype.

    packed [N', K/2] with N' = N or 2N (two stacked halves to sum, for 8-bit codes).
    """
    kernel_dtype = scales_and_zeros.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(kernel_dtype)
    limit = torch.get_num_threads()
    threads = decode_threads(limit)
    if threads == limit:
        y = torch._weight_int4pack_mm_for_cpu(x2, packed, tg_group, scales_and_zeros)
    else:
        torch.set_num_threads(threads)
        try:
            y = torch._weight_int4pack_mm_for_cpu(x2, packed, tg_group, scales_and_zeros)
        finally:
            torch.set_num_threads(limit)
    if packed.shape[0] != out_features:  # 8 bits: hi and lo halves
        y = y.view(-1, 2, out_features).sum(dim=1, dtype=x.dtype)
    else:
        y = y.to(x.dtype)
    if bias is not None:
        y = y.add_(bias.to(x.dtype))
    return y.view(*lead, out_features)
