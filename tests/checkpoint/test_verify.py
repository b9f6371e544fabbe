"""Issue 22: stored values are checked at load (scales finite and positive, zero points in range)
for every format `llmquant.load` reads, and `convert` reads its source through the same checks as
the loaders, refusing with one line and exit code 2."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import llmquant
from llmquant import QuantConfig

from .test_hardening import one_line_error, quantize, run_cli

LAYER = "model.layers.2.mlp.up_proj"


@pytest.fixture(scope="module")
def int4(stories_dir, tmp_path_factory):
    """stories260k int4 g32 asymmetric, llmquant layout."""
    out = tmp_path_factory.mktemp("verify") / "int4"
    assert quantize(stories_dir, out) == 0
    return out


@pytest.fixture(scope="module")
def exports(stories_dir, tmp_path_factory):
    """stories260k int8 per-row symmetric in the three formats (the only layout all three hold)."""
    root = tmp_path_factory.mktemp("verify-exports")
    for fmt in ("llmquant", "gptq", "compressed-tensors"):
        args = ["quantize", stories_dir, "-o", root / fmt, "--bits", 8, "--group-size", -1, "--sym", "--quiet"]
        assert run_cli(*args, "--format", fmt) == 0
    return root


def edited(folder: Path, dst: Path, tensors=None, config=None) -> Path:
    """A copy of `folder` with `tensors(state)` applied to its weights and `config(dict)` to config.json."""
    shutil.copytree(folder, dst)
    if tensors is not None:
        state = load_file(dst / "model.safetensors")
        tensors(state)
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        value = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config(value)))
    return dst


def set_value(name: str, value: float, index=(1, 3)):
    def edit(state):
        state[name][index] = value

    return edit


# 2. Values checked at load, for every format llmquant.load reads


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 0.0, -0.5])
def test_bad_scale_is_refused_at_load_naming_the_module(int4, tmp_path, value):
    folder = edited(int4, tmp_path / "bad", tensors=set_value(f"{LAYER}.scales", value))
    match = rf"module '{LAYER}' has 1 scales that are not finite and positive"
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match=match):
        llmquant.load(folder)


def test_zero_point_out_of_range_is_refused_at_load(int4, tmp_path, capsys):
    folder = edited(int4, tmp_path / "bad", tensors=set_value(f"{LAYER}.qzeros", 200))
    match = rf"module '{LAYER}' has zero points up to 200, outside \[0, 16\)"
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(folder)
    (tmp_path / "t.txt").write_text("Once upon a time there was a little girl. " * 20)
    code = run_cli("eval", folder, "--dataset", tmp_path / "t.txt", "--seqlen", 16, "--device", "cpu", "--no-progress")
    assert code == 2
    one_line_error(capsys, [LAYER, "zero points up to 200"], progress=True)


@pytest.mark.parametrize("fmt,scale", [("gptq", "scales"), ("compressed-tensors", "weight_scale")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_bad_scale_in_an_export_is_refused_by_llmquant_load(exports, tmp_path, fmt, scale, value):
    folder = edited(exports / fmt, tmp_path / "bad", tensors=set_value(f"{LAYER}.{scale}", value, (0, 0)))
    with pytest.raises(ValueError, match=rf"module '{LAYER}' has 1 scales that are not finite"):
        llmquant.load(folder)
    assert llmquant.load(exports / fmt) is not None  # the untouched export loads


def test_gptq_zero_point_out_of_range_is_refused(exports, tmp_path):
    # v1 stores zero - 1: a stored 255 at 8 bits is zero 256, which a uint8 would wrap to 0.
    def edit(state):  # the lowest byte of a word is output 0's zero; sym stores 127 there
        state[f"{LAYER}.qzeros"][0, 0] |= 0xFF

    def asym(config):
        config["quantization_config"]["sym"] = False
        return config

    folder = edited(exports / "gptq", tmp_path / "bad", tensors=edit, config=asym)
    with pytest.raises(ValueError, match=rf"{LAYER}: zero point 256"):
        llmquant.load(folder)


# 5. convert reads its source through the loaders' checks


def truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def extra_row(state):
    name = "model.layers.1.self_attn.k_proj.qweight"
    state[name] = torch.cat([state[name], state[name][:1]])


def int32_scales(state):
    state[f"{LAYER}.scales"] = state[f"{LAYER}.scales"].to(torch.int32)


PROBES = {
    "list config": (None, lambda c: [c], "must hold a JSON object, got a list"),
    "quantization_config yes": (None, lambda c: {**c, "quantization_config": "yes"}, "must be an object, got 'yes'"),
    "truncated shard": ("truncate", None, "model.safetensors"),
    "extra qweight row": (extra_row, None, "module 'model.layers.1.self_attn.k_proj' does not match"),
    "changed hidden_size": (
        None,
        lambda c: {**c, "hidden_size": 128, "head_dim": 16},
        "'model.embed_tokens.weight' is [512, 64] in the checkpoint",
    ),
    "int32 scales": (int32_scales, None, "scales is torch.int32"),
    "nan scales": (set_value(f"{LAYER}.scales", float("nan")), None, "scales that are not finite and positive"),
    "zero out of range": (set_value(f"{LAYER}.qzeros", 200), None, "zero points up to 200"),
}


@pytest.mark.parametrize("probe", list(PROBES))
def test_convert_refuses_a_bad_source(int4, tmp_path, capsys, probe):
    tensors, config, expected = PROBES[probe]
    src = edited(int4, tmp_path / "src", tensors=None if tensors == "truncate" else tensors, config=config)
    if tensors == "truncate":
        truncate(src)
    out = tmp_path / "out"
    assert run_cli("convert", src, "-o", out, "--format", "llmquant", "--quiet") == 2
    one_line_error(capsys, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_refuses_a_4bit_config_over_8bit_tensors(stories_dir, tmp_path, capsys):
    int8 = tmp_path / "int8"
    assert run_cli("quantize", stories_dir, "-o", int8, "--bits", 8, "--group-size", 32, "--quiet") == 0
    src = edited(
        int8, tmp_path / "src", config=lambda c: {**c, "quantization_config": {**c["quantization_config"], "bits": 4}}
    )
    assert run_cli("convert", src, "-o", tmp_path / "out", "--format", "llmquant", "--quiet") == 2
    # down_proj (K = 172) comes first in the file: 43 rows of 8-bit words where 4-bit codes need 22
    one_line_error(capsys, ["'model.layers.0.mlp.down_proj' does not match quantization_config (bits=4", "[43, 64]"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8", "src"]


def test_convert_refuses_a_bad_export_source(exports, tmp_path, capsys):
    src = edited(exports / "gptq", tmp_path / "src", tensors=set_value(f"{LAYER}.scales", float("nan"), (0, 5)))
    assert run_cli("convert", src, "-o", tmp_path / "out", "--format", "compressed-tensors", "--quiet") == 2
    one_line_error(capsys, [LAYER, "not finite and positive"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_has_no_calibration_flags(int4, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli("convert", int4, "-o", tmp_path / "out", "--format", "gptq", "--calib-seqlen", 64)
    assert info.value.code == 2 and "unrecognized arguments: --calib-seqlen" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("probe", ["list config", "truncated shard"])
def test_llmquant_load_names_the_bad_file(int4, tmp_path, probe):
    tensors, config, _ = PROBES[probe]
    folder = edited(int4, tmp_path / "bad", config=config)
    if tensors == "truncate":
        truncate(folder)
    name = "config.json" if probe == "list config" else "model.safetensors"
    with pytest.raises(ValueError, match=str(folder / name)):
        llmquant.load(folder)


def test_good_checkpoint_still_converts_and_loads(int4, tmp_path):
    assert run_cli("convert", int4, "-o", tmp_path / "copy", "--format", "llmquant", "--quiet") == 0
    model = llmquant.load(tmp_path / "copy")
    assert model.config.quantization_config == QuantConfig(
        **json.loads((int4 / "config.json").read_text())["quantization_config"]
    )
