"""`llmquant quantize` end to end on stories260k, and every kind of bad input."""

import importlib.metadata
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from llmquant import QuantConfig, __version__
from llmquant.cli import main


def run_cli(*args):
    return main([str(a) for a in args])


def test_cli_output_equals_quantize_on_load(stories_dir, tmp_path, capsys):
    out = tmp_path / "s260k-int4"
    assert (
        run_cli(
            "quantize", stories_dir, "-o", out, "--bits", 4, "--group-size", 32, "--max-shard-size", "100KB", "--quiet"
        )
        == 0
    )
    summary = capsys.readouterr().out
    assert "bits per weight" in summary and "226,560 of 260,032" in summary
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "README.md",
        "tokenizer.json",
        "tokenizer.model",
        "generation_config.json",
        "model.safetensors.index.json",
    } <= names
    shards = sorted(p for p in names if p.endswith(".safetensors"))
    assert len(shards) > 1 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert not list(tmp_path.glob(".*tmp*"))
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "- llmquant" in card
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == QuantConfig(bits=4, group_size=32, modules_to_not_convert=["lm_head"]).to_dict()

    from_cli = AutoModelForCausalLM.from_pretrained(out)
    on_load = AutoModelForCausalLM.from_pretrained(stories_dir, quantization_config=QuantConfig(bits=4, group_size=32))
    for key, value in on_load.state_dict().items():
        assert torch.equal(value, from_cli.state_dict()[key]), key


def test_console_script_runs(stories_dir, tmp_path):
    script = shutil.which("llmquant", path=str(__import__("pathlib").Path(sys.executable).parent))
    done = subprocess.run(
        [
            script,
            "quantize",
            stories_dir,
            "-o",
            tmp_path / "o",
            "--bits",
            "8",
            "--group-size",
            "-1",
            "--sym",
            "--skip",
            "lm_head",
            "down_proj",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert config["modules_to_not_convert"] == ["lm_head", "down_proj"] and config["sym"] is True
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)


def bad_inputs(stories_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(stories_dir / "config.json", empty)
    truncated = tmp_path / "truncated"
    shutil.copytree(stories_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(stories_dir / "config.json", pickled)
    torch.save({"weights": ValueError("not a tensor")}, pickled / "pytorch_model.bin")  # not weights-only
    done = tmp_path / "done"
    run_cli("quantize", stories_dir, "-o", done, "--bits", 8, "--quiet")
    exists = tmp_path / "exists"
    exists.mkdir()
    return {
        "missing": ([tmp_path / "nope", "-o", tmp_path / "o"], "does not exist"),
        "no weights": ([empty, "-o", tmp_path / "o"], "no weights"),
        "truncated": ([truncated, "-o", tmp_path / "o"], "model.safetensors"),
        "pickle": ([pickled, "-o", tmp_path / "o"], "weights-only"),
        "bits": ([stories_dir, "-o", tmp_path / "o", "--bits", 5], "bits must be one of"),
        "group": ([stories_dir, "-o", tmp_path / "o", "--group-size", 100], "group_size must be one of"),
        "out exists": ([stories_dir, "-o", exists], "--overwrite"),
        "already quantized": ([done, "-o", tmp_path / "o"], "already quantized"),
        "not a model": ([tmp_path, "-o", tmp_path / "o"], "config.json"),
        "hub id offline": (["someone/no-such-model", "-o", tmp_path / "o"], "could not be fetched from the Hub"),
    }


def test_bad_input_gives_one_line_and_exit_2(stories_dir, tmp_path, capsys):
    cases = bad_inputs(stories_dir, tmp_path)
    capsys.readouterr()
    for case, (args, expected) in cases.items():
        code = run_cli("quantize", *args, "--quiet")
        err = capsys.readouterr().err.strip()
        assert code == 2, case
        assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1, (case, err)
        assert not (tmp_path / "o").exists(), case
        assert not list(tmp_path.glob(".o.tmp*")), case


def test_bin_checkpoint_is_read_weights_only(stories_dir, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(stories_dir / name, src)
    from safetensors.torch import load_file

    torch.save(load_file(stories_dir / "model.safetensors"), src / "pytorch_model.bin")
    assert run_cli("quantize", src, "-o", tmp_path / "o", "--bits", 4, "--group-size", 64, "--quiet") == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").model.layers[1].mlp.up_proj.bits == 4


def test_overwrite_replaces_atomically(stories_dir, tmp_path):
    out = tmp_path / "o"
    assert run_cli("quantize", stories_dir, "-o", out, "--bits", 8, "--quiet") == 0
    assert run_cli("quantize", stories_dir, "-o", out, "--bits", 4, "--overwrite", "--quiet") == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_failure_midway_leaves_nothing(stories_dir, tmp_path):
    src = tmp_path / "nan"
    shutil.copytree(stories_dir, src)
    from safetensors.torch import load_file

    state = load_file(src / "model.safetensors")
    state["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, src / "model.safetensors")
    assert run_cli("quantize", src, "-o", tmp_path / "o", "--quiet") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]


@pytest.mark.parametrize("size,expected", [("5GB", 5 * 10**9), ("100KB", 100_000), ("2GiB", 2 * 2**30), (17, 17)])
def test_parse_size(size, expected):
    from llmquant.checkpoint.shards import parse_size

    assert parse_size(size) == expected


def test_sharded_source_gives_the_same_checkpoint(stories_dir, tmp_path):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(stories_dir).save_pretrained(sharded, max_shard_size="200KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(stories_dir / name, sharded)
    for src, out in ((stories_dir, "single"), (sharded, "from-shards")):
        assert run_cli("quantize", src, "-o", tmp_path / out, "--bits", 4, "--group-size", 64, "--quiet") == 0
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "single").state_dict()
    from_shards = AutoModelForCausalLM.from_pretrained(tmp_path / "from-shards").state_dict()
    assert single.keys() == from_shards.keys()
    assert all(torch.equal(single[key], from_shards[key]) for key in single)


HEAVY = ("torch", "transformers", "safetensors", "tqdm", "numpy")


@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], ["quantize", "--help"], ["eval", "--help"], ["quantize"], ["nope"]]
)
def test_help_and_argument_errors_import_no_heavy_modules(argv):
    # `llmquant --help` and argument errors must answer at once, without torch or transformers.
    code = (
        "import sys\n"
        "from llmquant.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print('HEAVY', heavy, 'CODE', code, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("HEAVY [] CODE"), done.stderr
    assert last.endswith("CODE 0" if argv[-1] in ("--help", "--version") else "CODE 2"), done.stderr
    if argv[-1] == "--help":
        assert "usage: llmquant" in done.stdout
    if argv == ["--version"]:  # the installed metadata and the package agree: one place holds the version
        assert done.stdout == f"llmquant {importlib.metadata.version('llmquant')}\n" == f"llmquant {__version__}\n"


def test_a_missing_dependency_is_one_line_naming_the_pip_install(monkeypatch, capsys):
    import llmquant.cli as cli

    def needs(module):
        def run(args):
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)

        return run

    monkeypatch.setattr(cli, "_run_convert", needs("llmquant_absent_dep.sub"))
    assert cli.main(["convert", "src", "-o", "out"]) == 2
    expected = "llmquant convert: error: llmquant_absent_dep, which is not installed: pip install llmquant-absent-dep\n"
    assert capsys.readouterr().err == expected
    monkeypatch.setattr(cli, "_run_convert", needs("llmquant.absent"))  # our own module missing is a bug: traceback
    with pytest.raises(ModuleNotFoundError):
        cli.main(["convert", "src", "-o", "out"])


def test_eval_report_without_matplotlib_names_the_plots_extra(monkeypatch, stories_dir, tmp_path, capsys):
    import importlib.util

    from llmquant import errors

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert errors.missing_module("torch") is None
    args = ["eval", str(stories_dir), "--dataset", str(stories_dir.parent / "tinystories-valid-excerpt.txt")]
    assert main([*args, "--report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "llmquant eval: error: --report (its PNG plot) needs matplotlib, which is not installed: "
        'pip install "llmquant[plots]"\n'
    )
    assert not list(tmp_path.iterdir())


def test_bare_import_registers_with_transformers_once_it_loads():
    # `import llmquant` stays light, yet from_pretrained(quantized_dir) needs the registration.
    code = (
        "import sys, llmquant\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
        "print('llmquant' in AUTO_QUANTIZER_MAPPING)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stderr
