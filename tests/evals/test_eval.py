"""Perplexity harness (llmquant.evals): protocol, agreement with transformers' loss, stats, bad input, CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from llmquant.evals import EvalError  # noqa: E402
from llmquant.evals import cli as eval_cli  # noqa: E402
from llmquant.evals.data import batches, load_text, make_windows, tokenize  # noqa: E402
from llmquant.evals.perplexity import score, summarize  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
STORIES = SHARED_DATA / "stories260k"
TINY_TEXT = SHARED_DATA / "tinystories-valid-excerpt.txt"
WIKITEXT = SHARED_DATA / "wikitext-2-raw-v1-test.jsonl"
SEQLEN = 128


@pytest.fixture(scope="module")
def stories():
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    ids = tokenize(tok, load_text(str(TINY_TEXT)))
    return tok, model, ids


def _hf_loss_sum(model, ids: torch.Tensor, begin: int, end: int, first_target: int) -> tuple[float, int]:
    """transformers' own loss on one window: labels = input_ids, unscored tokens set to -100."""
    x = ids[begin:end][None]
    labels = x.clone()
    labels[:, : first_target - begin] = -100
    n = int((labels[:, 1:] != -100).sum())
    with torch.inference_mode():
        loss = model(input_ids=x, labels=labels).loss.item()
    return loss * n, n


# --- protocol ---------------------------------------------------------------------------------


def test_windows_disjoint_and_remainder_dropped():
    n, s = 1000, 128
    w = make_windows(n, s)
    assert len(w) == n // s
    assert [x.begin for x in w] == list(range(0, (n // s) * s, s))
    assert all(x.end - x.begin == s and x.n_scored == s - 1 for x in w)  # first token of a window has no context
    assert len(make_windows(n, s, max_windows=3)) == 3


def test_stride_windows_score_every_token_once():
    n, s, stride = 1000, 128, 48
    w = make_windows(n, s, stride=stride)
    scored = [t for x in w for t in range(x.first_target, x.end)]
    assert scored == list(range(1, n))  # every token but the very first, once, in order
    assert all(x.end - x.begin <= s for x in w) and w[-1].end == n
    assert [x.begin for x in w] == list(range(0, len(w) * stride, stride))


def test_batches_never_mix_lengths():
    w = make_windows(1000, 128, stride=100)
    for b in batches(w, 4):
        assert len(b) <= 4 and len({x.end - x.begin for x in b}) == 1


def test_wikitext_local_file_is_the_canonical_text():
    text = load_text(str(WIKITEXT))
    data = text.encode()
    assert len(data) == 1_296_370
    assert hashlib.sha256(data).hexdigest().startswith("696cca6b65a1")


def test_tokens_and_windows_on_real_text(stories):
    tok, model, ids = stories
    assert ids.dtype == torch.int64 and ids.ndim == 1
    assert ids[0].item() != tok.bos_token_id  # no BOS unless asked
    with_bos = tokenize(tok, "Once upon a time", add_bos=True)
    assert with_bos[0].item() == tok.bos_token_id and len(with_bos) == len(tokenize(tok, "Once upon a time")) + 1
    w = make_windows(len(ids), SEQLEN, max_windows=6)
    out = score({"m": model}, ids, w, progress=False)["m"]
    assert out.tokens == [SEQLEN - 1] * 6
    res = summarize(out)
    assert res["windows"] == 6 and res["tokens"] == 6 * (SEQLEN - 1)


# --- agreement with transformers ------------------------------------------------------------------


def test_ppl_matches_transformers_loss(stories):
    _, model, ids = stories
    w = make_windows(len(ids), SEQLEN, max_windows=24)
    # small chunks and batches exercise the chunked lm_head path and batching
    res = summarize(score({"m": model}, ids, w, batch_size=4, chunk_rows=100, progress=False)["m"])
    sums = [_hf_loss_sum(model, ids, x.begin, x.end, x.first_target) for x in w]
    ref = math.exp(sum(s for s, _ in sums) / sum(n for _, n in sums))
    assert res["ppl"] == pytest.approx(ref, rel=1e-4)
    assert 3 < res["ppl"] < 10  # README: fp32 perplexity about 5.5


def test_stride_ppl_matches_transformers_loss(stories):
    _, model, ids = stories
    ids = ids[: 5 * SEQLEN + 37]  # ragged end: the last window is shorter
    w = make_windows(len(ids), SEQLEN, stride=SEQLEN // 2)
    res = summarize(score({"m": model}, ids, w, batch_size=3, progress=False)["m"])
    sums = [_hf_loss_sum(model, ids, x.begin, x.end, x.first_target) for x in w]
    assert res["tokens"] == len(ids) - 1 == sum(n for _, n in sums)
    assert res["ppl"] == pytest.approx(math.exp(sum(s for s, _ in sums) / res["tokens"]), rel=1e-4)


def test_model_against_itself(stories):
    _, model, ids = stories
    w = make_windows(len(ids), SEQLEN, max_windows=8)
    out = score({"base": model, "same": model}, ids, w, baseline="base", chunk_rows=300, progress=False)
    res = summarize(out["same"], out["base"])
    lo, hi = res["delta_ppl_ci95"]
    assert lo <= 0.0 <= hi and res["delta_ppl"] == pytest.approx(0.0, abs=1e-9)
    assert res["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert res["top1_agreement"] == 1.0


def test_quantized_model_interval_and_kl(stories):
    import llmquant

    _, model, ids = stories
    q = AutoModelForCausalLM.from_pretrained(
        STORIES, quantization_config=llmquant.QuantConfig(bits=3, group_size=64), dtype=torch.float32
    ).eval()
    w = make_windows(len(ids), SEQLEN, max_windows=10)
    out = score({"base": model, "q": q}, ids, w, baseline="base", progress=False)
    res = summarize(out["q"], out["base"])
    lo, hi = res["delta_ppl_ci95"]
    assert lo <= res["delta_ppl"] <= hi and hi - lo > 0
    assert res["kl_mean"] > 0 and 0 < res["top1_agreement"] < 1


# --- bad input --------------------------------------------------------------------------------------


def test_hub_dataset_offline_fails_fast():
    with pytest.raises(EvalError, match="local file"):
        load_text("wikitext2")
    with pytest.raises(EvalError, match="local file"):
        load_text("someone/some-dataset")


def test_bad_field_and_missing_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(EvalError, match="no field 'text'.*content"):
        load_text(str(p))
    assert load_text(str(p), text_field="content") == "hello"
    with pytest.raises(EvalError, match="not found"):
        load_text(str(tmp_path / "nope.jsonl"))


def test_short_text_and_bad_window_args():
    with pytest.raises(EvalError, match="fewer than one window"):
        make_windows(100, 128)
    with pytest.raises(EvalError, match="--stride"):
        make_windows(1000, 128, stride=200)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def _tokenizer_with_swapped_ids(tmp_path: Path) -> Path:
    """A copy of stories260k whose tokenizer maps two tokens to each other's ids."""
    out = tmp_path / "other-tok"
    shutil.copytree(STORIES, out)
    tj = json.loads((out / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = "▁the", "▁a"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out / "tokenizer.json").write_text(json.dumps(tj))
    return out


@pytest.mark.parametrize(
    "case, message",
    [
        ("dataset", "local file"),
        ("field", "no field"),
        ("short", "fewer than one window"),
        ("model", "cannot load model"),
        ("missing", "model folder not found"),
        ("tokenizer", "tokenizers of"),
        ("config", "cannot parse --configs"),
        ("bits", "bad --configs entry"),
    ],
)
def test_cli_bad_input_exit_2(case, message, tmp_path, capsys):
    data = ["--dataset", str(TINY_TEXT), "--seqlen", str(SEQLEN), "--max-windows", "2", "--no-progress"]
    argv = {
        "dataset": [str(STORIES), "--baseline", str(STORIES), "--dataset", "wikitext2"],
        "field": [str(STORIES), "--configs", "int8-g128", "--dataset", str(WIKITEXT), "--text-field", "body"],
        "short": [str(STORIES), *data, "--seqlen", "100000"],
        "model": [str(tmp_path), "--baseline", str(STORIES), *data],
        "missing": [str(tmp_path / "nope"), "--baseline", str(STORIES), *data],
        "tokenizer": [str(_tokenizer_with_swapped_ids(tmp_path)), "--baseline", str(STORIES), *data],
        "config": [str(STORIES), "--configs", "int8-g128,q4_k_m", *data],
        "bits": [str(STORIES), "--configs", "int5-g128", *data],
    }[case]
    if case == "model":
        (tmp_path / "config.json").write_text('{"model_type": "not-a-model"}')
    assert eval_cli.run(_parse(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llmquant eval: error: ") and message in err


# --- end to end ---------------------------------------------------------------------------------------


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "llmquant.evals.cli", *argv]
    # cwd: not the project root, whose kernels/ folder would shadow the installed `kernels` package
    # that transformers >= 5.25 imports (`-m` puts the working directory first on sys.path)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parent)


def test_cli_quantize_on_load_end_to_end(tmp_path):
    prefix = tmp_path / "report" / "stories"
    r = _cli(
        str(STORIES), "--configs", "int8-g128", "--dataset", str(TINY_TEXT), "--seqlen", str(SEQLEN),
        "--max-windows", "6", "--device", "cpu", "--report", str(prefix), "--json", str(tmp_path / "r.json"),
        "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "int8-g128" in r.stdout and "baseline" in r.stdout
    for ext in (".json", ".md", ".png"):
        assert prefix.with_name("stories" + ext).stat().st_size > 0
    payload = json.loads((tmp_path / "r.json").read_text())
    meta, (base, q) = payload["meta"], payload["models"]
    assert meta["seqlen"] == SEQLEN and meta["windows"] == 6 and meta["tokens_scored"] == 6 * (SEQLEN - 1)
    assert meta["dtype"] == "float32" and meta["device"].startswith("cpu")
    assert {"torch", "transformers", "llmquant"} <= set(meta["versions"]) and "git_commit" in meta
    assert base["baseline"] and not q["baseline"] and q["bits"] == 8 and q["method"] == "rtn"
    assert 8 < q["bits_per_weight"] < 9 and q["model_size_bytes"] < base["model_size_bytes"]
    lo, hi = q["delta_ppl_ci95"]
    assert lo <= q["delta_ppl"] <= hi and q["top1_agreement"] > 0.9 and q["kl_mean"] < 0.01
    assert abs(q["ppl"] - base["ppl"]) / base["ppl"] < 0.02


def test_cli_saved_model_against_baseline(tmp_path):
    import llmquant

    out = tmp_path / "int4"
    q = AutoModelForCausalLM.from_pretrained(
        STORIES, quantization_config=llmquant.QuantConfig(bits=4, group_size=64), dtype=torch.float32
    )
    q.save_pretrained(out)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(out)
    r = _cli(
        str(out), "--baseline", str(STORIES), "--dataset", str(TINY_TEXT), "--seqlen", str(SEQLEN),
        "--max-windows", "4", "--stride", str(SEQLEN // 2), "--json", str(tmp_path / "r.json"), "--no-progress",
        "--compare-bare-loop",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "harness vs bare loop" in r.stdout
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["meta"]["bare_loop"]["ratio"] > 0
    base, model = payload["models"]
    assert base["name"] == "baseline" and model["name"] == "int4" and model["bits"] == 4
    assert model["tokens"] == base["tokens"] == (SEQLEN - 1) + 3 * (SEQLEN // 2)
    assert 4 < model["bits_per_weight"] < 5.5 and base["ppl"] * 0.98 < model["ppl"] < base["ppl"] * 1.5


def test_cli_error_has_no_traceback(tmp_path):
    r = _cli(str(STORIES), "--configs", "int4-gXL", "--dataset", str(TINY_TEXT))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "llmquant eval: error: cannot parse --configs entry 'int4-gXL': expected intB-gG[-sym][-METHOD], e.g. int4-g128"
    ]
