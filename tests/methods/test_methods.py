"""Calibrated methods (gptq, clip) on real data: per-layer error vs RTN, a float64 reference of
GPTQ, saving and loading, bad inputs."""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmquant
from llmquant import QuantConfig, QuantLinear
from llmquant.calibration.data import load_calibration, sample_windows
from llmquant.calibration.hessian import HESSIAN_PANEL, input_hessian
from llmquant.errors import CalibrationError
from llmquant.methods import METHODS, get_method, gptaq, gptq, rotation
from llmquant.methods.codes import group_params, quantize_rtn
from llmquant.methods.grid import clip_ratios, dequantize, search_clip

TEXT = "tinystories-valid-excerpt.txt"


@pytest.fixture(scope="module")
def stories(stories_dir):
    """(tokenizer, calibration set from the first part of the text, held-aside tokens [4, 128])."""
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    path = stories_dir.parent / TEXT
    ids = torch.tensor(tokenizer(path.read_text(), add_special_tokens=False)["input_ids"])
    held = ids[-4 * 128 :].view(4, 128)
    calibration = llmquant.CalibrationSet(
        tokens=sample_windows(ids[: -4 * 128], 16, 128, 0, str(path)), source=str(path), seed=0, tokens_available=0
    )
    return tokenizer, calibration, held


def linear_inputs(model, tokens):
    """{linear name: its input rows [n, K] float64} of the float model on tokens."""
    inputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, name=name: inputs.__setitem__(name, a[0].reshape(-1, a[0].shape[-1]).double())
                )
            )
    with torch.no_grad():
        model(input_ids=tokens)
    for h in handles:
        h.remove()
    return inputs


@pytest.mark.parametrize("method", ["gptq", "clip"])
@pytest.mark.parametrize("bits,group_size,sym", [(4, 64, False), (3, 32, True)])
def test_every_linear_beats_rtn_on_held_aside_tokens(stories_dir, stories, method, bits, group_size, sym):
    _, calibration, held = stories
    float_model = AutoModelForCausalLM.from_pretrained(stories_dir)
    inputs = linear_inputs(float_model, held)
    weights = {n: m.weight.detach().double() for n, m in float_model.named_modules() if n in inputs}
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    config = QuantConfig(bits=bits, group_size=group_size, sym=sym, method=method)
    llmquant.quantize_(model, config, calibration=calibration, progress=False)
    assert len(weights) == 35
    for name, w in weights.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear)
        rtn = quantize_rtn(w.float(), bits, group_size, sym, name=name)
        w_rtn = dequantize(rtn, bits, group_size).double()
        x = inputs[name]
        err = (x @ (module.dequantize(torch.float32).double() - w).t()).pow(2).sum()
        err_rtn = (x @ (w_rtn - w).t()).pow(2).sum()
        assert err <= err_rtn, f"{name}: {method} output error {err:.4g} > RTN {err_rtn:.4g}"


def reference_gptq(w, h, bits, group_size, percdamp=0.01):
    """The GPTQ algorithm as written in the paper, float64, column by column: quantize column j,
    spread its error over the later columns with the inverse Hessian, then eliminate j from the
    inverse (H^-1 <- H^-1 - H^-1[:, j] H^-1[j, :] / H^-1[j, j]). Group parameters (asymmetric,
    round to nearest) come from the updated weights at each group's first column."""
    w = w.clone()
    k = w.shape[1]
    h = h + percdamp * h.diagonal().mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    max_code = 2**bits - 1
    codes = torch.zeros_like(w)
    for j in range(k):
        if j % group_size == 0:
            group = w[:, j : j + group_size]
            lo = group.min(1).values.clamp(max=0)
            hi = group.max(1).values.clamp(min=0)
            scale = (hi - lo) / max_code
            zero = torch.round(-lo / scale)
        codes[:, j] = torch.clamp(torch.round(w[:, j] / scale) + zero, 0, max_code)
        err = (w[:, j] - (codes[:, j] - zero) * scale) / hinv[j, j]
        w[:, j + 1 :] -= err[:, None] * hinv[j, j + 1 :][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return codes


def test_gptq_update_matches_float64_reference():
    torch.manual_seed(0)
    k, n = 96, 40
    x = torch.randn(512, k, dtype=torch.float64) @ torch.randn(k, k, dtype=torch.float64)  # correlated inputs
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(n, k, dtype=torch.float64)
    ours = gptq.quantize(w, h, 4, 32, False, torch.float64, clip=False, act_order=False)
    expected = reference_gptq(w, h, 4, 32)
    assert torch.equal(ours.codes.double(), expected)
    # and the feedback matters: plain rounding gives other codes
    assert not torch.equal(quantize_rtn(w, 4, 32, False).codes, ours.codes)


def test_gptaq_target_is_the_ridge_least_squares_fit_of_the_float_outputs():
    torch.manual_seed(6)
    n, k, rows = 300, 48, 20
    x_float = torch.randn(n, k, dtype=torch.float64) @ torch.randn(k, k, dtype=torch.float64)
    x_quant = x_float + 0.3 * torch.randn(n, k, dtype=torch.float64)  # the error earlier layers left
    x_quant[:, 7] = 0  # an input that is always zero in the quantized model
    w = torch.randn(rows, k, dtype=torch.float64)
    h = 2 * x_quant.t() @ x_quant / n
    target = gptaq.float_target(w.float(), gptaq.target_factor(x_float.float(), x_quant.float(), h.float()))
    # argmin_V ||X_q Vᵀ - X_fp Wᵀ||² 2/n + λ||V - W||², λ = DAMP · mean diag(H), as one stacked lstsq
    lam = gptaq.DAMP * h.diagonal().mean()
    a = torch.cat((x_quant * (2 / n) ** 0.5, lam.sqrt() * torch.eye(k, dtype=torch.float64)))
    b = torch.cat(((x_float @ w.t()) * (2 / n) ** 0.5, lam.sqrt() * w.t()))
    expected = torch.linalg.lstsq(a, b).solution.t()
    expected[:, 7] = w[:, 7]  # the dead input keeps its weight (unit diagonal, no cross term)
    torch.testing.assert_close(target.double(), expected, rtol=1e-3, atol=1e-3 * w.abs().max().item())
    # and with the float inputs themselves there is nothing to correct
    same = gptaq.target_factor(x_float.float(), x_float.float(), (2 * x_float.t() @ x_float / n).float())
    torch.testing.assert_close(gptaq.float_target(w.float(), same), w.float())


def test_gptaq_brings_the_quantized_model_closer_to_float_than_gptq(stories_dir, stories):
    _, calibration, held = stories
    float_model = AutoModelForCausalLM.from_pretrained(stories_dir)
    with torch.no_grad():
        reference = torch.log_softmax(float_model(input_ids=held).logits.double(), -1)
    kl = {}
    for method in ("gptq", "gptaq"):
        model = AutoModelForCausalLM.from_pretrained(stories_dir)
        llmquant.quantize_(model, QuantConfig(bits=3, group_size=32, method=method), calibration=calibration)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=held).logits.double(), -1)
        kl[method] = (reference.exp() * (reference - logp)).sum(-1).mean().item()
    assert kl["gptaq"] < 0.9 * kl["gptq"], kl


def test_rotated_model_keeps_the_float_function(stories_dir, stories):
    """At 8 bits, where rounding costs almost nothing, gptq-rot's logits are as close to float as
    gptq's: folding the norms and rotating embedding, blocks, heads and head keep the function."""
    _, calibration, held = stories
    float_model = AutoModelForCausalLM.from_pretrained(stories_dir)
    with torch.no_grad():
        reference = float_model(input_ids=held).logits
    error = {}
    for method in ("gptq", "gptq-rot"):
        model = AutoModelForCausalLM.from_pretrained(stories_dir)
        llmquant.quantize_(model, QuantConfig(bits=8, group_size=32, method=method), calibration=calibration)
        with torch.no_grad():
            error[method] = ((model(input_ids=held).logits - reference).norm() / reference.norm()).item()
    assert error["gptq-rot"] < 1.5 * error["gptq"] and error["gptq-rot"] < 0.01, error
    q = rotation.random_orthogonal(64)
    torch.testing.assert_close(q @ q.t(), torch.eye(64, dtype=torch.float64))
    assert torch.equal(q, rotation.random_orthogonal(64)) and not torch.equal(q, rotation.random_orthogonal(64, 1))


def plain_clip_errors(w, h, bits, sym, scale_dtype):
    """err[r, n] of the clipping search written out once per ratio with the formulas of
    docs/FORMAT.md (no buffers, no in-place ops), in w's dtype."""
    errors = []
    for r in clip_ratios(bits, sym).tolist():
        scale, zero = group_params(w, bits, sym, scale_dtype, r)
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
        d = w - (q - zero[:, None]) * scale[:, None]
        errors.append((d * d).sum(1) if h is None else ((d @ h) * d).sum(1))
    return torch.stack(errors)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("with_hessian", [False, True])
def test_clip_search_picks_the_first_minimum_of_the_plain_objective(sym, with_hessian):
    torch.manual_seed(1)
    n, g = 300, 64
    w = torch.randn(n, g) * torch.rand(n, 1)
    w[0] = 0  # an all-zero row
    w[1] = w[1].abs()  # all positive
    w[2, 5] = 20.0  # an outlier: clipping pays
    x = torch.randn(256, g) @ torch.randn(g, g)
    h = 2 * x.t() @ x / x.shape[0] if with_hessian else None
    ratios = clip_ratios(4, sym)
    chosen = search_clip(w, h, 4, sym, torch.float16)
    errors = plain_clip_errors(w, h, 4, sym, torch.float16)
    # the same float32 arithmetic: exactly the first minimum (r = 1 wins ties)
    assert torch.equal(chosen, ratios[errors.argmin(0)])
    assert (chosen == 1).any() and (chosen < 1).any()
    # and in float64 the chosen ratio is as good as the best one, never worse than r = 1
    exact = plain_clip_errors(w.double(), None if h is None else h.double(), 4, sym, torch.float16)
    picked = exact.gather(0, errors.argmin(0)[None])[0]
    assert torch.all(picked <= exact.min(0).values * (1 + 1e-4) + 1e-12)
    assert torch.all(picked <= exact[0] * (1 + 1e-4) + 1e-12)


def test_input_hessian_is_symmetric_and_matches_float64():
    torch.manual_seed(2)
    x = torch.randn(1000, 2 * HESSIAN_PANEL + 17) * torch.rand(2 * HESSIAN_PANEL + 17)  # a ragged last panel
    h = input_hessian(x)
    expected = 2 * x.double().t() @ x.double() / x.shape[0]
    assert h.dtype == torch.float32 and torch.equal(h, h.t())
    torch.testing.assert_close(h.double(), expected, rtol=1e-5, atol=1e-5)


def test_gptq_reuses_a_shared_hessian_only_while_it_is_unchanged():
    torch.manual_seed(3)
    x = torch.randn(400, 96) @ torch.randn(96, 96)
    h = 2 * x.t() @ x / x.shape[0]
    w1, w2 = torch.randn(24, 96), torch.randn(40, 96)
    gptq.quantize(w1, h, 4, 32, False, torch.float32)  # q_proj: factorises h
    shared = gptq.quantize(w2, h, 4, 32, False, torch.float32)  # k_proj: same tensor, reused
    assert torch.equal(shared.codes, gptq.quantize(w2, h.clone(), 4, 32, False, torch.float32).codes)
    h.add_(torch.diag(torch.rand(96) * h.diagonal()))  # changed in place: must not reuse
    changed = gptq.quantize(w2, h, 4, 32, False, torch.float32)
    assert torch.equal(changed.codes, gptq.quantize(w2, h.clone(), 4, 32, False, torch.float32).codes)
    assert not torch.equal(changed.codes, shared.codes)
    singular = torch.ones(96, 96)
    for name in ("a.weight", "b.weight"):  # the warning names every layer sharing the Hessian
        with pytest.warns(UserWarning, match=rf"{name}: Hessian is numerically singular"):
            gptq.quantize(w1, singular, 4, 32, False, torch.float32, name=name, percdamp=0.0)


def test_singular_hessian_raises_dampening_with_a_warning_and_stays_finite():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    h = torch.ones(64, 64)  # rank 1: Cholesky fails without dampening
    with pytest.warns(UserWarning, match="numerically singular"):
        q = gptq.quantize(w, h, 4, 32, False, torch.float32, percdamp=0.0, name="layer.weight")
    assert torch.isfinite(q.scales).all() and torch.isfinite(dequantize(q, 4, 32)).all()


def test_saved_gptq_model_loads_with_the_same_logits(stories_dir, stories, tmp_path):
    _, calibration, held = stories
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    llmquant.quantize_(model, QuantConfig(bits=4, group_size=32, method="gptq"), calibration=calibration)
    record = model.config.quantization_config.calibration
    assert record["tokens"] == 16 * 128 and record["dataset"].endswith(TEXT)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.quantization_config.method == "gptq"
    with torch.no_grad():
        assert torch.equal(model(input_ids=held).logits, again(input_ids=held).logits)


def test_calibration_is_deterministic_and_checks_its_size(stories_dir):
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    path = stories_dir.parent / TEXT
    a = load_calibration(tokenizer, path, nsamples=8, seqlen=64, seed=1)
    b = load_calibration(tokenizer, path, nsamples=8, seqlen=64, seed=1)
    c = load_calibration(tokenizer, path, nsamples=8, seqlen=64, seed=2)
    assert a.tokens.shape == (8, 64) and torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    with pytest.raises(CalibrationError, match="fewer than nsamples x calib-seqlen"):
        load_calibration(tokenizer, path, nsamples=1000, seqlen=512)
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(tokenizer, path.with_name("missing.txt"))


def test_default_calibration_is_c4_from_the_hub_and_offline_names_the_local_file_flag(stories_dir, tmp_path, capsys):
    """The default is a Hub dataset, never a file beside the checkout; offline (conftest sets
    HF_HUB_OFFLINE) it is one line saying how to pass a local file, before anything is written."""
    from llmquant.calibration.data import DEFAULT_CALIBRATION, KNOWN_CALIBRATION, describe_source
    from llmquant.cli import main

    assert DEFAULT_CALIBRATION == "c4" and KNOWN_CALIBRATION["c4"].path == "allenai/c4"
    assert describe_source("c4") == "allenai/c4 en/c4-validation.00000-of-00008.json.gz train[:2000]"
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    for source in (None, "c4", "someone/some-dataset"):
        offline = r"not reachable \(HF_HUB_OFFLINE.*\); pass a local file instead: --calib PATH"
        with pytest.raises(CalibrationError, match=offline):
            load_calibration(tokenizer, source)
    with pytest.raises(CalibrationError, match="calibration file not found"):  # a path is never taken for a Hub id
        load_calibration(tokenizer, "./no/such/c4")
    out = tmp_path / "default"
    assert main(["quantize", str(stories_dir), "-o", str(out), "--method", "gptq", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'c4' comes from the Hugging Face Hub" in err and "--calib PATH" in err
    assert not out.exists()


def test_method_names_and_errors(stories_dir):
    choices = r"method must be one of \['rtn', 'clip', 'gptq', 'gptq-noclip', 'awq', 'gptq-awq', 'gptaq', 'gptq-rot'\]"
    with pytest.raises(ValueError, match=choices):
        QuantConfig(method="awq2")
    assert not get_method("rtn").calibrated and all(METHODS[m].calibrated for m in ("clip", "gptq"))
    config = QuantConfig.from_short_name("int4-g128-sym-gptq")
    assert (config.bits, config.group_size, config.sym, config.method) == (4, 128, True, "gptq")
    assert config.short_name() == "int4-g128-sym-gptq" and QuantConfig.from_short_name("int8-gall").method == "rtn"
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    with pytest.raises(ValueError, match="calibration"):
        llmquant.quantize_(model, QuantConfig(method="gptq"))
    with pytest.raises(ValueError, match="quantize_"):
        AutoModelForCausalLM.from_pretrained(stories_dir, quantization_config=QuantConfig(method="gptq"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rtn through quantize_ stays calibration-free
        llmquant.quantize_(model, QuantConfig(bits=4, group_size=32), progress=False)


@pytest.mark.parametrize("method", ["gptq", "gptq-awq"])
def test_cli_checkpoint_equals_quantize_(stories_dir, tmp_path, capsys, method):
    from llmquant.cli import main

    text = stories_dir.parent / TEXT
    out = tmp_path / "q"
    flags = ["--calib", str(text), "--nsamples", "8", "--calib-seqlen", "64", "--seed", "3"]
    args = ["quantize", str(stories_dir), "-o", str(out), "--group-size", "32", "--method", method, "--quiet"]
    assert main([*args, *flags]) == 0
    saved = AutoModelForCausalLM.from_pretrained(out)
    config = saved.config.quantization_config
    assert config.method == method and config.calibration["tokens"] == 8 * 64
    assert method in (out / "README.md").read_text() and "512 tokens" in (out / "README.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    calibration = load_calibration(tokenizer, text, nsamples=8, seqlen=64, seed=3)
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    llmquant.quantize_(model, QuantConfig(bits=4, group_size=32, method=method), calibration=calibration)
    ids = torch.arange(3, 67).view(1, 64)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, saved(input_ids=ids).logits)
    # too few calibration tokens: one line, exit 2, nothing written
    capsys.readouterr()
    bad = ["quantize", str(stories_dir), "-o", str(tmp_path / "bad"), "--method", "gptq", "--calib", str(text)]
    assert main([*bad, "--nsamples", "1000", "--calib-seqlen", "512"]) == 2
    err = capsys.readouterr().err.strip()
    assert "fewer than nsamples x calib-seqlen" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_awq_folds_scales_into_norms_and_linears_without_skipping(stories_dir, stories):
    _, calibration, held = stories
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every linear of a Llama block has a place to fold its scales
        llmquant.quantize_(model, QuantConfig(bits=4, group_size=32, method="awq"), calibration=calibration)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)  # scales folded
    float_model = AutoModelForCausalLM.from_pretrained(stories_dir)
    with torch.no_grad():
        loss = model(input_ids=held, labels=held).loss
        assert loss < float_model(input_ids=held, labels=held).loss + 0.2  # still the same function, roughly


def test_cli_help_names_every_registered_method():
    # the CLI spells the names out so that --help needs no torch; they must not drift apart
    from llmquant.cli import METHOD_NAMES

    assert tuple(METHOD_NAMES) == tuple(METHODS)
