"""`quant_matmul`: validation, routing by M to a kernel family, config choice, the custom op, and
the lean eager path `QuantLinear` uses.

    y[..., N] = x[..., K] @ W^T + bias,   W[n, k] = (code(k, n) - zero[g, n]) * scale[g, n]

Routes (M = prod(x.shape[:-1])), see `tuning.py`:

* M <= 4 and bits in {2, 4, 8}: `gemv` (no tl.dot, split-K finished in the same launch);
* M <= 64: `gemm` split-K (`tl.dot`, one launch);
* larger M: the tiled `gemm`, or from LLMQUANT_PREFILL_M (default 128) on, `dequant` + cuBLAS.

With autotuning (default on a GPU) the first call for a key times every candidate that fits the
device (the dequant route competes with the GEMM for M > 64, so the crossover is measured per GPU)
and stores the winner per GPU model and Triton version. Under TRITON_INTERPRET=1 one fixed config
per route is used. `quant_matmul` is also the custom op `llmquant::quant_matmul`, used only while
torch.compile traces (it is what lets dynamo trace the Triton launch with fullgraph=True); eager
calls launch directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton

from . import gemm, gemv, prefill, tiles, tuning
from .layout import check_bits, effective_group_size, num_groups, packed_rows, values_per_word
from .tuning import GEMV_BITS, GEMV_MAX_M, SMALL_M, KernelConfig

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Triton decides at @triton.jit time (module import) whether kernels are interpreted; read the
# variable once, at the same time, which also keeps os.environ out of torch.compile's trace.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_LAUNCH = {"gemv": gemv.launch, "gemm": gemm.launch, "dequant": prefill.launch}


def interpret_config(m: int, bits: int) -> KernelConfig:
    """The fixed config per route under the interpreter: tiles big enough to keep the program count
    (and so the CPU time) low, split_k = 2 so the split-K finish is exercised by the CPU tests."""
    if m <= GEMV_MAX_M and bits in GEMV_BITS:
        return KernelConfig(triton.next_power_of_2(m), 64, 64, 2, 4, 1, "gemv")
    if m <= SMALL_M:
        return KernelConfig(max(16, triton.next_power_of_2(m)), 64, 64, 2, 4, 1)
    if m >= tuning.prefill_threshold():
        return KernelConfig(1, 64, 64, 1, 4, 1, "dequant")
    return KernelConfig(32, 64, 64, 1, 4, 1)


def _launch(x2d, qweight, scales, qzeros, bias, bits, group, out, cfg: KernelConfig) -> torch.Tensor:
    """Run cfg's route: out [M, N] = x2d [M, K] @ W^T + bias (all contiguous, group effective)."""
    return _LAUNCH[cfg.route](x2d, qweight, scales, qzeros, bias, bits, group, out, cfg)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def pick_config(x2d, qweight, scales, qzeros, bias, bits, group, out) -> KernelConfig:
    """The launch config for these inputs: fixed (interpreter), default, or tuned and cached."""
    m, k = x2d.shape
    n = qweight.shape[1]
    if _INTERPRET:
        return interpret_config(m, bits)
    name, sms, max_smem = tuning.device_info(_device_index(x2d.device))
    candidates = tuning.candidate_configs(
        m, n, k, sms, bits, group, max_smem, x2d.element_size(), tuning.prefill_threshold()
    )
    if os.environ.get("LLMQUANT_AUTOTUNE", "1") == "0" or torch.cuda.is_current_stream_capturing():
        return candidates[0]  # tuning syncs, which a CUDA-graph capture forbids
    key = f"m{tuning.m_bucket(m)}|n{n}|k{k}|b{bits}|g{group}|z{int(qzeros is not None)}|{str(x2d.dtype)[6:]}"

    def bench(cfg: KernelConfig) -> float:
        run = lambda: _launch(x2d, qweight, scales, qzeros, bias, bits, group, out, cfg)  # noqa: E731
        return triton.testing.do_bench(run, warmup=5, rep=20)

    path = tuning.cache_file(name, os.environ.get("LLMQUANT_TRITON_CACHE"))
    return tuning.tune(key, candidates, bench, path)


def _check_weights(k, qweight, scales, qzeros, bias, bits, group_size, device) -> None:
    """Raise ValueError naming the offending weight tensor; shapes, dtypes, devices (no host sync)."""
    check_bits(bits)
    effective_group_size(group_size, k)  # ValueError unless a positive int or -1
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(
            f"qweight must be a 2-D int32 tensor [ceil(K/{values_per_word(bits)}), N], got "
            f"{getattr(qweight, 'dtype', type(qweight))} of shape {tuple(getattr(qweight, 'shape', ()))}"
        )
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
    named = {"qweight": qweight, "scales": scales, "qzeros": qzeros, "bias": bias}
    for name, t in named.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"x is on {device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be a float16/bfloat16/float32 tensor [..., K], got {getattr(x, 'dtype', type(x))}")


def _check(x, qweight, scales, qzeros, bias, bits, group_size) -> None:
    """Raise ValueError naming the offending tensor; shapes and dtypes only (no host sync)."""
    _check_x(x)
    _check_weights(x.shape[-1], qweight, scales, qzeros, bias, bits, group_size, x.device)


def _trivial(x2d, n, bias, out) -> torch.Tensor | None:
    """The result when there is nothing to launch (M, N or K is 0), else None."""
    m, k = x2d.shape
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    return None


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
    x2d, qweight, scales = x2d.contiguous(), qweight.contiguous(), scales.contiguous()
    qzeros = qzeros.contiguous() if qzeros is not None else None
    bias = bias.contiguous() if bias is not None else None
    out = tiles.empty((m, n), x2d.dtype, x2d.device)
    done = _trivial(x2d, n, bias, out)
    if done is not None:
        return done
    cfg = config or pick_config(x2d, qweight, scales, qzeros, bias, bits, group, out)
    if cfg.route == "gemv" and (m > cfg.block_m or bits not in GEMV_BITS):
        raise ValueError(f"the gemv route needs M <= block_m={cfg.block_m} and bits in {GEMV_BITS}")
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
    qweight: [ceil(K / (32 // bits)), N] int32, the layout of `layout.py`
    scales: [ceil(K / G), N] float (any of the three float dtypes; cast in the kernel)
    qzeros: [ceil(K / G), N] uint8, or None for symmetric (zero = 2^(bits-1))
    bias: [N] float or None;  bits: 2, 3, 4 or 8;  group_size: G, or -1 for one group per row
    returns: [..., N] in x.dtype, accumulated in fp32.
    Raises ValueError naming the bad tensor before any launch. Routed by M (module docstring).
    """
    _check(x, qweight, scales, qzeros, bias, bits, group_size)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        y = _quant_matmul_op(x2d, qweight, scales, qzeros, bias, bits, group_size)
    else:
        y = _quant_matmul_2d(x2d, qweight, scales, qzeros, bias, bits, group_size)
    return y.reshape(*lead, qweight.shape[1])


# --------------------------------------------------------------------------------------- eager path


@dataclass
class Prepared:
    """One module's weights, validated once, and its launch configs per (M key, dtype).

    `key` identifies the tensors (storage pointers and device): a module moved or reloaded into
    new tensors gets a fresh Prepared. Holds no reference to the tensors themselves."""

    key: tuple
    bits: int
    group: int
    k: int
    n: int
    configs: dict = field(default_factory=dict)


def weights_key(qweight, scales, qzeros, bias) -> tuple:
    return (
        qweight.device,
        qweight.data_ptr(),
        scales.data_ptr(),
        0 if qzeros is None else qzeros.data_ptr(),
        0 if bias is None else bias.data_ptr(),
    )


def prepare(qweight, scales, qzeros, bias, bits: int, group_size: int, in_features: int) -> Prepared:
    """Validate a module's packed weights once (ValueError naming the tensor) for the eager path."""
    _check_weights(in_features, qweight, scales, qzeros, bias, bits, group_size, qweight.device)
    for name, t in {"qweight": qweight, "scales": scales, "qzeros": qzeros, "bias": bias}.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the Triton kernels")
    return Prepared(
        weights_key(qweight, scales, qzeros, bias),
        bits,
        effective_group_size(group_size, in_features),
        in_features,
        qweight.shape[1],
    )


def forward_prepared(x, prep: Prepared, qweight, scales, qzeros, bias) -> torch.Tensor:
    """Eager y = x @ W^T + bias for weights checked by `prepare`: per call only x is checked, the
    config comes from prep.configs after the first call of an (M key, dtype), and one route runs
    (decode: one launch)."""
    if x.dtype not in _FLOAT_DTYPES or x.shape[-1] != prep.k or x.device != qweight.device:
        _check(x, qweight, scales, qzeros, bias, prep.bits, prep.group)  # names most problems
        raise ValueError(f"x has K={x.shape[-1]} inputs but the layer has in_features={prep.k}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, prep.k)
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    m = x2d.shape[0]
    out = tiles.empty((m, prep.n), x.dtype, x.device)
    if m == 0 or prep.n == 0 or prep.k == 0:
        return _trivial(x2d, prep.n, bias, out).reshape(*lead, prep.n)
    ckey = (m if m <= GEMV_MAX_M else tuning.m_bucket(m), x.dtype)
    cfg = prep.configs.get(ckey)
    if cfg is None:
        cfg = pick_config(x2d, qweight, scales, qzeros, bias, prep.bits, prep.group, out)
        if _INTERPRET or not torch.cuda.is_current_stream_capturing():
            prep.configs[ckey] = cfg  # an untuned default picked during capture is not kept
    _launch(x2d, qweight, scales, qzeros, bias, prep.bits, prep.group, out, cfg)
    return out.reshape(*lead, prep.n)
