"""Mixture-of-Experts models and checkpoints that transformers 5 loads through conversion rules.

Tiny random models built from transformers' own config classes and written by its own
`save_pretrained` (per-expert keys, Mixtral's `block_sparse_moe`, GPT-NeoX's `embed_out`), then
quantized through the CLI and compared with the in-memory `quantize_` of the same model.
"""

import shutil
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPTNeoXConfig,
    MixtralConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

import llmquant
from llmquant import QuantConfig
from llmquant.calibration.experts import calibrate_experts
from llmquant.calibration.hessian import input_hessian
from llmquant.checkpoint.conversion import Conversion, ConvertedReader, per_expert_rows
from llmquant.checkpoint.source import TensorReader, tensor_specs, weight_files
from llmquant.cli import main
from llmquant.methods.compose import resolve
from llmquant.methods.grid import dequantize
from llmquant.nn.experts import QuantExperts
from llmquant.nn.linear import QuantLinear

from ..conftest import SHARED_DATA, STORIES
from ..formats.test_formats import _ct_scheme as ct_scheme
from ..gptq_reader import dequantize_gptq

CALIB = SHARED_DATA / "c4-calibration-sample.txt"
# hidden 128; expert intermediate 64, so at g128 down_proj's K = 64 is one short group (llmquant's
# layout holds it, the GPTQ / compressed-tensors exports refuse it)
EXPERTS, LAYERS, HIDDEN = 4, 2, 128
COMMON = dict(vocab_size=512, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4)
COMMON |= dict(num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
FAMILIES = {
    "mixtral": lambda: MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=EXPERTS, num_experts_per_tok=2),
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **COMMON,
        head_dim=32,
        intermediate_size=64,
        moe_intermediate_size=64,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
    ),
    # shared expert + its sigmoid gate (an nn.Linear router kept in float)
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **COMMON,
        intermediate_size=64,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=512, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=256
    ),
}


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """{family: save_pretrained folder} of tiny float32 models, with stories260k's tokenizer."""
    folders = {}
    for family, make in FAMILIES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make())
        folder = tmp_path_factory.mktemp(family) / "float"
        model.save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            shutil.copy(STORIES / name, folder / name)
        folders[family] = folder
    return folders


def stored_names(folder: Path) -> list[str]:
    names = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            names += list(handle.keys())
    return names


def in_memory(folder: Path, config: QuantConfig):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    calibration = None
    if config.method != "rtn":
        tokenizer = AutoTokenizer.from_pretrained(folder)
        calibration = llmquant.load_calibration(tokenizer, CALIB, 4, 32, 0)
    return llmquant.quantize_(model, config, progress=False, calibration=calibration)


def logits(model) -> torch.Tensor:
    tokens = torch.arange(2 * 24).reshape(2, 24) * 7 % 512
    with torch.no_grad():
        return model(tokens).logits


def cli_quantize(src: Path, out: Path, config: QuantConfig, *extra) -> int:
    args = ["quantize", src, "-o", out, "--bits", config.bits, "--group-size", config.group_size, "--quiet"]
    args += ["--method", config.method, "--calib", CALIB, "--nsamples", 4, "--calib-seqlen", 32, *extra]
    return run_cli(*args, *(["--sym"] if config.sym else []))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_neox"])
def test_conversion_reads_what_from_pretrained_loads(saved, family):
    """Every model tensor read through transformers' rules equals what from_pretrained loads, and
    the per-expert names of the way back are exactly the keys save_pretrained wrote."""
    folder = saved[family]
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    files = weight_files(folder)
    specs = tensor_specs(files)
    conversion = Conversion(loaded, [spec.name for spec in specs])
    assert conversion.renames_anything
    reader = ConvertedReader(TensorReader(files), conversion, specs)
    expected = loaded.state_dict()
    assert reader.names == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(reader.read([name])[name], tensor), name
    merged = [name for name, t in expected.items() if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(merged) == (0 if family == "gpt_neox" else 2 * LAYERS)
    per_expert = {r.name for name in merged for r in per_expert_rows(loaded, name, tuple(expected[name].shape))}
    assert per_expert == {n for n in stored_names(folder) if ".experts." in n}


@pytest.mark.parametrize(
    ("family", "method", "group_size"),
    [
        ("mixtral", "rtn", 128),
        ("mixtral", "gptq", 32),
        ("qwen3_moe", "rtn", 32),
        ("qwen3_moe", "gptq", 128),
        ("qwen2_moe", "rtn", 128),
        ("qwen2_moe", "gptq", 32),
    ],
)
def test_moe_cli_loads_and_equals_quantize_(saved, tmp_path, family, method, group_size):
    config = QuantConfig(bits=4, group_size=group_size, method=method)
    out = tmp_path / "q"
    assert cli_quantize(saved[family], out, config) == 0

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = in_memory(saved[family], config)
    float_model = AutoModelForCausalLM.from_pretrained(saved[family], dtype=torch.float32)
    experts = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantExperts)}
    assert len(experts) == LAYERS  # every MoE block's experts, each matrix of each expert:
    for name, module in experts.items():
        floats = float_model.get_submodule(name)
        for proj in ("gate_up_proj", "down_proj"):
            weight = getattr(floats, proj).detach()
            got = module.dequantize(proj, torch.float32)
            assert got.shape == weight.shape
            for expert in range(EXPERTS):  # each expert's own matrix (not another expert's), int4-close
                error = (got[expert] - weight[expert]).norm() / weight[expert].norm()
                others = min((got[expert] - weight[e]).norm() / weight[e].norm() for e in range(EXPERTS) if e != expert)
                assert error < 0.2 < others, (name, proj, expert, error, others)
    stored = stored_names(out)
    assert sum(n.endswith("_qweight") for n in stored) == 2 * LAYERS
    assert all(f"model.layers.{i}.mlp.gate.weight" in stored for i in range(LAYERS))  # routers stay float
    if family == "qwen2_moe":
        block = loaded.model.layers[0].mlp
        assert isinstance(block.shared_expert.gate_proj, QuantLinear)
        assert isinstance(block.shared_expert_gate, torch.nn.Linear)
    assert torch.equal(logits(loaded), logits(reference))
    if method == "gptq" and group_size == 32:  # save_pretrained writes Mixtral's experts as block_sparse_moe
        reference.save_pretrained(tmp_path / "saved")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
        assert torch.equal(logits(again), logits(reference))
        fmt = "gptq" if family == "qwen2_moe" else "compressed-tensors"  # routers float, not GPTQ `dynamic`
        assert run_cli("convert", tmp_path / "saved", "-o", tmp_path / "export", "--format", fmt, "--quiet") == 0
        assert torch.equal(logits(llmquant.load(tmp_path / "export", dtype=torch.float32)), logits(reference))
    if method == "rtn":  # quantize-on-load gives the same model too
        on_load = AutoModelForCausalLM.from_pretrained(saved[family], dtype=torch.float32, quantization_config=config)
        assert torch.equal(logits(on_load), logits(reference))


@pytest.mark.parametrize(("family", "fmt"), [("mixtral", "gptq"), ("qwen2_moe", "compressed-tensors")])
def test_moe_exports_use_per_expert_names_and_read_back_bit_exactly(saved, tmp_path, family, fmt):
    config = QuantConfig(bits=4, group_size=32, sym=True)  # the layout does not depend on the method
    native, export, back = tmp_path / "native", tmp_path / "export", tmp_path / "back"
    assert cli_quantize(saved[family], native, config) == 0
    assert cli_quantize(saved[family], export, config, "--format", fmt) == 0

    # the names save_pretrained writes for the float experts, which vLLM's fused-MoE loaders read
    float_stems = {n.removesuffix(".weight") for n in stored_names(saved[family]) if ".experts." in n}
    member = "qweight" if fmt == "gptq" else "weight_packed"
    exported = stored_names(export)
    assert {n.rpartition(".")[0] for n in exported if ".experts." in n and n.endswith(member)} == float_stems
    assert not any("_qweight" in n for n in exported)

    native_model = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32)
    # each per-expert tensor, decoded by a reader sharing no code with llmquant, is its rows of the
    # expert's matrix (w1/gate_proj: gate rows, w3/up_proj: up rows, w2/down_proj: down_proj)
    rows = {"w1": ("gate_up_proj", 0), "gate_proj": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1)}
    rows |= {"up_proj": ("gate_up_proj", 1), "w2": ("down_proj", 0), "down_proj": ("down_proj", 0)}
    files = {n: path for path in export.glob("*.safetensors") for n in stored_names(path.parent)}
    for stem in sorted(float_stems):
        layer, _, rest = stem.partition(".experts.")
        expert, _, leaf = rest.partition(".")
        proj, half = rows[leaf]
        with safe_open(str(files[f"{stem}.{member}"]), framework="pt") as handle:
            tensors = {n.rpartition(".")[2]: handle.get_tensor(n) for n in handle.keys() if n.startswith(stem + ".")}
        if fmt == "gptq":
            decoded = dequantize_gptq(tensors, 4).float()
        else:
            decoded = PackedQuantizationCompressor.decompress(tensors, ct_scheme(config))["weight"]
        module = native_model.get_submodule(layer.replace("block_sparse_moe", "mlp") + ".experts")
        full = module.dequantize(proj, torch.float32)[int(expert)]
        expected = full.chunk(2)[half] if proj == "gate_up_proj" else full
        assert torch.equal(decoded, expected), stem
    read_back = llmquant.load(export, dtype=torch.float32)
    assert torch.equal(logits(read_back), logits(native_model))
    assert run_cli("convert", export, "-o", back, "--format", "llmquant", "--quiet") == 0
    expected = {n: t for n, t in native_model.state_dict().items() if "experts" in n}
    converted = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).state_dict()
    assert expected and all(torch.equal(converted[n], t) for n, t in expected.items())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_gpt_neox_head_renamed_by_transformers_rules(saved, tmp_path, method):
    """Pythia-style checkpoints store the head as embed_out; the model calls it lm_head."""
    config = QuantConfig(bits=4, group_size=32, method=method)
    out = tmp_path / "q"
    assert cli_quantize(saved["gpt_neox"], out, config) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    quantized = [n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 4 * LAYERS and "lm_head.weight" in stored_names(out)
    assert torch.equal(logits(loaded), logits(in_memory(saved["gpt_neox"], config)))


def test_methods_that_cannot_handle_experts_are_refused_before_work(saved, tmp_path, capsys):
    code = cli_quantize(saved["mixtral"], tmp_path / "q", QuantConfig(method="gptq-rot"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "model.layers.0.mlp.experts" in err and not (tmp_path / "q").exists()


@torch.no_grad()
def test_every_expert_is_calibrated_on_all_tokens():
    """An expert that no token is routed to gets the same statistics as any other: each expert's
    gate_up is GPTQ on H(all tokens), its down_proj GPTQ on H(act(gate) * up of all tokens)."""
    torch.manual_seed(0)
    config = MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=EXPERTS)
    experts = AutoModelForCausalLM.from_config(config).model.layers[0].mlp.experts.float()
    floats = {p: getattr(experts, p).detach().clone() for p in ("gate_up_proj", "down_proj")}
    x = torch.randn(64, HIDDEN)
    method = resolve("gptq")
    seen = []

    def quantize(proj, expert, weight, h):
        seen.append((proj, expert))
        return dequantize(method.quantize(weight, h, 4, 32, False, torch.float32, proj), 4, 32)

    calibrate_experts(experts, x, input_hessian, quantize)
    assert seen == [(p, e) for e in range(EXPERTS) for p in ("gate_up_proj", "down_proj")]
    for expert in range(EXPERTS):
        gate_up = quantize("gate_up_proj", expert, floats["gate_up_proj"][expert], input_hessian(x))
        assert torch.equal(experts.gate_up_proj[expert], gate_up)
        gate, up = (x @ gate_up.t()).chunk(2, dim=-1)
        inner = experts.act_fn(gate) * up
        down = quantize("down_proj", expert, floats["down_proj"][expert], input_hessian(inner))
        assert torch.equal(experts.down_proj[expert], down)


@torch.no_grad()
def test_quant_experts_forward_matches_float_math_on_every_kernel_path(monkeypatch):
    """The routed forward equals the float experts' own forward run on the dequantized weights
    (the torch path on CPU, float64), and the Triton path (interpreter on CPU, per expert) agrees."""
    torch.manual_seed(0)
    config = MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=EXPERTS)
    floats = AutoModelForCausalLM.from_config(config).model.layers[0].mlp.experts.float()
    quantized = QuantExperts.like(floats, 4, 32, False)
    for proj in ("gate_up_proj", "down_proj"):
        for expert in range(EXPERTS):
            weight = getattr(floats, proj)[expert]
            quantized.load_packed(proj, expert, llmquant.methods.codes.quantize_weight(weight, 4, 32, False))
    x = torch.randn(6, HIDDEN)
    top_k = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 0], [1, 1]])  # experts 2, 3 never routed
    weights = torch.rand(6, 2)
    reference = floats.double()
    reference.config._experts_implementation = "eager"  # transformers' own loop (grouped_mm has no float64)
    for proj in ("gate_up_proj", "down_proj"):
        getattr(reference, proj).data.copy_(quantized.dequantize(proj, torch.float64))
    expected = reference(x.double(), top_k, weights.double())
    torch.testing.assert_close(quantized.double()(x.double(), top_k, weights.double()), expected)
    quantized.float()
    torch.testing.assert_close(quantized(x, top_k, weights).double(), expected, rtol=1e-4, atol=1e-4)
    monkeypatch.setenv("LLMQUANT_KERNEL", "triton")
    monkeypatch.setenv("LLMQUANT_AUTOTUNE", "0")
    torch.testing.assert_close(
        quantized.half()(x.half(), top_k, weights.half()).double(), expected, rtol=2e-2, atol=2e-2
    )


def test_dequantize_turns_experts_back_into_float_experts(saved, tmp_path):
    """dequantize_ gives float experts of the model's own class holding the dequantized weights:
    the same logits, and save_pretrained -> plain from_pretrained reads it as a float model."""
    model = in_memory(saved["mixtral"], QuantConfig(group_size=32))
    quantized = logits(model)
    llmquant.dequantize_(model, torch.float32)
    assert not any(isinstance(m, QuantExperts | QuantLinear) for m in model.modules())
    experts = model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "MixtralExperts" and experts.gate_up_proj.shape == (EXPERTS, 128, HIDDEN)
    # not bit-equal: the CPU path runs an expert's few routed rows through the bf16 int4 kernel
    assert ((logits(model) - quantized).norm() / quantized.norm()).item() < 5e-3
    model.save_pretrained(tmp_path / "float")
    again, info = AutoModelForCausalLM.from_pretrained(tmp_path / "float", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(logits(again), logits(model))


def test_skipped_experts_stay_float(saved):
    model = in_memory(saved["qwen2_moe"], QuantConfig(group_size=32, modules_to_not_convert=["lm_head", "experts"]))
    assert not any(isinstance(m, QuantExperts) for m in model.modules())
    assert isinstance(model.model.layers[0].mlp.shared_expert.up_proj, QuantLinear)
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32


def test_experts_layouts_quantexperts_cannot_run_are_refused_naming_them():
    """gpt-oss stores experts transposed with biases: refused (one line, naming the module and
    how to keep it float), never run with the wrong layout or silently left float."""
    from transformers import GptOssConfig

    config = GptOssConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(
        ValueError, match=r"^model\.layers\.0\.mlp\.experts \(GptOssExperts\).*is_transposed=True.*--skip"
    ) as error:
        llmquant.quantize_(model, QuantConfig(group_size=32), progress=False)
    assert "\n" not in str(error.value)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # all or nothing
