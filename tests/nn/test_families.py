"""Every common decoder family, end to end: tiny random models built from transformers' own config
classes, saved with save_pretrained, quantized through the CLI, loaded with a plain from_pretrained,
compared with the in-memory quantize_, exported to gptq and compressed-tensors and read back.

The family list is data (`FAMILIES`: one line per family); a family whose residual stream cannot
be rotated names the reason gptq-rot must give. With LLMQUANT_SUPPORT_TABLE=path set, each cell's
outcome is recorded there as JSON (scripts/support_table.py renders docs/METHODS.md's table from it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

import llmquant
from llmquant import QuantConfig
from llmquant.calibration.capture import blocks_inputs, decoder_blocks
from llmquant.calibration.data import load_calibration
from llmquant.cli import main

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # as in conftest.py
STORIES = SHARED_DATA / "stories260k"
CALIB = SHARED_DATA / "c4-calibration-sample.txt"
NSAMPLES, SEQLEN = 4, 32
GROUP = 32
METHODS = ("rtn", "gptq", "gptq-rot")
FORMATS = ("gptq", "compressed-tensors")
LAYERNORM = "LayerNorm subtracts each token's mean"
POST_NORMS = "norms after each sublayer"
MOE = "Mixture-of-Experts layers"

# Shapes every family shares: K of every linear a multiple of the group size (the export formats
# need it), two blocks, grouped-query attention where the family has it.
DIMS = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_position_embeddings": 256}
SLIDING = {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}
EXPERTS = {"num_experts_per_tok": 2, "moe_intermediate_size": 64, "tie_word_embeddings": False}


@dataclass(frozen=True)
class Family:
    """One row of the matrix: a transformers model type and the config of its tiny model.

    not_rotatable: the text gptq-rot's refusal must contain (None: gptq-rot must work)."""

    name: str
    model_type: str
    config: dict = field(default_factory=dict)
    not_rotatable: str | None = None


FAMILIES = (
    Family("Llama", "llama", {**DIMS, **ATTENTION, **TOKENS, "tie_word_embeddings": True}),
    Family("Mistral", "mistral", {**DIMS, **ATTENTION, **TOKENS, "sliding_window": 16}),
    Family("Qwen2", "qwen2", {**DIMS, **ATTENTION, **TOKENS}),
    Family("Qwen3", "qwen3", {**DIMS, **ATTENTION, **TOKENS}),
    Family("Gemma", "gemma", {**DIMS, **ATTENTION, **TOKENS}),
    Family("Gemma-2", "gemma2", {**DIMS, **ATTENTION, **TOKENS, **SLIDING}, not_rotatable=POST_NORMS),
    Family("Gemma-3", "gemma3_text", {**DIMS, **ATTENTION, **TOKENS, **SLIDING}, not_rotatable=POST_NORMS),
    Family("Phi-3", "phi3", {**DIMS, **ATTENTION, **TOKENS}),
    Family("OLMo-2", "olmo2", {**DIMS, **ATTENTION, **TOKENS}, not_rotatable=POST_NORMS),
    Family("Granite", "granite", {**DIMS, **ATTENTION, **TOKENS}),
    Family("GPT-NeoX", "gpt_neox", {**DIMS, **TOKENS, "num_attention_heads": 4}, LAYERNORM),
    Family("Mixtral", "mixtral", {**DIMS, **ATTENTION, **TOKENS, "num_local_experts": 4, **EXPERTS}, MOE),
    Family("Qwen3-MoE", "qwen3_moe", {**DIMS, **ATTENTION, **TOKENS, "num_experts": 4, **EXPERTS}, MOE),
    # shared expert beside the routed ones, with its nn.Linear gate (a router: kept in float)
    Family(
        "Qwen2-MoE",
        "qwen2_moe",
        {**DIMS, **ATTENTION, **TOKENS, "num_experts": 4, **EXPERTS, "shared_expert_intermediate_size": 128},
        MOE,
    ),
    Family(
        "OPT",
        "opt",
        {**TOKENS, "vocab_size": 512, "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2}
        | {"num_attention_heads": 4, "word_embed_proj_dim": 64},
        LAYERNORM,
    ),
    Family(
        "GPT-2",
        "gpt2",
        {"vocab_size": 512, "n_embd": 64, "n_inner": 128, "n_layer": 2, "n_head": 4, "n_positions": 256}
        | {"bos_token_id": 1, "eos_token_id": 2},
        LAYERNORM,
    ),
)
BY_NAME = {f.name: f for f in FAMILIES}


def _record(family: str, method: str, column: str, outcome: str) -> None:
    """Add one cell's outcome to the JSON file named by LLMQUANT_SUPPORT_TABLE (if set)."""
    path = os.environ.get("LLMQUANT_SUPPORT_TABLE")
    if not path:
        return
    path = Path(path)
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault(family, {}).setdefault(method, {})[column] = outcome
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def build(family: Family, folder: Path) -> Path:
    """save_pretrained of a random float32 model of `family` (seed 0) with stories260k's tokenizer
    (512 tokens). Norm weights are drawn too (a fresh model's are all 1, or all 0 for Gemma's
    1 + w norms), so that folding them into the linears is exercised."""
    config = AutoConfig.for_model(family.model_type, **family.config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 and "norm" in name and name.endswith("weight"):
                parameter.add_(0.2 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(STORIES / name, folder / name)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for these tiny matrices: on a loaded 2-core machine a second thread waiting
    at every small matmul made gptq's clipping search 20x slower (18 s against 0.9 s for a cell)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def family_dir(request, tmp_path_factory) -> Path:
    family = BY_NAME[request.param]
    return build(family, tmp_path_factory.mktemp(family.model_type) / "float")


@pytest.fixture(scope="module")
def tokens(family_dir) -> torch.Tensor:
    """The calibration tokens the CLI draws: through the family folder's tokenizer, which
    transformers may pick by model type (Qwen2's class tokenizes the same files differently)."""
    tokenizer = AutoTokenizer.from_pretrained(family_dir)
    return load_calibration(tokenizer, CALIB, NSAMPLES, SEQLEN, seed=0).tokens


def expected_layers(model: torch.nn.Module) -> set[str]:
    """The linear layers (nn.Linear, GPT-2's Conv1D) a default run quantizes: all but the head and
    MoE routers (Qwen2-MoE's shared_expert_gate, an nn.Linear [1, H])."""
    head = model.get_output_embeddings()
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D) and module is not head and not name.endswith("expert_gate")
    }


def expected_experts(model: torch.nn.Module) -> set[str]:
    """The 3D experts tensors ("<experts>.gate_up_proj" [E, 2I, H], "<experts>.down_proj" [E, H, I])
    a default run quantizes, each expert's matrix group-wise."""
    return {
        name.removesuffix(".weight")
        for name, parameter in model.named_parameters()
        if ".experts." in name and parameter.dim() == 3
    }


def stored_names(folder: Path) -> set[str]:
    names = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            names.update(handle.keys())
    return names


def quantize_cli(src: Path, out: Path, method: str) -> int:
    calib = ["--calib", str(CALIB), "--nsamples", str(NSAMPLES), "--calib-seqlen", str(SEQLEN), "--seed", "0"]
    flags = ["--group-size", str(GROUP), "--method", method, "--quiet", *calib]
    return main(["quantize", str(src), "-o", str(out), *flags])


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens[:2]).logits


@pytest.mark.parametrize(
    ("family_dir", "method"),
    [pytest.param(f.name, m, id=f"{f.model_type}-{m}") for f in FAMILIES for m in METHODS],
    indirect=["family_dir"],
)
def test_family_method(family_dir, method, tokens, tmp_path, capsys, request, monkeypatch):
    """One cell: `llmquant quantize` quantizes every linear but the head (or refuses with exit 2 and
    one line naming the family and the reason, before loading calibration data, writing nothing);
    a plain from_pretrained of the output gives the logits of the in-memory quantize_ of the same
    model; gptq and compressed-tensors exports read back with llmquant.load give the same logits."""
    family = BY_NAME[request.node.callspec.params["family_dir"]]
    out = tmp_path / "q"
    loads = []  # calibration loads: a refusal must come before any
    load = llmquant.calibration.data.from_arguments
    monkeypatch.setattr(llmquant.calibration.data, "from_arguments", lambda *args: loads.append(1) or load(*args))
    capsys.readouterr()
    code = quantize_cli(family_dir, out, method)
    error = capsys.readouterr().err
    if method == "gptq-rot" and family.not_rotatable:
        lines = [line for line in error.splitlines() if line.startswith("llmquant")]
        assert code == 2 and len(lines) == 1, error
        assert f"{family.model_type}:" in lines[0] and family.not_rotatable in lines[0], lines[0]
        assert not out.exists() and not loads
        reason = re.split("cannot (?:rotate|handle) this family: ", lines[0])[-1]
        _record(family.name, method, "quantize", "refused: " + reason)
        return
    assert code == 0, error
    float_model = AutoModelForCausalLM.from_pretrained(family_dir, dtype=torch.float32).eval()
    expected = expected_layers(float_model)
    stored = stored_names(out)
    quantized = {name.removesuffix(".qweight") for name in stored if name.endswith(".qweight")}
    assert quantized == expected and len(expected) >= 4 * 2  # GPT-2: 4 per block
    assert not any(f"{name}.weight" in stored for name in expected)  # no float copy left beside them
    experts = expected_experts(float_model)
    assert {name.removesuffix("_qweight") for name in stored if name.endswith("_qweight")} == experts
    assert not experts & stored  # no float copy left beside them
    if family.not_rotatable == MOE:
        assert len(experts) == 2 * 2  # gate_up_proj and down_proj of both blocks
    _record(family.name, method, "quantize", "works")

    config = QuantConfig(bits=4, group_size=GROUP, method=method)
    calibration = tokens if method != "rtn" else None
    llmquant.quantize_(float_model, config, calibration=calibration, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert sum(isinstance(m, llmquant.QuantLinear) for m in loaded.modules()) == len(expected)
    assert sum(type(m).__name__ == "QuantExperts" for m in loaded.modules()) == len(experts) // 2
    reference = logits(float_model, tokens)
    assert torch.isfinite(reference).all()
    assert torch.equal(logits(loaded, tokens), reference)
    _record(family.name, method, "llmquant", "works")

    for fmt in FORMATS:
        exported = tmp_path / fmt
        assert main(["convert", str(out), "-o", str(exported), "--format", fmt, "--quiet"]) == 0, capsys.readouterr()
        again = llmquant.load(exported).eval()
        assert torch.equal(logits(again, tokens), reference), fmt
        _record(family.name, method, fmt, "works")


@pytest.mark.parametrize("family_dir", ["Gemma-2", "Gemma-3"], indirect=True)
def test_each_block_gets_its_own_inputs(family_dir, tokens):
    """Families mixing sliding-window and global attention pass each block its own mask (Gemma-3:
    and rotary embeddings): the captured inputs differ between the two blocks, and running the
    float blocks one after the other on them reproduces the model's last hidden state."""
    model = AutoModelForCausalLM.from_pretrained(family_dir, dtype=torch.float32).eval()
    _, blocks = decoder_blocks(model)
    with torch.no_grad():
        hidden, kwargs = blocks_inputs(model, blocks, tokens)
        masks = [kw["attention_mask"] for kw in kwargs]  # a full-attention mask may be None (sdpa's is_causal)
        assert masks[0] is not masks[1] and not (masks[1] is not None and torch.equal(masks[0], masks[1]))
        for block, kw in zip(blocks, kwargs, strict=True):
            hidden = block(hidden, **kw)
        expected = model.model(input_ids=tokens).last_hidden_state  # after the final norm
    assert torch.allclose(model.model.norm(hidden), expected, rtol=1e-5, atol=1e-5)


def test_a_run_that_quantizes_nothing_is_refused(stories_dir, tmp_path, capsys):
    """Skipping every linear layer leaves nothing to quantize: exit 2 and one line, nothing written."""
    skip = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    code = main(["quantize", str(stories_dir), "-o", str(tmp_path / "q"), "--group-size", "32", "--skip", *skip])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error and "llama: no layer to quantize" in error, error
    assert not (tmp_path / "q").exists()


def test_gemma_rotation_folds_one_plus_w_norms(tmp_path_factory):
    """Gemma's norms scale by 1 + w: gptq-rot folds 1 + w into the linears and the head and leaves
    w = 0 (scale 1), and the rotated model still computes the float model's function: at int8 its
    logits stay close to the float logits (folding w instead of 1 + w would not)."""
    folder = build(BY_NAME["Gemma"], tmp_path_factory.mktemp("gemma-fold") / "float")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calibration = load_calibration(tokenizer, CALIB, NSAMPLES, SEQLEN, seed=0).tokens
    reference = logits(model, calibration)
    llmquant.quantize_(model, QuantConfig(bits=8, group_size=GROUP, method="gptq-rot"), calibration=calibration)
    norms = [m.weight for n, m in model.named_modules() if n.endswith("norm") and m.weight.numel() == 64]
    assert len(norms) == 2 * 2 + 1 and all(torch.equal(w, torch.zeros(64)) for w in norms)
    error = ((logits(model, calibration) - reference).norm() / reference.norm()).item()
    assert error < 0.02, error
