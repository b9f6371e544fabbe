"""The CPU-checkable parts of the GPU benchmarks: file writing, ratios, the tinygemm weight mapping."""

import json

import pytest
import torch
from llmquant.evals import bench_kernels
from llmquant.kernels import dequantize, pack_codes


def test_rows_run_in_order_of_priority():
    """A run cut short has measured int4 M = 1 on every shape first, then M = 16, then int8 M = 1."""
    rows = bench_kernels.plan("standard")
    assert len(rows) == 6 * (6 + 2)
    assert [(q, m) for q, m, _, _ in rows[:6]] == [("int4-g128-asym", 1)] * 6
    assert [(n, k) for _, _, n, k in rows[:6]] == bench_kernels.SHAPES["llama2-7b"] + bench_kernels.SHAPES["llama3-70b"]
    assert [(q, m) for q, m, _, _ in rows[6::6]] == bench_kernels.STANDARD_PASSES[1:]
    wanted = {("int4-g128-asym", m) for m in (1, 4, 16, 64, 256, 2048)} | {("int8-g128-sym", m) for m in (1, 16)}
    assert {(q, m) for q, m, _, _ in rows} == wanted


def test_result_files_are_replaced_whole(tmp_path):
    env = {"device": "NVIDIA H200", "git_commit": "abc"}
    rows = [["1", "2"]]
    for n in (1, 2):  # rewritten after every row: the second write replaces the first
        json_path, md_path = bench_kernels.write_files(tmp_path, "bench_x", {"env": env, "n": n}, ["a", "b"], rows, "T")
    assert json_path.name == "bench_x-NVIDIA_H200.json" and json.loads(json_path.read_text())["n"] == 2
    assert "| 1 | 2 |" in md_path.read_text() and sorted(p.name for p in tmp_path.iterdir()) == [
        "bench_x-NVIDIA_H200.json",
        "bench_x-NVIDIA_H200.md",
    ]


def test_derived_ratios():
    rec = dict(fp16_us=30.0, bf16_us=32.0, quant_us=10.0, tinygemm_us=16.0, gemlite_us=15.0, bytes=20_000_000)
    bench_kernels.derive(rec, copy_gbps=4000.0)
    assert rec["speedup"] == pytest.approx(3.0) and rec["gbps"] == pytest.approx(2000.0)
    assert rec["frac_of_copy"] == pytest.approx(0.5)
    assert rec["tinygemm_x_bf16"] == pytest.approx(2.0) and rec["gemlite_x_fp16"] == pytest.approx(2.0)


@pytest.mark.parametrize("sym", [True, False])
def test_tinygemm_anchor_computes_the_same_weight(sym):
    """The tinygemm anchor is timed on the same weight as llmquant's (checked on CPU's tinygemm)."""
    n, k, group = 64, 256, 128
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(k // group, n, generator=gen) + 0.5).half() / 64
    qzeros = None if sym else torch.randint(0, 16, (k // group, n), generator=gen, dtype=torch.uint8)
    try:
        wpk, sz = bench_kernels.tinygemm_pack(codes, scales, qzeros, group)
        x = torch.randn(3, k, generator=gen).bfloat16()
        y = torch.ops.aten._weight_int4pack_mm(x, wpk, group, sz)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch build has no CPU tinygemm: {e}")
    w = dequantize(pack_codes(codes, 4), scales, qzeros, 4, group, k, dtype=torch.float64)
    ref = x.double() @ w.t()
    assert (y.double() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_static_cache_decode_step_matches_generate():
    """The decode step bench_e2e captures in a CUDA graph (static cache, in-place token and position
    updates) produces greedy generate's tokens; run eagerly here on a tiny random Llama."""
    from llmquant.evals.bench_e2e import build_model, static_decode

    torch.manual_seed(0)
    tiny = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, vocab_size=300)
    model = build_model(2, device="cpu", **tiny).float()
    prompt = torch.randint(10, 300, (1, 5))
    tokens, ms = static_decode(model, prompt, 6, use_graph=False)
    expected = model.generate(prompt, max_new_tokens=7, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    assert tokens == expected and ms is None
