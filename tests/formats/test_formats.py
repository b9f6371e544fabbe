"""Exports to GPTQ and compressed-tensors, checked by readers that are not llmquant: the
`compressed-tensors` package (its own decompressor, and transformers' loader built on it) and an
independent GPTQ reader (tests/gptq_reader.py); round trips through the formats are bit-exact."""

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import llmquant
from llmquant import QuantConfig, QuantLinear
from llmquant.cli import main
from llmquant.errors import FormatError
from llmquant.formats import compressed_tensors, gptq
from llmquant.methods.codes import quantize_weight
from tests.gptq_reader import dequantize_gptq

CASES = [
    (4, 64, False, torch.float16),
    (4, 128, True, torch.bfloat16),
    (8, 32, False, torch.float32),
    (8, -1, True, torch.float16),
    (4, -1, False, torch.bfloat16),
]


def _layer(bits, group, sym, dtype, n=96, k=256):
    torch.manual_seed(bits * 1000 + group)
    weight = torch.randn(n, k, dtype=dtype)
    packed = quantize_weight(weight, bits, group, sym)
    linear = QuantLinear(k, n, bits, group, sym, bias=False, dtype=dtype)
    linear.load_packed(packed)
    return packed, linear.dequantize()


def _ct_scheme(config):
    qc = {k: v for k, v in compressed_tensors.quantization_config(config).items() if k != "quant_method"}
    return QuantizationConfig.model_validate(qc).config_groups["group_0"]


@pytest.mark.parametrize("bits,group,sym,dtype", CASES)
def test_compressed_tensors_package_decompresses_to_llmquant_weights(bits, group, sym, dtype):
    config = QuantConfig(bits=bits, group_size=group, sym=sym)
    packed, dense = _layer(bits, group, sym, dtype)
    tensors = compressed_tensors.export_layer("l", packed, 96, 256, config)
    out = PackedQuantizationCompressor.decompress(dict(tensors), _ct_scheme(config))
    assert out["weight"].dtype == dtype and torch.equal(out["weight"], dense)


@pytest.mark.parametrize("bits,group,sym,dtype", CASES)
def test_independent_gptq_reader_gets_llmquant_weights(bits, group, sym, dtype):
    config = QuantConfig(bits=bits, group_size=group, sym=sym)
    packed, dense = _layer(bits, group, sym, dtype)
    tensors = gptq.export_layer("l", packed, 96, 256, config)
    assert tensors["qzeros"].shape == (packed["scales"].shape[0], 96 * bits // 32)
    assert torch.equal(dequantize_gptq(tensors, bits, gptq.checkpoint_format(config)).to(dtype), dense)


@pytest.mark.parametrize("bits,group,sym,dtype", CASES)
def test_layer_round_trips_are_bit_exact(bits, group, sym, dtype):
    config = QuantConfig(bits=bits, group_size=group, sym=sym)
    packed, _ = _layer(bits, group, sym, dtype)
    for fmt in (gptq, compressed_tensors):
        tensors = fmt.export_layer("l", packed, 96, 256, config)
        specs = fmt.layer_specs("l", 96, 256, dtype, config)
        assert [(s.name, s.dtype, s.shape) for s in specs] == [
            (f"l.{k}", v.dtype, tuple(v.shape)) for k, v in tensors.items()
        ]
        back = fmt.import_layer("l", tensors, 96, 256, config, {"checkpoint_format": gptq.checkpoint_format(config)})
        assert back.keys() == packed.keys()
        assert all(torch.equal(back[k], packed[k]) for k in packed)


def test_not_expressible_layers_are_refused_with_the_layer_name():
    with pytest.raises(FormatError, match="layers.3.mlp: 3-bit"):
        gptq.check_layer("layers.3.mlp", 64, 256, QuantConfig(bits=3, group_size=64))
    with pytest.raises(FormatError, match="down: group size 128 does not divide in_features 576"):
        compressed_tensors.check_layer("down", 64, 576, QuantConfig(bits=4, group_size=128))
    packed = {
        "qweight": torch.zeros(32, 8, dtype=torch.int32),
        "scales": torch.ones(1, 8, dtype=torch.float16),
        "qzeros": torch.zeros(1, 8, dtype=torch.uint8),
    }
    # a zero point of 0 (an all-non-negative group) has no v1 form (zero - 1); asymmetric exports are v2
    config = QuantConfig(bits=4, group_size=-1)
    tensors = gptq.export_layer("q", packed, 8, 256, config)
    assert gptq.quantization_config(config)["checkpoint_format"] == "gptq_v2"
    back = gptq.import_layer("q", tensors, 8, 256, config, {"checkpoint_format": "gptq_v2"})
    assert torch.equal(back["qzeros"], packed["qzeros"])


@pytest.fixture(scope="module")
def exports(stories_dir, tmp_path_factory):
    """stories260k at int8 per-row symmetric (its 172-wide MLP admits no other group size in
    either format), in the three formats."""
    root = tmp_path_factory.mktemp("exports")
    for fmt in ("llmquant", "gptq", "compressed-tensors"):
        args = [str(stories_dir), "-o", str(root / fmt), "--bits", "8", "--group-size", "-1", "--sym"]
        assert main(["quantize", *args, "--format", fmt, "--quiet"]) == 0
    return root


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(0)
    return torch.randint(3, 512, (2, 40))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_transformers_compressed_tensors_loader_matches_llmquant(exports, tokens):
    ours = AutoModelForCausalLM.from_pretrained(exports / "llmquant", dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(exports / "compressed-tensors", dtype=torch.float32)
    torch.testing.assert_close(_logits(theirs, tokens), _logits(ours, tokens), rtol=0, atol=0)
    for name, module in ours.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(theirs.get_submodule(name).weight, module.dequantize(torch.float32)), name


def test_gptq_export_read_by_independent_reader_gives_llmquant_logits(exports, stories_dir, tokens):
    config = json.loads((exports / "gptq" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["checkpoint_format"] == "gptq" and not config["desc_act"]
    state = load_file(exports / "gptq" / "model.safetensors")
    dense = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    layers = {name.rsplit(".", 1)[0] for name in state if name.endswith(".qweight")}
    assert len(layers) == 35
    with torch.no_grad():
        for layer in layers:
            tensors = {k: state[f"{layer}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            dense.get_submodule(layer).weight.copy_(dequantize_gptq(tensors, config["bits"]))
    ours = AutoModelForCausalLM.from_pretrained(exports / "llmquant", dtype=torch.float32)
    torch.testing.assert_close(_logits(dense, tokens), _logits(ours, tokens), rtol=1e-5, atol=1e-5)


def test_convert_round_trip_is_bit_exact_and_load_runs_llmquant_kernels(exports, tmp_path, tokens):
    assert main(["convert", str(exports / "gptq"), "-o", str(tmp_path / "ct"), "--format", "compressed-tensors",
                 "--quiet"]) == 0
    assert main(["convert", str(tmp_path / "ct"), "-o", str(tmp_path / "back"), "--quiet"]) == 0
    for a, b in ((exports / "compressed-tensors", tmp_path / "ct"), (exports / "llmquant", tmp_path / "back")):
        left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
        qc = [json.loads((p / "config.json").read_text())["quantization_config"] for p in (a, b)]
        assert qc[0] == qc[1]
    reference = _logits(AutoModelForCausalLM.from_pretrained(exports / "llmquant", dtype=torch.float32), tokens)
    for fmt in ("gptq", "compressed-tensors"):
        model = llmquant.load(exports / fmt, dtype=torch.float32)
        assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
        assert torch.equal(_logits(model, tokens), reference)


def test_cli_refuses_unexpressible_before_writing(stories_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["quantize", str(stories_dir), "-o", str(out), "--group-size", "32", "--format", "gptq", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and not list(tmp_path.iterdir())
    assert "mlp.down_proj: group size 32 does not divide in_features 172" in err and len(err.splitlines()) == 1


def test_eval_loads_foreign_folders(exports):
    from llmquant.evals.cli import load_model

    model = load_model(str(exports / "gptq"), torch.float32, torch.device("cpu"))
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 35


def test_tied_head_stays_float_whatever_skip_lists(stories_dir, tmp_path, tokens):
    """stories260k's head is tied to the embedding: a --skip list without lm_head must not make
    the config call it quantized (it has no tensors of its own)."""
    for fmt in ("llmquant", "gptq", "compressed-tensors"):
        out = tmp_path / fmt
        args = ["quantize", str(stories_dir), "-o", str(out), "--bits", "8", "--group-size", "-1", "--sym",
                "--skip", "down_proj", "--format", fmt, "--quiet"]
        assert main(args) == 0
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        if fmt == "llmquant":
            assert "lm_head" in qc["modules_to_not_convert"]
        elif fmt == "compressed-tensors":
            assert "lm_head" in qc["ignore"] and "model.layers.4.mlp.down_proj" in qc["ignore"]
        else:
            assert qc["lm_head"] is False
        model = llmquant.load(out, dtype=torch.float32)
        assert not isinstance(model.lm_head, QuantLinear) and not isinstance(model.model.layers[0].mlp.down_proj,
                                                                              QuantLinear)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


def test_gptq_skip_is_written_as_the_readers_match_it_and_read_back(tmp_path, tokens):
    from tests.tiny_llama import build_tiny_llama

    src = build_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "gptq"
    assert main(["quantize", str(src), "-o", str(out), "--bits", "4", "--group-size", "64", "--format", "gptq",
                 "--skip", "down_proj", "lm_head", "--quiet"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == qc["format"] == "gptq_v2" and qc["sym"] is False
    assert qc["dynamic"] == {f"-:^model[.]layers[.]{i}[.]mlp[.]down_proj$": {} for i in (0, 1)}
    import re

    assert re.match(next(iter(qc["dynamic"]))[2:], "model.layers.0.mlp.down_proj")  # GPTQModel/vLLM match full names
    assert qc["modules_in_block_to_quantize"] == [[
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"
    ]]
    model = llmquant.load(out, dtype=torch.float32)  # reads `dynamic`
    assert not isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert isinstance(model.model.layers[1].mlp.up_proj, QuantLinear)
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, reference.model.layers[1].mlp.down_proj.weight)


@pytest.mark.parametrize("skip,needle", [
    (["down_proj"], "lm_head: a quantized output head"),
    (["lm_head", "model.layers.0.mlp.down_proj"], "model.layers.0.mlp.down_proj: kept in float while mlp.down_proj"),
])
def test_gptq_refuses_skips_transformers_would_load_wrong(tmp_path, capsys, skip, needle):
    from tests.tiny_llama import build_tiny_llama

    src = build_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "o"
    capsys.readouterr()
    code = main(["quantize", str(src), "-o", str(out), "--format", "gptq", "--skip", *skip, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and needle in err and len(err.splitlines()) == 1, err


def test_cards_print_vllm_serve_only_for_a_kernel_path(tmp_path):
    from tests.tiny_llama import build_tiny_llama

    src = build_tiny_llama(tmp_path / "tiny")
    cards = {}
    for name, fmt, args in [
        ("gptq-sym", "gptq", ["--sym", "--group-size", "128"]),
        ("gptq-asym", "gptq", ["--group-size", "128"]),
        ("ct-asym", "compressed-tensors", ["--group-size", "64"]),
        ("ct-w8-asym", "compressed-tensors", ["--bits", "8", "--group-size", "128"]),
    ]:
        assert main(["quantize", str(src), "-o", str(tmp_path / name), "--format", fmt, "--skip", "lm_head",
                     "--quiet", *args]) == 0
        cards[name] = (tmp_path / name / "README.md").read_text()
    assert "vllm serve" in cards["gptq-sym"] and "Machete on Hopper" in cards["gptq-sym"]
    assert "vllm serve" not in cards["gptq-asym"] and "symmetric-only" in cards["gptq-asym"]
    for card in (cards["gptq-sym"], cards["gptq-asym"]):
        assert "pip install optimum gptqmodel" in card
    assert "vllm serve" in cards["ct-asym"] and "transformers: not loadable" in cards["ct-asym"]
    assert "Hopper only" in cards["ct-w8-asym"]
    from llmquant.formats.common import vllm_path

    assert vllm_path("gptq", QuantConfig(bits=4, group_size=256, sym=True)) is None
    assert vllm_path("compressed-tensors", QuantConfig(bits=8, group_size=32, sym=False)) is None


def test_converted_card_names_the_float_model_not_the_intermediate_folder(exports, tmp_path, stories_dir):
    out = tmp_path / "ct"
    assert main(["convert", str(exports / "gptq"), "-o", str(out), "--format", "compressed-tensors", "--quiet"]) == 0
    card = (out / "README.md").read_text()
    assert f"Weight-only quantization of `{stories_dir}`" in card
    assert f"from `{exports / 'gptq'}`" in card
