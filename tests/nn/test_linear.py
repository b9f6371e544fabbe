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


# SmolLM2-135M shapes (K = 576 with group 128: a ragged last group of 64) and small ones.
KERNEL_SHAPES = [(576, 192, 128), (576, 1536, 128), (96, 32, 32), (256, 48, -1)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("in_features,out_features,group_size", KERNEL_SHAPES)
def test_cpu_decode_kernel_matches_reference(bits, sym, in_features, out_features, group_size, monkeypatch):
    monkeypatch.setenv("LLMQUANT_KERNEL", "torch")
    torch.manual_seed(bits * 100 + in_features + sym)
    linear = nn.Linear(in_features, out_features, bias=True)
    module = QuantLinear.from_linear(linear, bits, group_size, sym)
    with torch.no_grad():
        module.bias.normal_()
    for rows in (1, 7):
        x = torch.randn(rows, 1, in_features)
        y = module(x)
        assert module.cpu_packed is not None, "the decode kernel should take this shape"
        assert y.dtype == torch.float32 and y.shape == (rows, 1, out_features)
        # The kernel rounds activations to bfloat16; the rest (scales, zeros, output) adds ~2^-9.
        xb = x.to(torch.bfloat16)
        expected = reference_linear(xb, module.qweight, module.scales, module.qzeros, module.bias, bits, group_size)
        scale = expected.abs().max().item()
        assert (y.double() - expected).abs().max().item() < 1e-2 * scale
        assert (y.double() - expected).abs().mean().item() < 2e-3 * expected.abs().mean().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_prefill_and_dtypes(dtype, monkeypatch):
    monkeypatch.setenv("LLMQUANT_KERNEL", "torch")
    torch.manual_seed(3)
    module = QuantLinear.from_linear(nn.Linear(576, 64, bias=False), 4, 128, False)
    for rows in (1, 40):  # 40 rows > the decode limit (32): dequantize + GEMM, exact in float32
        x = torch.randn(1, rows, 576).to(dtype)
        y = module(x)
        assert y.dtype == dtype and y.shape == (1, rows, 64)
        expected = reference_linear(x, module.qweight, module.scales, module.qzeros, None, 4, 128)
        tol = 1e-5 if (dtype == torch.float32 and rows > 32) else 1e-2
        assert (y.double() - expected).abs().max().item() < tol * expected.abs().max().item()


def test_cpu_copy_is_counted_not_saved_and_follows_new_codes():
    from llmquant.stats import bits_per_weight, model_size_bytes

    torch.manual_seed(4)
    linear = nn.Linear(576, 192, bias=False)
    module = QuantLinear.from_linear(linear, 4, 128, False)
    before_bits, before_bytes = bits_per_weight(module), model_size_bytes(module)
    assert module.prepare_cpu()
    assert set(module.state_dict()) == {"qweight", "scales", "qzeros"}
    assert bits_per_weight(module) == before_bits  # the format, not the kernel's copy
    copy_bytes = module.cpu_packed.numel() + module.cpu_scales_zeros.numel() * 2
    assert model_size_bytes(module) == before_bytes + copy_bytes  # memory held, counted
    # new codes loaded into the buffers: the copy is rebuilt, outputs follow
    other = QuantLinear.from_linear(nn.Linear(576, 192, bias=False), 4, 128, False)
    module.load_packed({k: other.state_dict()[k] for k in ("qweight", "scales", "qzeros")})
    x = torch.randn(1, 576)
    assert torch.equal(module(x), other(x))


@pytest.fixture
def load_probe(monkeypatch):
    """Feeds decode_threads the given runnable-thread counts, one per sample, on 2 cores and 2 threads."""
    from llmquant.kernels import cpu

    counts: list[int] = []
    monkeypatch.setattr(cpu, "runnable_threads", lambda: counts.pop(0))
    monkeypatch.setattr(cpu._Load, "cores", 2)
    monkeypatch.setattr(cpu._Load, "busy", cpu.collections.deque(maxlen=cpu.LOAD_SAMPLES))
    monkeypatch.setattr(cpu._Load, "threads", 0)
    monkeypatch.setattr(cpu._Load, "sampled_at", float("-inf"))
    clock = [1000.0]
    monkeypatch.setattr(cpu.time, "monotonic", lambda: clock[0])
    monkeypatch.delenv(cpu.DECODE_THREADS_ENV, raising=False)

    def threads_after(samples: list[int]) -> list[int]:
        chosen = []
        for count in samples:
            counts.append(count)
            clock[0] += cpu.LOAD_SAMPLE_SECONDS
            chosen.append(cpu.decode_threads(2))
            assert cpu.decode_threads(2) == chosen[-1] and counts == []  # no new sample within 0.1 s
        return chosen

    return threads_after


def test_decode_threads_drop_to_one_while_another_process_is_busy(load_probe, monkeypatch):
    from llmquant.kernels import cpu

    # idle: our two threads; one competing process: three; a single odd sample does not flip it
    assert load_probe([2, 2, 3, 2, 1]) == [2, 2, 2, 2, 2]
    assert load_probe([3, 3, 2, 3, 3]) == [2, 1, 1, 1, 1]
    assert load_probe([2, 2, 2]) == [1, 2, 2]
    assert load_probe([5, 5]) == [2, 1]  # never fewer than one thread
    monkeypatch.setenv(cpu.DECODE_THREADS_ENV, "2")
    assert cpu.decode_threads(2) == 2 and cpu.decode_threads(1) == 1
    monkeypatch.setenv(cpu.DECODE_THREADS_ENV, "two")
    with pytest.raises(ValueError, match=cpu.DECODE_THREADS_ENV):
        cpu.decode_threads(2)


def test_decode_on_fewer_threads_gives_the_same_output_and_restores_torch_threads(monkeypatch):
    from llmquant.kernels import cpu

    monkeypatch.setenv("LLMQUANT_KERNEL", "torch")
    torch.manual_seed(5)
    module = QuantLinear.from_linear(nn.Linear(576, 1536, bias=True), 8, 128, False)
    x = torch.randn(1, 1, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv(cpu.DECODE_THREADS_ENV, "2")
        both = module(x)
        monkeypatch.setenv(cpu.DECODE_THREADS_ENV, "1")
        one = module(x)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert module.cpu_packed is not None and torch.equal(one, both)


def test_cuda_without_triton_falls_back_to_dequantize_with_one_warning(monkeypatch):
    import warnings
    from types import SimpleNamespace

    from llmquant.nn import linear

    monkeypatch.delenv(linear.KERNEL_ENV, raising=False)
    monkeypatch.setattr(linear, "HAVE_TRITON", False)
    linear._warn_no_triton.cache_clear()
    cuda_input = SimpleNamespace(is_cuda=True)  # stands in for a CUDA tensor: _use_triton reads only is_cuda
    hint = r'not installed: pip install "llmquant\[kernels\]"; quantized layers dequantize'
    with pytest.warns(UserWarning, match=hint):
        assert linear._use_triton(cuda_input) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not on every forward
        assert linear._use_triton(cuda_input) is False
    monkeypatch.setattr(linear, "HAVE_TRITON", True)
    assert linear._use_triton(cuda_input) is True and linear._use_triton(SimpleNamespace(is_cuda=False)) is False
