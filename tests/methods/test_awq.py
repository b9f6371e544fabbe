"""AWQ channel scaling: folding into norms and preceding linears keeps the float function, the
grouped-query-attention channel map, skipping and reverting, and the quality against gptq."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import repeat_kv

import llmquant
from llmquant import QuantConfig
from llmquant.calibration.capture import block_inputs, decoder_blocks
from llmquant.calibration.hessian import input_hessian
from llmquant.methods import awq
from llmquant.methods.blocks import output
from llmquant.nn.surgery import linear_layers

from .test_methods import stories  # noqa: F401  (module fixture: calibration + held-aside tokens)

FOLDED = ("self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def fold_every_block(model, config, tokens):
    """Run `awq.scale_block` on every block of the float model (no quantization); returns
    (changed tensors, skipped names per block, relative change of each block's float output)."""
    targets = dict(linear_layers(model, config))
    prefix, blocks = decoder_blocks(model)
    hidden, kwargs = block_inputs(model, blocks[0], tokens)
    changed, skipped, drift = {}, [], []
    for index, block in enumerate(blocks):
        names = {m: n for n, m in block.named_modules() if f"{prefix}.{index}.{n}" in targets}
        reference = output(block(hidden, **kwargs))
        name = f"{prefix}.{index}"
        skipped.append(
            awq.scale_block(block, name, names, hidden, kwargs, config, targets, changed, reference, input_hessian)
        )
        hidden = output(block(hidden, **kwargs))
        drift.append(((hidden - reference).norm() / reference.norm()).item())
    return changed, skipped, drift


def test_kv_channel_map_follows_repeat_kv():
    torch.manual_seed(0)
    heads, kv_heads, head_dim, tokens = 9, 3, 4, 5
    v = torch.randn(1, kv_heads, tokens, head_dim)
    o_input = repeat_kv(v, heads // kv_heads).transpose(1, 2).reshape(tokens, heads * head_dim)
    v_rows = v.transpose(1, 2).reshape(tokens, kv_heads * head_dim)
    index = awq.kv_channel_map(heads * head_dim, kv_heads * head_dim, head_dim)
    assert torch.equal(o_input, v_rows[:, index])
    assert torch.equal(awq.kv_channel_map(8, 8, None), torch.arange(8))
    assert awq.kv_channel_map(36, 10, 4) is None and awq.kv_channel_map(36, 12, None) is None


@pytest.mark.parametrize("model_name", ["stories260k", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_folding_leaves_the_float_model_unchanged(request, model_name):
    path = request.getfixturevalue("stories_dir" if model_name == "stories260k" else "smollm2_dir")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    attention = model.model.layers[0].self_attn
    assert attention.o_proj.in_features > attention.v_proj.out_features  # grouped-query attention
    torch.manual_seed(0)
    tokens = torch.randint(3, 500, (4, 64))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = QuantConfig(bits=3, group_size=32, method="gptq-awq")
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
        changed, skipped, drift = fold_every_block(model, config, tokens)
        folded = model(input_ids=tokens).logits
    assert skipped == [[]] * len(skipped)
    assert max(drift) < 1e-5
    assert ((folded - logits).norm() / logits.norm()).item() < 1e-5
    for name in FOLDED:  # scales really were folded into both sides of each pair
        assert any(not torch.equal(before[f"model.layers.{i}.{name}.weight"], model.get_submodule(
            f"model.layers.{i}.{name}").weight) for i in range(len(skipped)))
    # the writer gets the folded norms; quantized weights travel packed, not in `changed`
    assert any(not torch.equal(changed[n], before[n]) for n in changed)
    assert all(n.endswith("layernorm.weight") for n in changed) and len(changed) == 2 * len(skipped)


def test_a_fold_that_changes_the_function_is_reverted_with_a_warning(stories_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # a wrong head layout: tiling kv heads instead of repeating each one
    monkeypatch.setattr(awq, "kv_channel_map", lambda o_in, v_out, head_dim: torch.arange(o_in) % v_out)
    config = QuantConfig(bits=3, group_size=32, method="gptq-awq")
    misfold = r"model\.layers\.\d: channel scaling changed the float"
    with torch.no_grad(), pytest.warns(UserWarning, match=misfold) as caught:
        changed, skipped, _ = fold_every_block(model, config, torch.randint(3, 500, (2, 32)))
    assert len(caught) == len(skipped) == 5 and "self_attn.o_proj" in skipped[0] and not changed
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_unfoldable_linears_are_named_in_a_warning(stories_dir, stories, monkeypatch):  # noqa: F811
    _, calibration, _ = stories
    monkeypatch.setattr(awq, "kv_channel_map", lambda o_in, v_out, head_dim: None)
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    v_before = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"no channel scaling for self_attn\.o_proj \[v_proj has 32 output rows, "
                      r"o_proj 64 inputs\] \(5 of 5 blocks\)"):
        llmquant.quantize_(model, QuantConfig(bits=4, group_size=32, method="awq"), calibration=calibration,
                           progress=False)
    v_after = model.model.layers[0].self_attn.v_proj.dequantize(torch.float32)
    # v_proj's rows were not rescaled: its quantized rows stay close to the float ones
    assert ((v_after - v_before).norm() / v_before.norm()).item() < 0.2


def test_scale_search_never_loses_to_no_scaling_on_its_objective(stories_dir, stories):  # noqa: F811
    """The searched scales lower the calibration output error of round to nearest, tr(D H D^T),
    for every foldable group of stories260k's first block (s = 1 is a candidate: never worse)."""
    from llmquant.methods.codes import quantize_rtn
    from llmquant.methods.grid import dequantize

    _, calibration, _ = stories
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    layer = model.model.layers[0]
    groups = {  # consumer -> linears sharing its input
        "q": [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
        "o": [layer.self_attn.o_proj],
        "gate": [layer.mlp.gate_proj, layer.mlp.up_proj],
        "down": [layer.mlp.down_proj],
    }
    inputs = {}
    handles = [
        g[0].register_forward_pre_hook(lambda m, a, key=key: inputs.__setitem__(key, a[0].reshape(-1, a[0].shape[-1])))
        for key, g in groups.items()
    ]
    with torch.no_grad():
        model(input_ids=calibration.tokens)
    for h in handles:
        h.remove()

    def error(weights, h, s):
        w = torch.cat([m.weight.detach() for m in weights])
        d = w - dequantize(quantize_rtn(w * s, 3, 32, False, scale_dtype=torch.float32), 3, 32) / s
        return ((d @ h) * d).sum().item()

    gains = []
    for key, weights in groups.items():
        x = inputs[key]
        h = 2 * x.t() @ x / x.shape[0]
        expand = None
        if key == "o":
            expand = awq.kv_channel_map(x.shape[1], layer.self_attn.v_proj.out_features, layer.self_attn.head_dim)
        absmean = x.abs().mean(0)
        if expand is not None:
            absmean = torch.zeros(int(expand.max()) + 1).index_add_(0, expand, absmean) / torch.bincount(expand)
        s = awq.search_scales([m.weight for m in weights], h, absmean, 3, 32, False, expand)
        full = s if expand is None else s[expand]
        gains.append(error(weights, h, full) / error(weights, h, torch.ones_like(full)))
    assert max(gains) <= 1.0 and min(gains) < 0.99, gains


def test_folding_scales_biases_and_reports_unquantized_producers(stories_dir):
    """v_proj with a bias (as in Qwen2) and an up_proj kept in float (modules_to_not_convert):
    the fold divides the bias too, and the writer is told about every tensor it changed."""
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    torch.manual_seed(0)
    for layer in model.model.layers:
        old = layer.self_attn.v_proj
        layer.self_attn.v_proj = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        layer.self_attn.v_proj.weight.data.copy_(old.weight)
    tokens = torch.randint(3, 500, (2, 32))
    config = QuantConfig(bits=3, group_size=32, method="gptq-awq", modules_to_not_convert=["up_proj"])
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
        changed, skipped, drift = fold_every_block(model, config, tokens)
        assert ((model(input_ids=tokens).logits - logits).norm() / logits.norm()).item() < 1e-5
    assert max(drift) < 1e-5 and all("mlp.down_proj" not in s for s in skipped)
    for i, layer in enumerate(model.model.layers):
        assert torch.equal(changed[f"model.layers.{i}.self_attn.v_proj.bias"], layer.self_attn.v_proj.bias)
        assert torch.equal(changed[f"model.layers.{i}.mlp.up_proj.weight"], layer.mlp.up_proj.weight)
        assert f"model.layers.{i}.self_attn.v_proj.weight" not in changed  # quantized: written packed
