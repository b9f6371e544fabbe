"""Building blocks shared by the Triton kernel families: unpacking codes from the packed words,
the one-launch split-K finish, and the allocator every family uses for outputs and workspaces."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """All output, workspace and scratch allocation goes through here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# One int32 arrival counter per output tile for the split-K finish; each kernel leaves the
# counters it used at zero, so one zeroed buffer per device serves every launch on that device.
# Launches on one stream run in order; concurrent split-K launches on two streams of the same
# device would share counters and must not be used.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
MAX_TILES = 1 << 16


def counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The zeroed arrival counters of `device` (fixed size, allocated on first use, before any
    CUDA-graph capture in practice: warm-up runs eagerly)."""
    if tiles > MAX_TILES:
        raise ValueError(f"{tiles} output tiles exceed the {MAX_TILES} split-K counters")
    buf = _COUNTERS.get(device)
    if buf is None:
        buf = _COUNTERS[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return buf


def split_slices(k: int, split_k: int, block_k: int) -> tuple[int, int]:
    """(K per slice, number of non-empty slices): slices are whole BLOCK_K steps, so no step
    straddles two of them, and trailing empty slices are dropped."""
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return k_per_split, triton.cdiv(k, k_per_split)


@triton.jit
def load_codes(
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
def splitk_finish(
    acc,
    ws_ptr,
    cnt_ptr,
    b_ptr,
    out_ptr,
    offs_m,
    offs_n,
    pid_n,
    pid_k,
    M,
    N,
    SPLIT_K,
    HAS_BIAS: tl.constexpr,
    IS_SPLIT: tl.constexpr,
):
    """Write the output tile from this program's fp32 partial acc [BM, BN] (out: [M, N] contiguous).

    Not IS_SPLIT (SPLIT_K == 1): add bias, cast, store. Otherwise every program stores its partial into the
    workspace ws [SPLIT_K, M, N] and counts its arrival on the tile's counter; the last of the
    SPLIT_K programs of a tile sums the partials in slice order (deterministic), adds bias,
    stores, and resets the counter. One launch, no zero-fill, no atomics on data. SPLIT_K is a
    run-time value so that split counts share one compiled kernel.
    """
    out_ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]
    if not IS_SPLIT:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        tl.store(ws_ptr + pid_k * M * N + tile, acc, mask=out_ok)
        # All threads' partial stores happen before the (single-thread) release below.
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for s in range(0, SPLIT_K):
                # .cg: read at L2, where the other programs' partials are, never a stale L1 line.
                total += tl.load(ws_ptr + s * M * N + tile, mask=out_ok, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + tile, total.to(out_ptr.dtype.element_ty), mask=out_ok)
            tl.store(cnt_ptr + pid_n, 0)
