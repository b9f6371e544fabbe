"""QuantLinear's Triton branch (LLMQUANT_KERNEL=triton; CPU runs it through TRITON_INTERPRET=1):
the lean eager path (no custom op outside torch.compile, weights validated once, launch config
cached per M bucket) and the compiled path (custom op, fullgraph=True)."""

import pytest
import torch
from llmquant.kernels import dispatch, reference_linear, tiles
from torch import nn

from llmquant import QuantLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def layer(monkeypatch):
    monkeypatch.setenv("LLMQUANT_KERNEL", "triton")
    monkeypatch.setenv("LLMQUANT_AUTOTUNE", "0")
    torch.manual_seed(0)
    linear = nn.Linear(300, 72).to(torch.float16)
    return QuantLinear.from_linear(linear, 4, 128, False).to(DEVICE)


def _count(monkeypatch, module, name) -> list:
    calls = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _expected(module, x):
    return reference_linear(x, module.qweight, module.scales, module.qzeros, module.bias, 4, 128)


def test_eager_path_skips_the_custom_op_and_caches_validation_and_config(layer, monkeypatch):
    op_calls = _count(monkeypatch, dispatch, "_quant_matmul_2d")  # what the custom op runs
    checks = _count(monkeypatch, dispatch, "_check_weights")
    picks = _count(monkeypatch, dispatch, "pick_config")
    launches = _count(monkeypatch, dispatch, "_launch")
    x = torch.randn(1, 1, 300, dtype=torch.float16, device=DEVICE)
    for _ in range(3):
        y = layer(x)
    assert y.shape == (1, 1, 72) and y.dtype == torch.float16
    expected = _expected(layer, x)
    assert (y.double() - expected).abs().max() <= 4e-3 * expected.abs().max()
    assert op_calls == [], "eager forward went through the torch.library custom op"
    assert len(checks) == 1, "weights validated more than once"
    assert len(picks) == 1, "launch config not cached on the module"
    assert len(launches) == 3, "one launch per decode call"
    assert launches[0][-1].route == "gemv"
    layer(torch.randn(2, 300, dtype=torch.float16, device=DEVICE))  # a new M key: one more pick
    layer(torch.randn(2, 300, dtype=torch.float32, device=DEVICE))  # a new dtype: one more pick
    assert len(picks) == 3 and len(checks) == 1


def test_replaced_buffers_are_validated_again(layer, monkeypatch):
    checks = _count(monkeypatch, dispatch, "_check_weights")
    x = torch.randn(3, 300, dtype=torch.float16, device=DEVICE)
    layer(x)
    layer.scales = layer.scales.clone()  # e.g. load into new tensors, or .to()
    y = layer(x)
    assert len(checks) == 2
    expected = _expected(layer, x)
    assert (y.double() - expected).abs().max() <= 4e-3 * expected.abs().max()


def test_eager_bad_input_is_named(layer):
    with pytest.raises(ValueError, match="qweight has"):
        layer(torch.randn(2, 290, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="K=299 inputs but the layer has in_features=300"):
        layer(torch.randn(2, 299, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.ones(2, 300, dtype=torch.int32, device=DEVICE))


def test_bad_weights_fail_once_at_first_call(layer):
    layer.qzeros = layer.qzeros.to(torch.int32)
    with pytest.raises(ValueError, match="qzeros must be"):
        layer(torch.randn(1, 300, dtype=torch.float16, device=DEVICE))


def test_compiled_forward_uses_the_custom_op_fullgraph(layer, monkeypatch):
    op_calls = _count(monkeypatch, dispatch, "_quant_matmul_2d")
    x = torch.randn(4, 300, dtype=torch.float16, device=DEVICE)
    eager = layer(x)
    assert op_calls == []
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    assert len(op_calls) >= 1, "compiled forward did not run the custom op"
    torch.testing.assert_close(y, eager, rtol=0, atol=0)


def test_eager_path_output_is_fully_written(layer, monkeypatch):
    """Outputs and split-K workspaces start as NaN: every element must be written."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tiles, "empty", nan_empty)
    for m in (1, 4, 9):
        x = torch.randn(m, 300, dtype=torch.float16, device=DEVICE)
        y = layer(x)
        assert torch.isfinite(y).all()
        expected = _expected(layer, x)
        assert (y.double() - expected).abs().max() <= 4e-3 * expected.abs().max()
