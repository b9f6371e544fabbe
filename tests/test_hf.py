"""transformers integration on the real stories260k model: load, save, reload, generate."""

import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmquant
from llmquant import QuantConfig, QuantLinear


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(0)
    return torch.randint(3, 512, (2, 48))


def quantized(path, **config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QuantConfig(**config))


def test_quantize_on_load_replaces_linears_but_not_head_or_embeddings(stories_dir):
    model = quantized(stories_dir, bits=4, group_size=32)
    linears = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(linears) == 35 and "lm_head" not in linears
    assert isinstance(model.lm_head, torch.nn.Linear) and isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert model.config.quantization_config.modules_to_not_convert == ["lm_head"]


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (8, 128, True), (3, 64, False), (4, -1, True)])
def test_save_then_load_is_bit_identical(stories_dir, tmp_path, tokens, bits, group_size, sym):
    model = quantized(stories_dir, bits=bits, group_size=group_size, sym=sym)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.quantization_config == model.config.quantization_config
    state, state_again = model.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys()
    for key in state:
        assert torch.equal(state[key], state_again[key]), key
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, again(tokens).logits)


def test_quantized_logits_stay_close_to_float(stories_dir, tokens):
    base = AutoModelForCausalLM.from_pretrained(stories_dir)
    with torch.no_grad():
        reference = base(tokens).logits
        errors = {}
        for bits in (8, 4):
            logits = quantized(stories_dir, bits=bits, group_size=32)(tokens).logits
            errors[bits] = ((logits - reference).norm() / reference.norm()).item()
    assert errors[8] < 0.01 and errors[4] < 0.15 and errors[8] * 10 < errors[4], errors


def test_generate_and_dtypes(stories_dir, tmp_path):
    quantized(stories_dir, bits=4, group_size=64).save_pretrained(tmp_path)
    bos = torch.tensor([[1]])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        assert model.model.layers[0].self_attn.q_proj.scales.dtype == dtype
        out = model.generate(bos, max_new_tokens=12, do_sample=False)
        assert out.shape == (1, 13)
    text_fp32 = AutoModelForCausalLM.from_pretrained(tmp_path).generate(bos, max_new_tokens=12, do_sample=False)
    text_base = AutoModelForCausalLM.from_pretrained(stories_dir).generate(bos, max_new_tokens=12, do_sample=False)
    assert (text_fp32 == text_base).float().mean() > 0.5  # int4 g64 keeps most of the greedy story


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map(stories_dir, tmp_path, tokens, device_map):
    quantized(stories_dir, bits=8, group_size=32).save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map)
    with torch.no_grad():
        assert torch.equal(plain(tokens).logits, mapped(tokens).logits)


def test_import_twice_is_safe(stories_dir):
    importlib.reload(llmquant)
    llmquant.hf.register()
    assert isinstance(quantized(stories_dir, bits=8, group_size=64).model.layers[0].mlp.up_proj, QuantLinear)


def test_quantize_in_place_matches_quantize_on_load(stories_dir, tokens):
    config = dict(bits=4, group_size=64, sym=False)
    loaded = quantized(stories_dir, **config)
    in_place = llmquant.quantize_(AutoModelForCausalLM.from_pretrained(stories_dir), QuantConfig(**config))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, in_place(tokens).logits)


@pytest.mark.parametrize(
    "field,value",
    [
        ("bits", 5),
        ("bits", True),
        ("group_size", 100),
        ("group_size", 0),
        ("sym", "yes"),
        ("method", "gptq2"),
        ("modules_to_not_convert", "lm_head"),
        ("format_version", 9),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**{field: value})


def test_callers_config_is_not_modified(stories_dir):
    config = QuantConfig(bits=4, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(stories_dir, quantization_config=config)
    assert config.modules_to_not_convert is None
    assert model.config.quantization_config.modules_to_not_convert == ["lm_head"]


def test_dequantize_gives_plain_linears_with_the_same_logits(stories_dir, tokens):
    model = quantized(stories_dir, bits=4, group_size=32)
    with torch.no_grad():
        expected = model(tokens).logits
        plain = model.dequantize()
        assert not any(isinstance(m, QuantLinear) for m in plain.modules())
        assert not hasattr(plain.config, "quantization_config")
        assert torch.allclose(plain(tokens).logits, expected, rtol=1e-5, atol=1e-5)
