"""Issue 22: nothing from outside the source folder is published, weight files are read only from
inside it (or from the Hub cache's own blobs), and publishing an output is exclusive."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmquant import QuantLinear

from .test_hardening import copy_model, one_line_error, quantize, run_cli, snapshot

SECRET = "password=hunter2\n"


def outside_file(tmp_path: Path) -> Path:
    private = tmp_path / "private"
    private.mkdir(exist_ok=True)
    (private / "secret.txt").write_text(SECRET)
    return private / "secret.txt"


def published(folder: Path) -> list[str]:
    """Every file of an output whose bytes hold the secret or /etc files (none may)."""
    leaked = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if SECRET.encode() in data or b"root:" in data:
                leaked.append(path.name)
    return leaked


@pytest.fixture(scope="module")
def int8_output(stories_dir, tmp_path_factory):
    """stories260k int8 per-row symmetric (expressible in all three formats), llmquant layout."""
    out = tmp_path_factory.mktemp("pub") / "int8"
    assert run_cli("quantize", stories_dir, "-o", out, "--bits", 8, "--group-size", -1, "--sym", "--quiet") == 0
    return out


# 1. Side files and weight files behind symbolic links


@pytest.mark.parametrize(
    "name,target",
    [("notes.txt", "secret"), ("special_tokens_map.json", "/etc/passwd"), ("added_tokens.json", "/etc/hostname")],
)
@pytest.mark.parametrize("command", ["quantize", "convert"])
def test_side_file_linking_outside_the_source_is_refused(
    stories_dir, int8_output, tmp_path, capsys, name, target, command
):
    src = copy_model(stories_dir if command == "quantize" else int8_output, tmp_path / "src")
    link = src / name
    link.symlink_to(outside_file(tmp_path) if target == "secret" else target)
    out = tmp_path / "out"
    if command == "quantize":
        code = quantize(src, out)
    else:
        code = run_cli("convert", src, "-o", out, "--format", "compressed-tensors", "--quiet")
    assert code == 2
    one_line_error(capsys, [str(link), "symbolic link", "outside the source folder"])
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name != "private") == ["src"]


def test_links_resolving_inside_the_source_are_copied_as_files(stories_dir, tmp_path):
    src = copy_model(stories_dir, tmp_path / "src")
    (src / "extra").mkdir()
    shutil.move(src / "tokenizer.json", src / "extra" / "tokenizer.json")
    (src / "tokenizer.json").symlink_to("extra/tokenizer.json")
    shutil.move(src / "model.safetensors", src / "extra" / "model.safetensors")
    (src / "model.safetensors").symlink_to(src / "extra" / "model.safetensors")
    assert quantize(src, tmp_path / "o") == 0
    copied = tmp_path / "o" / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_bytes() == (stories_dir / "tokenizer.json").read_bytes()


def test_weight_file_linking_outside_the_source_is_refused(stories_dir, tmp_path, capsys):
    src = copy_model(stories_dir, tmp_path / "src")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(src / "model.safetensors", elsewhere / "model.safetensors")
    (src / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    assert quantize(src, tmp_path / "o") == 2
    one_line_error(capsys, [str(src / "model.safetensors"), "outside the source folder"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "src"]


def fake_hub_cache(stories_dir: Path, cache: Path, repo: str = "models--tiny-org--stories") -> Path:
    """The Hub cache layout: snapshots/REV/FILE -> ../../blobs/HASH, refs/main = REV."""
    import hashlib

    rev = "0123456789abcdef0123456789abcdef01234567"
    root = cache / repo
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    snapshot_dir = root / "snapshots" / rev
    snapshot_dir.mkdir(parents=True)
    for path in stories_dir.iterdir():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy(path, root / "blobs" / digest)
        (snapshot_dir / path.name).symlink_to(f"../../blobs/{digest}")
    return snapshot_dir


def test_hub_cache_layout_is_read_through_its_blob_links(stories_dir, tmp_path):
    cache = tmp_path / "hub"
    snapshot_dir = fake_hub_cache(stories_dir, cache)
    assert all(p.is_symlink() for p in snapshot_dir.iterdir())
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    for source in ("tiny-org/stories", str(snapshot_dir)):  # a Hub id (resolved offline) and the folder
        out = tmp_path / f"o-{len(source)}"
        args = ["quantize", source, "-o", str(out), "--bits", "4", "--group-size", "32", "--quiet"]
        done = subprocess.run(
            [sys.executable, "-m", "llmquant.cli", *args], capture_output=True, text=True, env=env, cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert not (out / "tokenizer.json").is_symlink()
        assert (out / "tokenizer.json").read_bytes() == (stories_dir / "tokenizer.json").read_bytes()
        model = AutoModelForCausalLM.from_pretrained(out)
        assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)


def test_hub_blob_link_of_another_repo_is_refused(stories_dir, tmp_path, capsys):
    snapshot_dir = fake_hub_cache(stories_dir, tmp_path / "hub")
    other = fake_hub_cache(stories_dir, tmp_path / "hub", repo="models--someone--else")
    notes = other.parent.parent / "blobs" / "notes"
    notes.write_text(SECRET)
    (snapshot_dir / "notes.txt").symlink_to(os.path.relpath(notes, snapshot_dir))
    assert quantize(snapshot_dir, tmp_path / "o") == 2
    one_line_error(capsys, ["notes.txt", "outside the source folder"])
    assert not (tmp_path / "o").exists()


# 4. Publishing is exclusive


def appear_while_running(monkeypatch, out: Path, make) -> None:
    """Run `make(out)` while the quantize command is writing (just before its model card)."""
    from llmquant.checkpoint import quantize as checkpoint

    real = checkpoint.write_model_card

    def write_model_card(*args, **kwargs):
        make(out)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_model_card", write_model_card)


def other_output(int8_output):
    return lambda out: shutil.copytree(int8_output, out)


@pytest.mark.parametrize("appears", ["empty folder", "another run's output"])
def test_folder_appearing_while_running_is_not_replaced(
    stories_dir, int8_output, tmp_path, capsys, monkeypatch, appears
):
    out = tmp_path / "o"
    appear_while_running(monkeypatch, out, Path.mkdir if appears == "empty folder" else other_output(int8_output))
    assert quantize(stories_dir, out) == 2
    one_line_error(capsys, [str(out), "appeared while this run was writing"])
    before = snapshot(int8_output) if appears != "empty folder" else {}
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no staging left


def test_overwrite_replaces_a_folder_appearing_only_if_it_is_an_llmquant_output(
    stories_dir, int8_output, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "o"
    appear_while_running(monkeypatch, out, other_output(int8_output))
    assert quantize(stories_dir, out, "--overwrite") == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]

    foreign = tmp_path / "f"

    def user_folder(path: Path) -> None:
        path.mkdir()
        (path / "thesis.tex").write_text("years of work")

    monkeypatch.undo()
    appear_while_running(monkeypatch, foreign, user_folder)
    assert quantize(stories_dir, foreign, "--overwrite") == 2
    one_line_error(capsys, [str(foreign), "refusing to overwrite"])
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "f",
        "o",
    ]


def run_together(cwd: Path, *commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Start every `llmquant` command at once (outside the project root, whose kernels/ folder
    would shadow the installed `kernels` package) and wait for all."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "llmquant.cli", *c],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )
        for c in commands
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_concurrent_runs_publish_exclusively(stories_dir, tmp_path):
    out = tmp_path / "o"
    base = ["quantize", str(stories_dir), "-o", str(out), "--group-size", "32", "--quiet"]
    runs = run_together(tmp_path, [*base, "--bits", "4"], [*base, "--bits", "8"])
    codes = sorted(r.returncode for r in runs)
    assert codes == [0, 2], [r.stderr[-1000:] for r in runs]
    loser = next(r for r in runs if r.returncode == 2)
    assert str(out) in loser.stderr and len(loser.stderr.strip().splitlines()) == 1, loser.stderr
    winner_bits = 4 if runs[0].returncode == 0 else 8
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == winner_bits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]

    runs = run_together(tmp_path, [*base, "--bits", "4", "--overwrite"], [*base, "--bits", "8", "--overwrite"])
    assert [r.returncode for r in runs] == [0, 0], [r.stderr[-1000:] for r in runs]
    bits = json.loads((out / "config.json").read_text())["quantization_config"]["bits"]
    state = load_file(out / "model.safetensors")  # complete and consistent with its config
    assert state["model.layers.0.mlp.up_proj.qweight"].shape[0] == 64 * bits // 32
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.up_proj.bits == bits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_overwrite_replaces_llmquants_own_exports(stories_dir, tmp_path, fmt):
    out = tmp_path / "o"
    args = ["quantize", stories_dir, "-o", out, "--bits", 8, "--group-size", -1, "--sym", "--quiet"]
    assert run_cli(*args, "--format", fmt) == 0
    assert run_cli(*args, "--format", "llmquant", "--overwrite") == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "llmquant"
    assert run_cli(*args, "--format", fmt, "--overwrite") == 0
    assert run_cli("convert", out, "-o", tmp_path / "c", "--format", "llmquant", "--quiet") == 0
    assert run_cli("convert", tmp_path / "c", "-o", out, "--format", fmt, "--overwrite", "--quiet") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "o"]


def test_overwrite_still_refuses_a_foreign_gptq_folder(int8_output, stories_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli("convert", int8_output, "-o", out, "--format", "gptq", "--quiet") == 0
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["meta"] = {"quantizer": ["gptqmodel:4.0.0"]}  # someone else's
    (out / "config.json").write_text(json.dumps(config))
    before = snapshot(out)
    assert quantize(stories_dir, out, "--overwrite") == 2
    one_line_error(capsys, "not an earlier llmquant output")
    assert snapshot(out) == before
    assert torch.is_tensor(load_file(out / "model.safetensors")["model.layers.0.mlp.up_proj.qweight"])
