"""QuantLinear on CPU: forward against the float64 reference, dtypes, bias, repr."""

import pytest
import torch
from llmquant.kernels import reference_linear
from torch import nn

from llmquant import QuantLinear


@pytest.mark.parametrize(
    "bits,group_size,sym", [(4, 32, False), (4, 128, True), (8, 64, False), (3, -1, False), (2, 32, True)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(bits, group_size, sym, dtype, bias, monkeypatch):
    monkeypatch.setenv("LLMQUANT_KERNEL", "torch")
    torch.manual_seed(0)
    linear = nn.Linear(172, 96, bias=bias).to(dtype)
    module = QuantLinear.from_linear(linear, bits, group_size, sym)
    x = torch.randn(3, 5, 172).to(dtype)
    y = module(x)
    assert y.dtype == dtype and y.shape == (3, 5, 96)
    expected = reference_linear(x, module.qweight, module.scales, module.qzeros, module.bias, bits, group_size)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert torch.allclose(y.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_dequantize_is_close_to_the_original_weight():
    torch.manual_seed(1)
    linear = nn.Linear(256, 64)
    for bits, limit in ((8, 0.01), (4, 0.15)):
        module = QuantLinear.from_linear(linear, bits, 64, False)
        error = (module.dequantize(torch.float32) - linear.weight).norm() / linear.weight.norm()
        assert error < limit, (bits, error)


def test_extra_repr_and_buffers():
    module = QuantLinear(576, 1536, bits=4, group_size=128, sym=False, bias=False)
    text = repr(module)
    assert "bits=4" in text and "group_size=128" in text and "sym=False" in text
    names = dict(module.named_buffers())
    assert names["qweight"].shape == (72, 1536) and names["qweight"].dtype == torch.int32
    assert names["scales"].shape == (5, 1536) and names["qzeros"].dtype == torch.uint8
    assert "qzeros" not in dict(QuantLinear(64, 8, 4, 32, sym=True).named_buffers())
