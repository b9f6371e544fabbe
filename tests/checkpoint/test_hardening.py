"""No silent corruption, no data loss: every probe of issue 11 ends in a correct result or a one-line
error with exit code 2, and nothing is left behind (or the original is untouched)."""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from llmquant import QuantConfig, QuantLinear, quantize_
from llmquant.cli import main

from ..conftest import SHARED_DATA

CALIB = SHARED_DATA / "c4-calibration-sample.txt"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def run_cli(*args):
    return main([str(a) for a in args])


def quantize(src, out, *extra):
    return run_cli("quantize", src, "-o", out, "--bits", 4, "--group-size", 32, "--quiet", *extra)


def one_line_error(capsys, expected, progress=False):
    err = capsys.readouterr().err.strip()
    if progress:  # `llmquant eval` says what it loads before it fails
        err = "\n".join(line for line in err.splitlines() if not line.startswith("loading "))
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for text in [expected] if isinstance(expected, str) else expected:
        assert text in err, err
    return err


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under folder (hidden ones included)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def copy_model(stories_dir, dst: Path) -> Path:
    shutil.copytree(stories_dir, dst)
    return dst


@pytest.fixture(scope="module")
def reference(stories_dir, tmp_path_factory):
    """stories260k quantized int4-g32 (asymmetric) by the CLI, and its state dict."""
    out = tmp_path_factory.mktemp("ref") / "int4"
    assert quantize(stories_dir, out) == 0
    return out, load_file(out / "model.safetensors")


def assert_same_checkpoint(out: Path, reference) -> None:
    tensors = {}
    for path in out.glob("*.safetensors"):
        tensors.update(load_file(path))
    expected = reference[1]
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)


# 1. Source reader: the index, files that are not weights, duplicate names


def test_index_is_followed_and_consolidated_copy_ignored(stories_dir, tmp_path, reference):
    src = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(stories_dir).save_pretrained(src, max_shard_size="200KB")
    for name in TOKENIZER_FILES:
        shutil.copy(stories_dir / name, src)
    shutil.copy(stories_dir / "model.safetensors", src / "consolidated.safetensors")
    assert (src / "model.safetensors.index.json").is_file()
    assert quantize(src, tmp_path / "o") == 0
    assert_same_checkpoint(tmp_path / "o", reference)


def test_adapter_and_consolidated_files_are_not_read(stories_dir, tmp_path, reference):
    src = copy_model(stories_dir, tmp_path / "src")
    save_file({"base_model.model.lora_A.weight": torch.ones(4, 64)}, src / "adapter_model.safetensors")
    shutil.copy(src / "model.safetensors", src / "consolidated.safetensors")
    assert quantize(src, tmp_path / "o") == 0
    assert_same_checkpoint(tmp_path / "o", reference)


def test_duplicate_tensor_names_name_both_files(stories_dir, tmp_path, capsys):
    src = copy_model(stories_dir, tmp_path / "src")
    shutil.copy(src / "model.safetensors", src / "model-copy.safetensors")
    before = snapshot(src)
    assert quantize(src, tmp_path / "o") == 2
    one_line_error(capsys, ["model.safetensors", "model-copy.safetensors", "is in both"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"] and snapshot(src) == before


def test_index_naming_a_missing_file_is_refused(stories_dir, tmp_path, capsys):
    src = copy_model(stories_dir, tmp_path / "src")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00009-of-00009.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert quantize(src, tmp_path / "o") == 2
    one_line_error(capsys, "model-00009-of-00009.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_writer_refuses_duplicate_names(tmp_path):
    from llmquant.checkpoint.shards import ShardedWriter, TensorSpec

    spec = TensorSpec("a", torch.float32, (2,))
    with pytest.raises(ValueError, match="'a' is planned twice"):
        ShardedWriter(tmp_path, [spec, TensorSpec("b", torch.float32, (2,)), spec], 10**9)
    assert not list(tmp_path.iterdir())


def bin_folder(stories_dir, dst: Path, legacy: bool) -> Path:
    dst.mkdir()
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(stories_dir / name, dst)
    state = load_file(stories_dir / "model.safetensors")
    torch.save(state, dst / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    # What a Trainer leaves beside the weights: not loadable weights_only, must not block.
    torch.save(argparse.Namespace(learning_rate=1e-4), dst / "training_args.bin")
    torch.save({"state": {}, "param_groups": []}, dst / "optimizer.pt")
    return dst


def test_legacy_bin_is_read_weights_only_beside_training_args(stories_dir, tmp_path, reference):
    src = bin_folder(stories_dir, tmp_path / "legacy", legacy=True)
    import zipfile

    assert not zipfile.is_zipfile(src / "pytorch_model.bin")
    assert quantize(src, tmp_path / "o") == 0
    assert_same_checkpoint(tmp_path / "o", reference)


# 2. Output: never the source, inside it or a parent of it; --overwrite only replaces our own


@pytest.mark.parametrize("where", ["source", "inside", "parent"])
def test_output_overlapping_the_source_is_refused(stories_dir, tmp_path, capsys, where):
    parent = tmp_path / "models"
    src = copy_model(stories_dir, parent / "src")
    (parent / "notes.txt").write_text("unrelated user file")
    out = {"source": src, "inside": src / "q", "parent": parent}[where]
    before = snapshot(tmp_path)
    assert quantize(src, out, "--overwrite") == 2
    one_line_error(capsys, "is the source folder, inside it or a parent of it")
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_overwrite_refuses_a_folder_that_is_not_an_llmquant_output(stories_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert quantize(stories_dir, out, "--overwrite") == 2
    one_line_error(capsys, ["refusing to overwrite", "not an earlier llmquant output"])
    assert [p.name for p in out.iterdir()] == ["thesis.tex"] and len(list(tmp_path.iterdir())) == 1
    float_model = copy_model(stories_dir, tmp_path / "fp")
    assert quantize(stories_dir, float_model, "--overwrite") == 2  # a model, but not ours
    one_line_error(capsys, "refusing to overwrite")
    assert snapshot(float_model) == snapshot(stories_dir)


def test_overwrite_replaces_an_empty_folder_or_an_earlier_output(stories_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    assert quantize(stories_dir, out, "--overwrite") == 0
    assert run_cli("quantize", stories_dir, "-o", out, "--bits", 8, "--overwrite", "--quiet") == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_stale_staging_of_dead_processes_is_cleaned(stories_dir, tmp_path):
    dead = dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # (a dead run's .o.old-PID is a swap cut short: restored, test_swap_cut_short_is_restored_on_the_next_run)
        for name in (f".o.tmp-{dead}", f".o.tmp-{dead}-0a1b2c3d", f".o.tmp-{alive.pid}", ".other.tmp-1"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        assert quantize(stories_dir, tmp_path / "o") == 0
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted([".other.tmp-1", f".o.tmp-{alive.pid}", "o"])
    finally:
        alive.kill()
        alive.wait()


def test_swap_cut_short_is_restored_on_the_next_run(stories_dir, tmp_path, reference):
    # A run killed between "rename the old output away" and "rename the new one in".
    shutil.copytree(reference[0], tmp_path / f".o.old-{dead_pid()}")
    from llmquant.checkpoint.publish import clean_stale

    clean_stale(tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert_same_checkpoint(tmp_path / "o", reference)


def test_failed_swap_restores_the_old_output(tmp_path, monkeypatch):
    from llmquant.checkpoint import publish

    out = tmp_path / "o"
    out.mkdir()
    old = json.dumps({"quantization_config": {"quant_method": "llmquant"}})
    (out / "config.json").write_text(old)
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".o.tmp-"):
            raise OSError("disk on fire")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(publish, "_rename_noreplace", lambda source, target: source.rename(target))
    with pytest.raises(OSError, match="disk on fire"), publish.staged_output(out, overwrite=True) as staging:
        (staging / "config.json").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"] and (out / "config.json").read_text() == old


# 3./4. Loading never silently wrong


def test_plain_from_pretrained_loads_without_import_llmquant(reference, tmp_path):
    """The llmquant-autoload.pth that `pip install` (plain or -e) puts in site-packages registers
    llmquant when transformers builds a model, and costs a process without transformers nothing."""
    site = Path(torch.__file__).parents[1]
    if not (site / "llmquant-autoload.pth").is_file():
        pytest.fail("llmquant-autoload.pth is not installed in site-packages: run scripts/setup")
    out = reference[0]
    code = f"""
import sys, torch
assert "llmquant" not in sys.modules
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r})
layer = model.model.layers[0].mlp.down_proj
assert type(layer).__name__ == "QuantLinear", type(layer)
torch.save(model(torch.arange(20)[None]).logits, {str(tmp_path / "logits.pt")!r})
"""
    # run outside the project root, whose kernels/ folder would shadow the installed `kernels` package
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected = AutoModelForCausalLM.from_pretrained(out)(torch.arange(20)[None]).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    cheap = "import sys, json; print(json.dumps(['torch' in sys.modules, 'llmquant' in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", cheap], capture_output=True, text=True)
    assert json.loads(done.stdout) == [False, False]


def edited_copy(reference, dst: Path, **changes) -> Path:
    shutil.copytree(reference[0], dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"].update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({"sym": True}, "unexpected qzeros"),
        ({"group_size": 64}, "scales is"),
        ({"bits": 8}, "qweight is"),
        ({"modules_to_not_convert": ["lm_head", "down_proj"]}, "is stored quantized"),
        ({"quant_method": "llmqant"}, "quant_method is 'llmqant'"),
    ],
)
def test_config_disagreeing_with_the_tensors_is_refused(reference, tmp_path, capsys, changes, expected):
    folder = edited_copy(reference, tmp_path / "edited", **changes)
    with pytest.raises(ValueError, match=expected):
        AutoModelForCausalLM.from_pretrained(folder)
    (tmp_path / "t.txt").write_text("Once upon a time there was a little girl. " * 20)
    code = run_cli("eval", folder, "--dataset", tmp_path / "t.txt", "--seqlen", 16, "--device", "cpu", "--no-progress")
    assert code == 2
    one_line_error(capsys, [str(folder), expected], progress=True)


def test_sym_checkpoint_with_asym_config_names_the_module(stories_dir, tmp_path):
    out = tmp_path / "sym"
    assert quantize(stories_dir, out, "--sym") == 0
    folder = edited_copy((out,), tmp_path / "edited", sym=False)
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*missing qzeros"):
        AutoModelForCausalLM.from_pretrained(folder)


# 5. --skip typos


def test_skip_matching_nothing_is_an_error(stories_dir, tmp_path, capsys):
    assert quantize(stories_dir, tmp_path / "o", "--skip", "lm_head", "down_prj") == 2
    one_line_error(capsys, ["'down_prj' matches no module", "down_proj", "q_proj"])
    assert not list(tmp_path.iterdir())
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    with pytest.raises(ValueError, match="'down_prj' matches no module"):
        quantize_(model, QuantConfig(modules_to_not_convert=["down_prj"]), progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


# 7. config.json and tensor problems, all before anything is written


def edited_source(stories_dir, tmp_path, edit) -> Path:
    src = copy_model(stories_dir, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(edit(config)))
    return src


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda c: [c], "must hold a JSON object, got a list"),
        (lambda c: {**c, "quantization_config": "yes"}, "quantization_config must be an object, got 'yes'"),
        (lambda c: {**c, "hidden_size": 128, "head_dim": 16}, "'model.embed_tokens.weight' is [512, 64]"),
        (lambda c: {**c, "intermediate_size": 256}, "config.json and the weights disagree"),
    ],
)
def test_bad_config_json_is_refused_before_writing(stories_dir, tmp_path, capsys, edit, expected):
    src = edited_source(stories_dir, tmp_path, edit)
    before = snapshot(src)
    assert quantize(src, tmp_path / "o") == 2
    one_line_error(capsys, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"] and snapshot(src) == before


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_copied_tensor_is_refused(stories_dir, tmp_path, capsys, value):
    src = copy_model(stories_dir, tmp_path / "src")
    state = load_file(src / "model.safetensors")
    state["model.norm.weight"][3] = value
    save_file(state, src / "model.safetensors")
    assert quantize(src, tmp_path / "o") == 2
    one_line_error(capsys, ["'model.norm.weight'", "NaN/Inf"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_quantize_is_all_or_nothing(stories_dir):
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        quantize_(model, QuantConfig(bits=4, group_size=32), progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert model.state_dict().keys() == before.keys()


def test_malformed_jsonl_keeps_the_cause(tmp_path):
    from llmquant.evals import EvalError
    from llmquant.evals.data import load_text

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": broken\n')
    with pytest.raises(EvalError) as info:
        load_text(str(bad))
    message = str(info.value)
    assert "bad.jsonl" in message and "caused by" in message and "JSON parse error" in message
    assert "\n" not in message


def test_local_path_without_suffix_is_not_a_hub_id(tmp_path, capsys, monkeypatch):
    from llmquant.evals import EvalError
    from llmquant.evals.data import load_text

    monkeypatch.chdir(tmp_path)
    for path in ("./models/tiny", "models/sub/tiny", "~/no-such-model-dir", str(tmp_path / "nope")):
        assert run_cli("quantize", path, "-o", tmp_path / "o", "--quiet") == 2
        one_line_error(capsys, "does not exist")
        with pytest.raises(EvalError, match="dataset file not found"):
            load_text(path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("group_size", [0, -2, 1.5, True])
def test_packing_api_refuses_bad_group_sizes(group_size):
    from llmquant.kernels.layout import effective_group_size, num_groups

    from llmquant.methods.codes import quantize_rtn

    with pytest.raises(ValueError, match="group_size must be a positive integer or -1"):
        num_groups(64, group_size)
    with pytest.raises(ValueError, match="group_size must be a positive integer or -1"):
        effective_group_size(group_size, 64)
    with pytest.raises(ValueError, match="group_size"):
        quantize_rtn(torch.randn(4, 64), 4, group_size, sym=False)


def test_checkpoint_missing_a_tensor_is_refused(stories_dir, tmp_path, capsys):
    src = copy_model(stories_dir, tmp_path / "src")
    state = load_file(src / "model.safetensors")
    del state["model.layers.1.post_attention_layernorm.weight"]
    save_file(state, src / "model.safetensors")
    assert quantize(src, tmp_path / "o") == 2
    one_line_error(capsys, ["'model.layers.1.post_attention_layernorm.weight'", "not in the checkpoint"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# Issue 22. 0: every in-memory way to a quantized model saves a folder that reloads it exactly


def reload_same(model, folder: Path) -> AutoModelForCausalLM:
    """save_pretrained -> plain from_pretrained: no missing/unexpected keys, the same logits."""
    tokens = torch.arange(3, 40)[None]
    with torch.no_grad():
        expected = model(tokens).logits
    model.save_pretrained(folder)
    again, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, expected)
    return again


@pytest.mark.parametrize("method", ["rtn", "clip", "gptq"])
def test_quantize_in_place_then_save_reloads_the_same_model(stories_dir, tmp_path, method):
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    torch.manual_seed(0)
    calibration = torch.randint(3, 512, (4, 32)) if method != "rtn" else None
    quantize_(model, QuantConfig(bits=4, group_size=32, method=method), progress=False, calibration=calibration)
    recorded = model.config.quantization_config
    assert (recorded.bits, recorded.group_size, recorded.method, recorded.modules_to_not_convert) == (
        4,
        32,
        method,
        ["lm_head"],
    )
    again = reload_same(model, tmp_path / "saved")
    assert isinstance(again.model.layers[0].mlp.down_proj, QuantLinear)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "llmquant" and saved["method"] == method


def test_quantize_on_load_then_save_reloads_the_same_model(stories_dir, tmp_path):
    config = QuantConfig(bits=8, group_size=-1, sym=True, modules_to_not_convert=["lm_head", "down_proj"])
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32, quantization_config=config)
    again = reload_same(model, tmp_path / "saved")
    assert isinstance(again.model.layers[0].mlp.up_proj, QuantLinear)
    assert type(again.model.layers[0].mlp.down_proj) is torch.nn.Linear


@pytest.mark.parametrize("how", ["llmquant.dequantize_", "model.dequantize"])
def test_dequantized_model_saves_as_a_float_model(stories_dir, tmp_path, how):
    import llmquant

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    quantize_(model, QuantConfig(bits=4, group_size=32), progress=False)
    if how == "model.dequantize":  # transformers' own path needs a model loaded quantized
        model.save_pretrained(tmp_path / "q")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).dequantize()
    else:
        llmquant.dequantize_(model)
    assert getattr(model.config, "quantization_config", None) is None
    again = reload_same(model, tmp_path / "float")
    assert not any(isinstance(m, QuantLinear) for m in again.modules())
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())


# Issue 22. 3: calibration longer than the model's positions, refused before any work

CALIBRATED = ["clip", "gptq", "gptq-noclip", "awq", "gptq-awq", "gptaq", "gptq-rot"]


@pytest.fixture(scope="module")
def tiny_opt(stories_dir, tmp_path_factory) -> Path:
    """A random OPT (learned positions, max 64) with stories260k's tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM

    folder = tmp_path_factory.mktemp("opt") / "opt"
    config = OPTConfig(
        vocab_size=512,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(stories_dir / name, folder)
    return folder


@pytest.mark.parametrize("method", CALIBRATED)
def test_calib_seqlen_above_the_positions_is_refused(stories_dir, tiny_opt, tmp_path, capsys, method):
    assert quantize(stories_dir, tmp_path / "o", "--method", method, "--calib-seqlen", 1024) == 2
    one_line_error(capsys, ["1024 tokens (--calib-seqlen)", "max_position_embeddings 512"])
    assert quantize(tiny_opt, tmp_path / "o", "--method", method, "--calib-seqlen", 128) == 2
    one_line_error(capsys, ["128 tokens", "max_position_embeddings 64"])
    assert not list(tmp_path.iterdir())


def test_calib_seqlen_at_the_limit_works_on_learned_positions(tiny_opt, tmp_path):
    args = ("--method", "gptq", "--calib-seqlen", 64, "--nsamples", 4, "--group-size", 32, "--calib", CALIB)
    assert run_cli("quantize", tiny_opt, "-o", tmp_path / "o", "--bits", 4, "--quiet", *args) == 0
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "o").model.decoder.layers[0].fc1, QuantLinear)


def test_quantize_in_place_refuses_calibration_longer_than_the_positions(stories_dir, tmp_path):
    import llmquant

    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    tokens = torch.randint(3, 512, (2, 600))
    with pytest.raises(ValueError, match="600 tokens .* max_position_embeddings 512"):
        quantize_(model, QuantConfig(bits=4, group_size=32, method="gptq"), progress=False, calibration=tokens)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    from llmquant.checkpoint.quantize import quantize_checkpoint

    calibration = llmquant.CalibrationSet(tokens=tokens, source="test", seed=0, tokens_available=1200)
    with pytest.raises(ValueError, match="max_position_embeddings 512"):
        quantize_checkpoint(str(stories_dir), tmp_path / "o", QuantConfig(method="gptq"), calibration=calibration)
    assert not list(tmp_path.iterdir())
