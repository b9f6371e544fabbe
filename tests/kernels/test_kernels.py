"""The fused Triton dequant-matmul kernels against the float64 torch reference.

Without CUDA the kernels run on CPU through the Triton interpreter. Triton decides whether a
`@triton.jit` function is interpreted when the function is defined, i.e. when
`llmquant.kernels.triton_matmul` is first imported, so TRITON_INTERPRET is set here, before that
import (importing torch does not import triton). With CUDA the same module runs compiled
kernels, and the `gpu`-marked tests add real Llama sizes in fp16 and bf16.
"""

import dataclasses
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from llmquant.kernels import dequantize, gemm, pack_codes, reference_linear, tiles, tuning  # noqa: E402  # noqa: E402
from llmquant.kernels import dispatch as tm  # noqa: E402
from llmquant.kernels.tuning import KernelConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# False if something imported the kernels before this module could set TRITON_INTERPRET.
INTERPRETED = type(gemm._gemm_kernel).__name__ == "InterpretedFunction"
if DEVICE == "cpu" and not INTERPRETED:  # tests/conftest.py sets it first; never skip silently
    raise RuntimeError("no CUDA, and llmquant.kernels.triton_matmul was imported before TRITON_INTERPRET=1 was set")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Relative error allowed against the bound sum_k |x||W| + |bias|: the dequantized weight is
# rounded once to the activation dtype (2^-11 for fp16, 2^-8 for bf16) and the output once more.
RTOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def make_weight(n, k, bits, group_size, sym, scale_dtype, device=DEVICE, seed=0):
    """Random packed weight: qweight [ceil(K/V), N] int32, scales [G, N], qzeros [G, N] uint8 | None."""
    gen = torch.Generator().manual_seed(seed)
    group = k if group_size == -1 else group_size
    n_groups = -(-k // group)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    qweight = pack_codes(codes, bits)
    # Scales of ~1/sqrt(K * levels^2) keep outputs O(1) whatever the bit width.
    scales = (torch.rand(n_groups, n, generator=gen) + 0.5) / ((1 << bits) * k**0.5)
    qzeros = None if sym else torch.randint(0, 1 << bits, (n_groups, n), generator=gen, dtype=torch.uint8)
    to = dict(device=device)
    return (
        qweight.to(**to),
        scales.to(scale_dtype).to(**to),
        None if qzeros is None else qzeros.to(**to),
    )


@pytest.fixture(autouse=True)
def _untuned(monkeypatch):
    """Correctness tests use each regime's default config: tuning every small shape on a GPU would
    compile every candidate many times over. Tuning has its own test; forced configs cover the rest."""
    monkeypatch.setenv("LLMQUANT_AUTOTUNE", "0")


@pytest.fixture
def poisoned(monkeypatch):
    """Every output/workspace buffer the wrapper allocates starts as NaN, so an unwritten element fails."""
    calls = []

    def nan_empty(shape, dtype, device):
        calls.append(tuple(shape))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tiles, "empty", nan_empty)
    return calls


def check(x, qweight, scales, qzeros, bias, bits, group_size, config=None):
    """Run the kernel (dispatch, or a forced config) and compare with the float64 reference."""
    if config is None:
        y = tm.quant_matmul(x, qweight, scales, qzeros, bias, bits, group_size)
    else:
        y = tm._quant_matmul_2d(x, qweight, scales, qzeros, bias, bits, group_size, config=config)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], qweight.shape[1])
    assert y.device == x.device
    ref = reference_linear(x, qweight, scales, qzeros, bias, bits, group_size)
    w = dequantize(qweight, scales, qzeros, bits, group_size, x.shape[-1], dtype=torch.float64)
    bound = x.double().abs() @ w.abs().t()
    if bias is not None:
        bound = bound + bias.double().abs()
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all(), "output has NaN/Inf (an unwritten element?)"
    worst = (err / (bound + 1e-30)).max().item()
    assert worst <= RTOL[x.dtype], f"max error {worst:.3g} of the |x||W| bound exceeds {RTOL[x.dtype]}"
    return y


def inputs(m, n, k, bits, group_size, sym, dtype, bias=True, scale_dtype=None, seed=0):
    qweight, scales, qzeros = make_weight(n, k, bits, group_size, sym, scale_dtype or dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    return x, qweight, scales, qzeros, b


# ------------------------------------------------------------------------------------------ CPU / any device


# K=300 makes every group size ragged (300 % 32, 64, 128, 256 != 0); N=72 leaves a partial N tile.
# M picks the route: 1 and 3 the GEMV (2/4/8 bits; 3 bits the split-K GEMM), 33 the split-K GEMM,
# 130 the dequantize + GEMM prefill route.
@pytest.mark.parametrize("m", [1, 3, 33, 130], ids=["decode", "gemv3", "splitk", "prefill"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bits_sym_group_grid(poisoned, bits, sym, group_size, m):
    dtype = torch.float16 if (bits + group_size + m) % 2 == 1 else torch.float32  # both dtypes over the grid
    check(*inputs(m, 72, 300, bits, group_size, sym, dtype, seed=bits * 7 + group_size), bits, group_size)
    assert poisoned, "the NaN-poisoned allocator was not used"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("m", [1, 4, 16, 65])
@pytest.mark.parametrize("n,k", [(64, 172), (172, 576), (40, 1536)])
def test_ragged_shapes_and_m(poisoned, n, k, m, dtype):
    for bits, group_size, sym in ((4, 128, False), (8, 128, True), (3, 32, True)):
        check(*inputs(m, n, k, bits, group_size, sym, dtype, seed=m + n + k), bits, group_size)


def _routes_taken(monkeypatch) -> list[str]:
    taken = []
    launchers = dict(tm._LAUNCH)

    def spy(route):
        def run(*args):
            taken.append(route)
            return launchers[route](*args)

        return run

    monkeypatch.setattr(tm, "_LAUNCH", {route: spy(route) for route in launchers})
    return taken


@pytest.mark.parametrize(
    "m,bits,route",
    [(1, 4, "gemv"), (4, 8, "gemv"), (2, 2, "gemv"), (1, 3, "gemm"), (5, 4, "gemm"), (64, 4, "gemm"),
     (65, 4, "gemm"), (127, 8, "gemm"), (128, 4, "dequant"), (300, 3, "dequant")],
)  # fmt: skip
def test_dispatch_by_m(poisoned, monkeypatch, m, bits, route):
    """M (and bits) choose the kernel family; the default prefill crossover is M = 128."""
    monkeypatch.delenv("LLMQUANT_PREFILL_M", raising=False)
    taken = _routes_taken(monkeypatch)
    check(*inputs(m, 40, 172, bits, 64, False, torch.float16, seed=m), bits, 64)
    assert taken == [route]


def test_prefill_crossover_is_tunable(poisoned, monkeypatch):
    taken = _routes_taken(monkeypatch)
    monkeypatch.setenv("LLMQUANT_PREFILL_M", "70")
    check(*inputs(70, 40, 172, 4, 32, True, torch.float32), 4, 32)
    monkeypatch.setenv("LLMQUANT_PREFILL_M", "4096")
    check(*inputs(200, 40, 172, 4, 32, True, torch.float32), 4, 32)
    assert taken == ["dequant", "gemm"]


# Each kernel forced at sizes the dispatch would not give it, including split-K slices past K
# (K=172, split 4 -> the last slice is empty and dropped), BLOCK_K below / above the group size,
# and the GEMV with M = 1..4 in a BLOCK_M of 1, 2 or 4.
@pytest.mark.parametrize(
    "config",
    [
        KernelConfig(16, 64, 64, split_k=1, num_stages=1),
        KernelConfig(16, 32, 32, split_k=4, num_stages=1),
        KernelConfig(16, 64, 128, split_k=3, num_stages=1),
        KernelConfig(64, 32, 32, split_k=1, num_stages=1),
        KernelConfig(4, 32, 32, split_k=4, num_stages=1, route="gemv"),
        KernelConfig(4, 64, 128, split_k=1, num_stages=1, route="gemv"),
        KernelConfig(4, 16, 64, split_k=3, num_stages=1, route="gemv"),
        KernelConfig(1, 32, 32, split_k=1, num_stages=1, route="dequant"),
    ],
    ids=lambda c: f"{c.route}-bm{c.block_m}-bn{c.block_n}-bk{c.block_k}-split{c.split_k}",
)
@pytest.mark.parametrize("m", [1, 4])
def test_forced_configs(poisoned, config, m):
    for bits, group_size, sym in ((4, 32, False), (8, 64, True), (2, -1, False)):
        check(*inputs(m, 40, 172, bits, group_size, sym, torch.float16), bits, group_size, config=config)
    slices = tiles.split_slices(172, config.split_k, config.block_k)[1]
    if slices > 1:
        assert (slices, m, 40) in poisoned, "split-K workspace not allocated through tiles.empty"
    if config.route == "dequant":
        assert (172, 40) in poisoned, "scratch weight not allocated through tiles.empty"


def test_gemv_fp32_and_bias_free_and_counters_reset(poisoned):
    """fp32 activations through the GEMV, no bias, and the split-K arrival counters left at zero."""
    cfg = KernelConfig(2, 32, 64, split_k=4, num_stages=1, route="gemv")
    for bits, group_size, sym in ((4, 128, False), (8, -1, True), (4, 48, False)):
        x, qweight, scales, qzeros, _ = inputs(2, 72, 300, bits, group_size, sym, torch.float32, bias=False)
        check(x, qweight, scales, qzeros, None, bits, group_size, config=cfg)
    assert int(tiles.counters(x.device, 1).abs().sum()) == 0


def test_every_candidate_config(poisoned):
    """Every config the GPU tuner may offer is correct (small shape; the gpu test repeats it larger)."""
    for m in (1, 33, 130):
        for bits, group_size, sym in ((4, 128, False), (3, 32, True)):
            args = inputs(m, 40, 300, bits, group_size, sym, torch.float16)
            for config in tm.tuning.candidate_configs(m, 40, 300, 132, bits, group_size)[:: 3 if m == 1 else 1]:
                check(*args, bits, group_size, config=config)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("m", [1, 16, 33, 256])
def test_candidates_fit_the_device_shared_memory(m, bits):
    """Offered configs fit the device's shared memory (a fake 150 KB limit, and the H100's
    232,448 bytes), while the unfiltered list does hold configs that would not fit."""
    for limit in (150_000, 232_448):
        unfiltered = tuning.candidate_configs(m, 1000, 1336, 132, bits, 32)
        offered = tuning.candidate_configs(m, 1000, 1336, 132, bits, 32, max_smem=limit)
        assert offered and set(offered) <= set(unfiltered)
        assert all(tuning.smem_bytes(c, bits) <= limit for c in offered)
        assert [c for c in unfiltered if c not in offered] == [
            c for c in unfiltered if tuning.smem_bytes(c, bits) > limit
        ]
    # The configuration that failed on the H100 (233,472 bytes needed) is no longer offered there.
    big = tuning.candidate_configs(33, 1000, 1336, 132, 3, 32)
    assert any(tuning.smem_bytes(c, 3) > 232_448 for c in big)
    assert tuning.fit([KernelConfig(128, 256, 256, num_stages=5)], 3, 1000), "fit must never return nothing"


def test_pick_config_uses_the_device_limit(monkeypatch, tmp_path):
    """On a (fake) GPU the offered candidates are filtered by the limit the driver reports."""
    monkeypatch.setattr(tm, "_INTERPRET", False)
    monkeypatch.setenv("LLMQUANT_AUTOTUNE", "0")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning, "device_info", lambda index: ("Fake_GPU", 132, 1000))
    seen = []
    real = tuning.candidate_configs

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(tuning, "candidate_configs", spy)
    x, qweight, scales, qzeros, bias = inputs(33, 40, 300, 4, 128, False, torch.float16)
    out = torch.empty(33, 40, dtype=torch.float16)
    tm.pick_config(x, qweight, scales, qzeros, bias, 4, 128, out)
    assert len(seen[0]) == 1 and tuning.smem_bytes(seen[0][0], 4) == min(
        tuning.smem_bytes(c, 4) for c in real(33, 40, 300, 132, 4, 128)
    )


def test_poison_detects_unwritten_output(poisoned, monkeypatch):
    """The checker must fail when the kernel leaves an element unwritten."""
    x, qweight, scales, qzeros, bias = inputs(3, 40, 172, 4, 64, False, torch.float16)
    monkeypatch.setattr(tm, "_launch", lambda *args: args[7])  # launch nothing, return the NaN buffer
    with pytest.raises(AssertionError, match="NaN"):
        check(x, qweight, scales, qzeros, bias, 4, 64)


def test_leading_dims_strides_no_bias_and_scale_dtype(poisoned):
    qweight, scales, qzeros = make_weight(48, 136, 4, 32, False, torch.float32)  # fp32 scales, fp16 x
    x = torch.randn(2, 3, 2 * 136).to(torch.float16).to(DEVICE)[..., ::2]  # non-contiguous K
    check(x, qweight, scales, qzeros, None, 4, 32)
    x = torch.randn(5, 2, 136).to(torch.float16).to(DEVICE)  # M = 10 through 3-D input
    check(x, qweight, scales, qzeros, None, 4, 32)


def test_empty_batch():
    x, qweight, scales, qzeros, bias = inputs(1, 40, 172, 4, 64, False, torch.float16)
    y = tm.quant_matmul(x[:0], qweight, scales, qzeros, bias, 4, 64)
    assert y.shape == (0, 40)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: {**a, "x": a["x"][:, :-8]}, "qweight has"),
        (lambda a: {**a, "qweight": a["qweight"].to(torch.int64)}, "qweight must be"),
        (lambda a: {**a, "qweight": a["qweight"][:, :-1]}, "scales must have shape"),
        (lambda a: {**a, "scales": a["scales"][:-1]}, "scales must have shape"),
        (lambda a: {**a, "scales": a["scales"].to(torch.int32)}, "scales must be"),
        (lambda a: {**a, "qzeros": a["qzeros"].to(torch.int32)}, "qzeros must be"),
        (lambda a: {**a, "qzeros": a["qzeros"][:, :-1]}, "qzeros must have shape"),
        (lambda a: {**a, "bias": a["bias"][:-1]}, "bias must have shape"),
        (lambda a: {**a, "x": a["x"].to(torch.int32)}, "x must be"),
        (lambda a: {**a, "bits": 5}, "bits must be"),
        (lambda a: {**a, "group_size": 0}, "group_size must be"),
    ],
    ids=[
        "wrong-K", "qweight-dtype", "qweight-N", "scales-groups", "scales-dtype", "qzeros-dtype",
        "qzeros-shape", "bias-shape", "x-dtype", "bits", "group-size",
    ],
)  # fmt: skip
def test_bad_inputs_raise_before_launch(monkeypatch, mutate, match):
    def no_launch(*args, **kwargs):
        raise AssertionError("launched despite bad input")

    monkeypatch.setattr(tm, "_launch", no_launch)
    x, qweight, scales, qzeros, bias = inputs(2, 40, 172, 4, 64, False, torch.float16)
    args = mutate(dict(x=x, qweight=qweight, scales=scales, qzeros=qzeros, bias=bias, bits=4, group_size=64))
    with pytest.raises(ValueError, match=match):
        tm.quant_matmul(**args)


def test_tuning_picks_the_fastest_and_persists_per_gpu(monkeypatch, tmp_path):
    """The tuner times every candidate once, stores the winner in <gpu>-triton<version>.json, and a
    later process (cleared in-memory table) reuses it without timing again. Runs on CPU with a fake
    GPU and clock."""
    monkeypatch.setattr(tm, "_INTERPRET", False)  # take the GPU path of the config choice...
    monkeypatch.setattr(tm, "_check", lambda *args: None)  # ...which _check would refuse for CPU tensors
    monkeypatch.setenv("LLMQUANT_AUTOTUNE", "1")
    monkeypatch.setenv("LLMQUANT_TRITON_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning, "device_info", lambda index: ("Fake_GPU", 132, None))
    timed = []

    def fake_bench(fn, **kwargs):
        if len(timed) < 2:
            fn()  # really launches (interpreted) with the candidate config
        timed.append(1)
        return 10.0 - len(timed)  # each candidate "faster" than the last: the last one wins

    monkeypatch.setattr(tm.triton.testing, "do_bench", fake_bench)
    tuning.tuned.cache_clear()
    x, qweight, scales, qzeros, bias = inputs(1, 40, 300, 4, 128, False, torch.float16)
    candidates = tuning.candidate_configs(1, 40, 300, 132, 4, 128, None, 2, tuning.prefill_threshold())
    check(x, qweight, scales, qzeros, bias, 4, 128)
    assert len(timed) == len(candidates) > 1
    path = tmp_path / f"Fake_GPU-triton{tm.triton.__version__}.json"
    saved = json.loads(path.read_text())
    assert saved["triton"] == tm.triton.__version__
    assert saved["configs"] == {"m1|n40|k300|b4|g128|z1|float16": dataclasses.asdict(candidates[-1])}
    assert candidates[-1].route == "gemv"
    tuning.tuned.cache_clear()
    check(x, qweight, scales, qzeros, bias, 4, 128)
    assert len(timed) == len(candidates), "re-tuned instead of reading the JSON"
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "a temporary file was left behind"
    tuning.tuned.cache_clear()


def test_tuning_cache_merges_writers_and_ignores_other_triton(tmp_path):
    """Two processes tuning different keys both keep their entries (read-merge-replace); a file
    written with another Triton version is not trusted."""
    path = tuning.cache_file("Fake_GPU", str(tmp_path))
    assert tuning.triton.__version__ in path.name
    a, b = KernelConfig(16, 64, 128, 4), KernelConfig(1, 128, 128, 8, route="gemv")
    tuning.save(path, {"one": a})
    tuning.save(path, {"two": b})  # a second process that never saw "one"
    assert tuning._read(path) == {"one": a, "two": b}
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "triton": "0.0.1"}))
    assert tuning._read(path) == {}
    path.write_text("{not json")
    assert tuning._read(path) == {}


def test_torch_compile_fullgraph(poisoned):
    """The custom op and its fake implementation let dynamo trace through quant_matmul in one graph."""
    x, qweight, scales, qzeros, bias = inputs(3, 40, 172, 4, 64, False, torch.float16)
    compiled = torch.compile(tm.quant_matmul, fullgraph=True, backend="aot_eager")
    y = compiled(x, qweight, scales, qzeros, bias, 4, 64)
    torch.testing.assert_close(y, tm.quant_matmul(x, qweight, scales, qzeros, bias, 4, 64), rtol=0, atol=0)


def test_device_mismatch_is_named():
    if DEVICE != "cuda":
        pytest.skip("needs two devices")
    x, qweight, scales, qzeros, bias = inputs(2, 40, 172, 4, 64, False, torch.float16)
    with pytest.raises(ValueError, match="scales is on"):
        tm.quant_matmul(x, qweight, scales.cpu(), qzeros, bias, 4, 64)


# ------------------------------------------------------------------------------------------ GPU, real sizes


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 16, 2048])
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, False), (8, 128, True), (3, 64, False)])
def test_gpu_real_sizes(poisoned, n, k, m, dtype, bits, group_size, sym):
    check(*inputs(m, n, k, bits, group_size, sym, dtype), bits, group_size)


@gpu
@needs_cuda
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gpu_grid_bf16_ragged(poisoned, bits, group_size):
    for m in (1, 7, 16, 33, 300):
        check(*inputs(m, 172, 1000, bits, group_size, group_size != 64, torch.bfloat16), bits, group_size)


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 4, 33, 300])
def test_gpu_every_candidate_config(poisoned, m):
    """Every config the tuner may pick computes the right thing (ragged N and K, both code loaders)."""
    for bits, group_size, sym in ((4, 128, False), (3, 32, True)):
        args = inputs(m, 1000, 1336, bits, group_size, sym, torch.float16)
        _, sms, max_smem = tuning.device_info(torch.cuda.current_device())
        for config in tuning.candidate_configs(m, 1000, 1336, sms, bits, group_size, max_smem):
            check(*args, bits, group_size, config=config)


@gpu
@needs_cuda
def test_gpu_tuning_and_cuda_graph_capture(monkeypatch, tmp_path):
    """Tuning writes the per-GPU JSON; once tuned the forward path has no host sync, so it captures
    in a CUDA graph."""
    monkeypatch.setenv("LLMQUANT_AUTOTUNE", "1")
    monkeypatch.setenv("LLMQUANT_TRITON_CACHE", str(tmp_path))
    x, qweight, scales, qzeros, bias = inputs(1, 4096, 4096, 4, 128, False, torch.float16)
    tm.quant_matmul(x, qweight, scales, qzeros, bias, 4, 128)  # tune outside the capture
    saved = list(tmp_path.glob("*.json"))
    assert len(saved) == 1 and "m1|n4096|k4096|b4|g128|z1|float16" in saved[0].read_text()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = tm.quant_matmul(x, qweight, scales, qzeros, bias, 4, 128)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, tm.quant_matmul(x, qweight, scales, qzeros, bias, 4, 128))


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (8, -1, True)])
def test_whole_model_triton_path_equals_torch_path(stories_dir, monkeypatch, bits, group_size, sym):
    """stories260k quantized: logits through the Triton kernels equal the CPU torch path."""
    from transformers import AutoModelForCausalLM

    import llmquant

    config = llmquant.QuantConfig(bits=bits, group_size=group_size, sym=sym)
    model = AutoModelForCausalLM.from_pretrained(stories_dir, quantization_config=config, device_map=DEVICE)
    tokens = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(bits)).to(DEVICE)
    with torch.no_grad():
        monkeypatch.setenv("LLMQUANT_KERNEL", "torch")
        monkeypatch.setenv("LLMQUANT_CPU_DECODE_ROWS", "0")  # the exact float path, not the bf16 CPU kernel
        expected = model(tokens).logits
        monkeypatch.setenv("LLMQUANT_KERNEL", "triton")
        logits = model(tokens).logits
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
