"""The CPU-checkable parts of the GPU benchmarks: file writing, ratios, the tinygemm weight mapping."""

import json

import pytest
import torch
from llmquant.evals import bench_kernels
from llmquant.kernels import dequantize, pack_codes


def test_dry_run_writes_json_and_markdown_without_numbers(tmp_path):
    assert bench_kernels.main(["--dry-run", "--quick", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("bench_kernels-dryrun-*.json")
    payload = json.loads(json_path.read_text())
    assert payload["dry_run"] and payload["mode"] == "quick" and payload["env"]["git_commit"]
    assert len(payload["results"]) == 3 * 4
    assert all(r["quant_us"] is None and r["speedup"] is None for r in payload["results"])
    table = json_path.with_suffix(".md").read_text()
    assert "| 4096x11008 | int4-g128-asym | 2048 |" in table and "tinygemm x bf16" in table


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
