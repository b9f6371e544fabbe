"""`QuantLinear`: an nn.Linear replacement holding packed codes, scales and zeros."""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import install_hint
from ..kernels import cpu
from ..kernels.layout import dequantize_kn, stored_tensors
from ..methods.codes import quantize_weight
from .linears import linear_features, linear_weight

KERNEL_ENV = "LLMQUANT_KERNEL"


def _use_triton(x: torch.Tensor) -> bool:
    """Triton for CUDA inputs; on CPU only when LLMQUANT_KERNEL=triton (tests, TRITON_INTERPRET=1)."""
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice == "torch":
        return False
    if choice == "triton":
        return True
    if x.is_cuda and not HAVE_TRITON:
        _warn_no_triton()
        return False
    return x.is_cuda


# CUDA torch on Linux brings triton; without it CUDA layers still run (dequantize + cuBLAS) after one
# warning: a model must not stop working for want of a faster kernel. find_spec does not import
# triton, and a module constant is something torch.compile traces through.
HAVE_TRITON = importlib.util.find_spec("triton") is not None


@functools.cache
def _warn_no_triton() -> None:
    warnings.warn(
        f"the fused CUDA kernels need triton, which is not installed: {install_hint('triton')}; "
        "quantized layers dequantize and call cuBLAS instead",
        stacklevel=4,
    )


class QuantLinear(nn.Module):
    """y = x @ dequantize(qweight, scales, qzeros)^T + bias, with the layout of docs/FORMAT.md.

    Buffers: qweight [ceil(K/V), N] int32, scales [G, N] float, qzeros [G, N] uint8 (asymmetric
    only); bias [N] as a parameter when present. Inputs x: [..., K] float32/float16/bfloat16.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        sym: bool,
        bias: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        for name, buffer_dtype, shape in stored_tensors(out_features, in_features, bits, group_size, sym, dtype):
            self.register_buffer(name, torch.zeros(shape, dtype=buffer_dtype, device=device))
        if sym:
            self.qzeros = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # CPU decode kernel's copy of the codes (kernels/cpu.py): memory the model holds, so a
        # buffer (counted by model_size_bytes), but not persistent (state_dict keeps FORMAT.md).
        self.register_buffer("cpu_packed", None, persistent=False)
        self.register_buffer("cpu_scales_zeros", None, persistent=False)
        self._cpu_group: int | None = None
        self._cpu_key: tuple | None = None  # which qweight/scales the copy was made from

    @classmethod
    def like(
        cls, linear: nn.Linear, bits: int, group_size: int, sym: bool, dtype: torch.dtype | None = None
    ) -> QuantLinear:
        """An empty QuantLinear with the shape, bias and device of `linear` (scales in `dtype`,
        default the weight's)."""
        in_features, out_features = linear_features(linear)
        return cls(
            in_features,
            out_features,
            bits,
            group_size,
            sym,
            bias=linear.bias is not None,
            dtype=dtype or linear.weight.dtype,
            device=linear.weight.device,
        )

    @classmethod
    def from_packed(
        cls, linear: nn.Linear, packed: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool
    ) -> QuantLinear:
        """`linear` replaced by its packed tensors (as returned by quantize_weight); bias copied."""
        module = cls.like(linear, bits, group_size, sym)
        module.load_packed(packed)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int, group_size: int, sym: bool, method: str = "rtn", name: str = "weight"
    ) -> QuantLinear:
        """Quantize an nn.Linear (weight [N, K]) by round to nearest; scales keep the weight's dtype."""
        weight = linear_weight(linear).detach()  # [N, K]; a Conv1D stores the transpose
        packed = quantize_weight(weight, bits, group_size, sym, method=method, name=name)
        return cls.from_packed(linear, packed, bits, group_size, sym)

    def load_packed(self, packed: dict[str, torch.Tensor]) -> None:
        """Copy packed tensors (as returned by quantize_weight) into the buffers."""
        for key, value in packed.items():
            getattr(self, key).copy_(value)
        self._cpu_key = None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as the kernels see it: W [N, K] in `dtype` (default: the scales' dtype)."""
        return self._dequantize_kn(dtype or self.scales.dtype).t()

    def _dequantize_kn(self, dtype: torch.dtype) -> torch.Tensor:
        """W^T [K, N] from the K-major packed words, without a transpose copy of the codes."""
        args = (self.qweight, self.scales, self.qzeros, self.bits, self.group_size, self.in_features)
        return dequantize_kn(*args, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_triton(x):
            return self._forward_triton(x)
        if x.device.type == "cpu":
            return self._forward_cpu(x)
        return self._forward_dequantize(x)

    def _forward_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize W in x's dtype, then one GEMM: any device, any shape."""
        weight = self._dequantize_kn(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight.t(), bias)

    def _forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        """The Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1): y [..., N] in x.dtype.

        Under torch.compile: the `llmquant::quant_matmul` custom op (traceable, fullgraph=True).
        Eager: a direct launch; the weights are validated once (again only if the buffers are
        replaced, e.g. by `.to()`), and the launch config is cached per (M bucket, dtype) on the module.
        """
        from ..kernels import dispatch

        qweight, scales, qzeros, bias = self.qweight, self.scales, self.qzeros, self.bias
        if torch.compiler.is_compiling():
            return dispatch.quant_matmul(x, qweight, scales, qzeros, bias, self.bits, self.group_size)
        prep = self.__dict__.get("_triton_prepared")
        if prep is None or prep.key != dispatch.weights_key(qweight, scales, qzeros, bias):
            prep = dispatch.prepare(qweight, scales, qzeros, bias, self.bits, self.group_size, self.in_features)
            self.__dict__["_triton_prepared"] = prep
        return dispatch.forward_prepared(x, prep, qweight, scales, qzeros, bias)

    def _forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """Few rows (decode): the int4 CPU kernel on the repacked codes; many rows: dequantize + GEMM."""
        rows = x.numel() // max(x.shape[-1], 1)
        if rows <= cpu.decode_max_rows(self.bits) and x.dtype != torch.float64 and self.prepare_cpu():
            return cpu.int4_linear(
                x, self.cpu_packed, self.cpu_scales_zeros, self._cpu_group, self.out_features, self.bias
            )
        return self._forward_dequantize(x)

    def prepare_cpu(self) -> bool:
        """Repack the codes for the CPU decode kernel (once; again if the buffers were replaced).

        Returns False when the kernel cannot take this layer's shape (then decode dequantizes).
        """
        q = self.qweight
        key = (q.data_ptr(), q._version, self.scales.data_ptr(), self.scales._version)
        if key == self._cpu_key:
            return self.cpu_packed is not None
        if q.device.type != "cpu" or q.is_meta:
            return False
        done = cpu.repack_int4(q, self.scales, self.qzeros, self.bits, self.group_size, self.in_features)
        self.cpu_packed, self.cpu_scales_zeros, self._cpu_group = done if done else (None, None, None)
        self._cpu_key = key
        return done is not None

    def extra_repr(self) -> str:
        group = "all" if self.group_size == -1 else self.group_size
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={group}, sym={self.sym}, bias={self.bias is not None}"
        )
