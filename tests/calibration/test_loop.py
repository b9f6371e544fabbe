"""Block-by-block calibrated quantization: the CLI path streams blocks from disk and writes what
the in-memory path computes; a calibrated quantize_ that fails midway leaves the model as it was."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmquant
from llmquant import QuantConfig, QuantLinear
from llmquant.calibration import loop as sequential
from llmquant.calibration.data import load_calibration
from llmquant.checkpoint import calibrated as cc
from llmquant.checkpoint.source import TensorReader, weight_files
from llmquant.cli import main
from llmquant.errors import CheckpointError
from llmquant.methods.codes import pack
from llmquant.nn import families

TEXT = "tinystories-valid-excerpt.txt"
CALIB = {"nsamples": 8, "seqlen": 64, "seed": 3}


@pytest.fixture(scope="module")
def tokens(stories_dir):
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    return load_calibration(tokenizer, stories_dir.parent / TEXT, **CALIB).tokens


def checkpoint_tensors(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("method", ["gptq", "gptq-awq", "gptaq", "gptq-rot"])
def test_streamed_checkpoint_equals_the_in_memory_path(stories_dir, tokens, tmp_path, monkeypatch, method):
    """Every tensor `llmquant quantize --method` writes equals what quantize_blocks computes on the
    whole float32 model loaded in memory (the path the CLI took before streaming), and while it
    quantizes, at most one block of the skeleton holds weights and the embedding is freed."""
    seen, skeletons = [], []  # per block load: (blocks holding weights before it, embedding on meta)
    load, skeleton = cc.SourceBlocks.load, cc.skeleton

    def spy(self, index, block, device):
        blocks = sequential.decoder_blocks(skeletons[0])[1]
        held = [i for i, b in enumerate(blocks) if any(not p.is_meta for p in b.parameters())]
        seen.append((held, skeletons[0].model.embed_tokens.weight.is_meta))
        return load(self, index, block, device)

    def remember(src):
        skeletons.append(skeleton(src))
        return skeletons[-1]

    monkeypatch.setattr(cc.SourceBlocks, "load", spy)
    monkeypatch.setattr(cc, "skeleton", remember)
    out = tmp_path / "q"
    flags = ["--nsamples", "8", "--calib-seqlen", "64", "--seed", "3", "--calib", str(stories_dir.parent / TEXT)]
    args = ["quantize", str(stories_dir), "-o", str(out), "--group-size", "32", "--method", method, "--quiet"]
    assert main([*args, *flags]) == 0
    assert seen == [([], True)] * 5  # nothing but the block being quantized ever held weights

    config = QuantConfig(bits=4, group_size=32, method=method)
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    changed = {}
    results = sequential.quantize_blocks(
        model, config, tokens, progress=False, scale_dtype=torch.float32, changed=changed, keep=lambda q: pack(q, 4)
    )
    source = checkpoint_tensors(stories_dir)
    written = checkpoint_tensors(out)
    expected = {}
    for name, tensor in source.items():
        module = name.removesuffix(".weight")
        if module in results:
            expected.update({f"{module}.{key}": value for key, value in results[module].items()})
        else:
            expected[name] = changed.get(name, tensor)
    expected.update({name: value for name, value in changed.items() if name not in source})  # an untied head
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    assert bool(changed) == (method in ("gptq-awq", "gptq-rot"))
    assert (method == "gptq-rot") == ("lm_head.weight" in written)  # stories260k ties its head
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == (method != "gptq-rot")
    assert ("rotated by random orthogonal" in (out / "README.md").read_text()) == (method == "gptq-rot")


def test_tensor_reader_reads_by_name_and_names_a_missing_tensor(stories_dir):
    reader = TensorReader(weight_files(stories_dir))
    source = checkpoint_tensors(stories_dir)
    got = reader.read(["model.layers.2.mlp.up_proj.weight", "model.norm.weight"])
    assert all(torch.equal(got[name], source[name]) for name in got) and len(got) == 2
    with pytest.raises(CheckpointError, match="'model.layers.9.mlp.up_proj.weight'"):
        reader.read(["model.layers.9.mlp.up_proj.weight"])


def _fail_on(monkeypatch, layer: str, error: BaseException):
    """Make the method raise `error` when it reaches `layer` (after quantizing the layers before)."""
    real = sequential.resolve

    def patched(name):
        method = real(name)

        def quantize(weight, hessian, *args):
            if args[-1] == f"{layer}.weight":
                raise error
            return method.quantize(weight, hessian, *args)

        return dataclasses.replace(method, quantize=quantize)

    monkeypatch.setattr(sequential, "resolve", patched)


def _snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _assert_unchanged(model, before, types, training):
    assert {name: type(m) for name, m in model.named_modules()} == types
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, equal_nan=True, msg=name)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert model.training == training
    assert not hasattr(model.config, "quantization_config") or model.config.quantization_config is None


@pytest.mark.parametrize(
    ("method", "failure"),
    [
        ("gptq", "method error"),
        ("gptq-awq", "method error"),  # norms of blocks 0-3 were rescaled before block 4 failed
        ("gptq-rot", "method error"),  # blocks 0-3 rotated, the head untied in the results
        ("gptq", "interrupt"),
        ("gptq", "nan activations"),
    ],
)
def test_failed_calibrated_quantize_leaves_the_model_as_it_was(stories_dir, tokens, monkeypatch, method, failure):
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    model.train()  # the flag must come back too
    if failure == "nan activations":  # a norm is not checked up front: block 3's Hessians are NaN
        with torch.no_grad():
            model.model.layers[3].post_attention_layernorm.weight[0] = float("nan")
        expected = pytest.raises(ValueError, match="NaN/Inf")
    elif failure == "interrupt":
        _fail_on(monkeypatch, "model.layers.4.mlp.down_proj", KeyboardInterrupt())
        expected = pytest.raises(KeyboardInterrupt)
    else:
        _fail_on(monkeypatch, "model.layers.4.mlp.down_proj", ValueError("injected failure in block 4"))
        expected = pytest.raises(ValueError, match="injected failure")
    before, types = _snapshot(model), {name: type(m) for name, m in model.named_modules()}
    with expected:
        llmquant.quantize_(model, QuantConfig(bits=4, group_size=32, method=method), calibration=tokens, progress=False)
    _assert_unchanged(model, before, types, training=True)


def test_rotated_quantize_unties_the_head_and_reloads(stories_dir, tokens, tmp_path):
    """gptq-rot commits the rotated embedding, the unit norms and the head as its own tensor
    (stories260k ties it), and a saved folder loads with the same logits."""
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    config = QuantConfig(bits=4, group_size=32, method="gptq-rot")
    reference = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    changed = {}
    sequential.quantize_blocks(reference, config, tokens, progress=False, changed=changed)
    llmquant.quantize_(model, config, calibration=tokens, progress=False)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= changed.keys()
    assert all(torch.equal(model.get_parameter(name), value) for name, value in changed.items())
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert torch.equal(model.model.layers[2].input_layernorm.weight, torch.ones(64))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens[:2]).logits, again(input_ids=tokens[:2]).logits)


@pytest.mark.parametrize("family_check", [True, False], ids=["family-check", "safety-net"])
def test_rotation_refuses_a_norm_that_does_not_commute(stories_dir, tokens, monkeypatch, family_check):
    """A final LayerNorm (mean subtraction does not commute with a rotation): refused before any
    calibration work by the family check, naming the family, the reason and the module; without
    that check (a family it does not know) the commutation check still refuses it. The model is
    untouched either way."""
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    model.model.norm = torch.nn.LayerNorm(64)
    before, types = _snapshot(model), {name: type(m) for name, m in model.named_modules()}
    captured = []
    capture = sequential.blocks_inputs
    monkeypatch.setattr(sequential, "blocks_inputs", lambda *args: captured.append(1) or capture(*args))
    if family_check:
        expected = r"llama: --method gptq-rot cannot rotate this family: LayerNorm .* \(model.norm\)"
    else:
        monkeypatch.setattr(families, "rotation_refusal", lambda model: None)
        expected = "model.norm: rotation needs RMS norms"
    with pytest.raises(ValueError, match=expected):
        llmquant.quantize_(model, QuantConfig(bits=4, group_size=32, method="gptq-rot"), calibration=tokens)
    assert captured == ([] if family_check else [1])  # the family check runs before any block input is captured
    _assert_unchanged(model, before, types, training=False)


def test_successful_calibrated_quantize_commits_norms_and_layers(stories_dir, tokens):
    """The commit at the end applies what the blocks computed: the same result as the CLI path's
    tensors (norms rescaled by awq, every linear quantized)."""
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    config = QuantConfig(bits=4, group_size=32, method="gptq-awq")
    reference = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    changed = {}
    results = sequential.quantize_blocks(reference, config, tokens, progress=False, changed=changed)
    llmquant.quantize_(model, config, calibration=tokens, progress=False)
    assert changed and all(torch.equal(model.get_parameter(name), value) for name, value in changed.items())
    for name, q in results.items():
        module = model.get_submodule(name)
        assert isinstance(module, QuantLinear) and torch.equal(module.qweight, pack(q, 4)["qweight"]), name
