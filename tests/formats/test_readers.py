"""llmquant's GPTQ and compressed-tensors exports loaded by the engines' own readers, in an
environment WITHOUT llmquant (scripts/reader-env: transformers, compressed-tensors, optimum,
GPTQModel): a plain `from_pretrained` (transformers' GPTQ and compressed-tensors integrations)
and GPTQModel's loader must load every export with no missing/unexpected/mismatched weight and
give the logits `llmquant.load` gives for the same folder (1e-3 relative).

Where a reader cannot load a form by design of that reader (transformers + compressed-tensors and
asymmetric zero points, docs/FORMAT.md "Readers"), the test pins the refusal, so an upstream fix
shows up here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import llmquant
from llmquant.cli import main
from tests.tiny_llama import build_tiny_llama

pytestmark = pytest.mark.readers
ROOT = Path(__file__).resolve().parents[2]

# name -> (model, format, cli arguments)
EXPORTS = {
    "tiny-gptq-w4-g128-sym": ("tiny", "gptq", ["--bits", "4", "--group-size", "128", "--sym"]),
    "tiny-gptq-w4-g64-asym": ("tiny", "gptq", ["--bits", "4", "--group-size", "64"]),
    "tiny-gptq-w8-g32-sym": ("tiny", "gptq", ["--bits", "8", "--group-size", "32", "--sym"]),
    "tiny-gptq-w8-channel-asym": ("tiny", "gptq", ["--bits", "8", "--group-size", "-1"]),
    "tiny-gptq-w4-g128-sym-skip": ("tiny", "gptq", ["--bits", "4", "--group-size", "128", "--sym",
                                                    "--skip", "down_proj", "lm_head"]),
    "tiny-gptq-w4-g128-asym-skip": ("tiny", "gptq", ["--bits", "4", "--group-size", "128",
                                                     "--skip", "down_proj", "lm_head"]),
    "tiny-ct-w4-g128-sym": ("tiny", "compressed-tensors", ["--bits", "4", "--group-size", "128", "--sym"]),
    "tiny-ct-w4-g64-asym": ("tiny", "compressed-tensors", ["--bits", "4", "--group-size", "64"]),
    "tiny-ct-w8-channel-sym": ("tiny", "compressed-tensors", ["--bits", "8", "--group-size", "-1", "--sym"]),
    "tiny-ct-w8-g32-asym": ("tiny", "compressed-tensors", ["--bits", "8", "--group-size", "32"]),
    "tiny-ct-w4-g128-sym-skip": ("tiny", "compressed-tensors", ["--bits", "4", "--group-size", "128", "--sym",
                                                                "--skip", "down_proj", "lm_head"]),
    "stories-gptq-w8-sym-skip": ("stories", "gptq", ["--bits", "8", "--group-size", "-1", "--sym",
                                                     "--skip", "down_proj"]),
    "stories-gptq-w8-asym": ("stories", "gptq", ["--bits", "8", "--group-size", "-1"]),
    "stories-ct-w8-sym-skip": ("stories", "compressed-tensors", ["--bits", "8", "--group-size", "-1", "--sym",
                                                                 "--skip", "down_proj"]),
    "stories-ct-w8-asym": ("stories", "compressed-tensors", ["--bits", "8", "--group-size", "-1"]),
}
# SmolLM2-135M (K = 576, so group 64; tied head kept in float): marked slow, exported and loaded apart
SMOLLM2_EXPORTS = {
    "smollm2-gptq-w4-g64-sym": ("smollm2", "gptq", ["--bits", "4", "--group-size", "64", "--sym"]),
    "smollm2-gptq-w4-g64-asym": ("smollm2", "gptq", ["--bits", "4", "--group-size", "64"]),
    "smollm2-ct-w4-g64-sym": ("smollm2", "compressed-tensors", ["--bits", "4", "--group-size", "64", "--sym"]),
    "smollm2-ct-w4-g64-asym": ("smollm2", "compressed-tensors", ["--bits", "4", "--group-size", "64"]),
}
ALL_EXPORTS = {**EXPORTS, **SMOLLM2_EXPORTS}


def readers(name: str, gptq_readers: bool) -> list[str]:
    """The readers an export is loaded by: transformers, and GPTQModel's loader for GPTQ. GPTQ is
    read by transformers only through optimum + GPTQModel, present with LLMQUANT_READER_GPTQ=1."""
    if ALL_EXPORTS[name][1] != "gptq":
        return ["transformers"]
    return ["transformers", "gptqmodel"] if gptq_readers else []


def reader_refuses(name: str, reader: str) -> bool:
    """transformers' compressed-tensors integration allocates weight_zero_point unpacked ([N, G])
    and refuses the packed [N/V, G] tensor llm-compressor writes (and vLLM reads)."""
    return reader == "transformers" and "-ct-" in name and "asym" in name


@pytest.fixture(scope="module")
def reader_python() -> str:
    """The reader environment's interpreter (built by scripts/reader-env on first use: minutes), or
    LLMQUANT_READER_PYTHON: an interpreter of an environment without llmquant made by hand."""
    if os.environ.get("LLMQUANT_READER_PYTHON"):
        return os.environ["LLMQUANT_READER_PYTHON"]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "VIRTUAL_ENV", "PYTHONPATH")}
    done = subprocess.run([str(ROOT / "scripts" / "reader-env")], capture_output=True, text=True, env=env,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def gptq_readers(reader_python) -> bool:
    """Whether the reader environment has GPTQModel and optimum (LLMQUANT_READER_GPTQ=1)."""
    probe = "import importlib.util as u; print(bool(u.find_spec('gptqmodel') and u.find_spec('optimum')))"
    return subprocess.run([reader_python, "-c", probe], capture_output=True, text=True).stdout.strip() == "True"


def _export(exports: dict, models: dict[str, Path], root: Path) -> dict[str, Path]:
    folders = {}
    for name, (model, fmt, args) in exports.items():
        out = root / name
        assert main(["quantize", str(models[model]), "-o", str(out), "--format", fmt, "--quiet", *args]) == 0
        folders[name] = out
    return folders


@pytest.fixture(scope="module")
def exported(stories_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reader-exports")
    return _export(EXPORTS, {"tiny": build_tiny_llama(root / "tiny-llama"), "stories": stories_dir}, root)


@pytest.fixture(scope="module")
def exported_smollm2(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    return _export(SMOLLM2_EXPORTS, {"smollm2": smollm2_dir}, tmp_path_factory.mktemp("reader-exports-smollm2"))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> tuple[torch.Tensor, Path]:
    torch.manual_seed(0)
    ids = torch.randint(3, 512, (2, 24))
    path = tmp_path_factory.mktemp("tokens") / "tokens.pt"
    torch.save(ids, path)
    return ids, path


def _load_all(reader_python: str, gptq_readers: bool, exported: dict[str, Path], tokens_path: Path,
              root: Path) -> dict[tuple[str, str], dict]:
    """{(export, reader): the reader's result}, every load in one process of the reader env."""
    jobs = []
    for name, folder in exported.items():
        for reader in readers(name, gptq_readers):
            # GPTQModel's CPU kernels take fp16/bf16 only: compared with llmquant.load in fp16
            dtype = "float16" if reader == "gptqmodel" else "float32"
            jobs.append({"folder": str(folder), "reader": reader, "out": str(root / f"{name}-{reader}.pt"),
                         "dtype": dtype, "key": [name, reader]})
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(CUDA_VISIBLE_DEVICES="", GPTQMODEL_CPU_WORKERS="2")
    done = subprocess.run([reader_python, str(ROOT / "tests" / "readers" / "load_check.py"), str(root / "jobs.json"),
                           str(tokens_path)], capture_output=True, text=True, env=env, cwd=root, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return {tuple(job["key"]): torch.load(job["out"], weights_only=False) for job in jobs}


@pytest.fixture(scope="module")
def loaded(reader_python, gptq_readers, exported, tokens, tmp_path_factory) -> dict[tuple[str, str], dict]:
    return _load_all(reader_python, gptq_readers, exported, tokens[1], tmp_path_factory.mktemp("reader-results"))


@pytest.fixture(scope="module")
def loaded_smollm2(reader_python, gptq_readers, exported_smollm2, tokens, tmp_path_factory) -> dict:
    return _load_all(reader_python, gptq_readers, exported_smollm2, tokens[1],
                     tmp_path_factory.mktemp("reader-results-smollm2"))


def _llmquant_logits(folder: Path, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    model = llmquant.load(folder, dtype=dtype)
    with torch.no_grad():
        return model(ids).logits.float()


def _quantized_in_config(folder: Path) -> set[str]:
    """Full names of the linears the export stores quantized (from its tensors)."""
    from safetensors import safe_open

    names = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            names |= {k.rsplit(".", 1)[0] for k in handle.keys() if k.endswith((".qweight", ".weight_packed"))}
    return names


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_engine_readers_load_exports_like_llmquant(name, exported, loaded, gptq_readers, tokens):
    _check(name, exported, loaded, gptq_readers, tokens)


# transformers' GPTQ path (optimum -> GPTQModel's torch kernel) rounds through fp16: on SmolLM2 its
# float32 logits differ from llmquant.load's by 1.4e-3 relative for g64 asym (9.6e-4 for sym),
# while GPTQModel.load of the same folder gives llmquant's fp16 logits exactly (measured
# 2026-12-04): reader arithmetic, not the export. Pinned so that a change either way shows up.
SMOLLM2_XFAIL = {
    "smollm2-gptq-w4-g64-asym": "transformers+GPTQ float32 logits 1.4e-3 from llmquant.load (fp16 kernel rounding)",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=SMOLLM2_XFAIL[n])) if n in SMOLLM2_XFAIL else n
    for n in sorted(SMOLLM2_EXPORTS)
])
def test_engine_readers_load_smollm2_exports_like_llmquant(name, exported_smollm2, loaded_smollm2, gptq_readers,
                                                          tokens):
    _check(name, exported_smollm2, loaded_smollm2, gptq_readers, tokens)


def _check(name, exported, loaded, gptq_readers, tokens):
    ids, _ = tokens
    folder = exported[name]
    if not readers(name, gptq_readers):
        pytest.skip("GPTQ readers (optimum + GPTQModel) not in the reader env: run with LLMQUANT_READER_GPTQ=1")
    stored = _quantized_in_config(folder)
    for reader in readers(name, gptq_readers):
        reference = _llmquant_logits(folder, ids, torch.float16 if reader == "gptqmodel" else torch.float32)
        result = loaded[(name, reader)]
        report = result["report"]
        assert report["versions"]["llmquant"] == "" and not report["llmquant_imported"]
        if reader_refuses(name, reader):
            # "size mismatch" for weight_zero_point: [N/V, G] in the checkpoint, [N, G] in the model
            assert "error" in result and "ignore_mismatched_sizes" in result["error"], (reader, result.get("error"))
            continue
        assert "error" not in result, (reader, result.get("error"))
        info = report.get("loading_info", {})
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (reader, info)
        assert not report["log"], (reader, report["log"])
        if reader == "gptqmodel" or ALL_EXPORTS[name][1] == "gptq":
            assert set(report["quantized_modules"]) == stored, (reader, set(report["quantized_modules"]) ^ stored)
        scale = reference.abs().max()
        error = (result["logits"] - reference).abs().max() / scale
        assert error <= 1e-3, (reader, float(error))
