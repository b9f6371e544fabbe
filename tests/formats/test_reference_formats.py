"""llmquant's exports against what the formats' own writers write for the same scheme on the same
model: llm-compressor (`oneshot` + QuantizationModifier) for compressed-tensors and GPTQModel's
quantization output for GPTQ.

The reference checkpoints are made by scripts/reference_exports.py in an environment without
llmquant (both writers run on CPU, but installing them costs more than CI's budget), for the tiny
random Llama of tests/tiny_llama.py; their structure (every tensor's name, dtype and shape, the
`quantization_config`, the writer's version) is pinned in tests/data/reference_structure.json.
Each test exports the same model with llmquant and compares: tensor names, dtypes and shapes
exactly, and the config keys and the values readers act on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from llmquant.cli import main
from tests.tiny_llama import build_tiny_llama

PINNED = json.loads((Path(__file__).resolve().parents[1] / "data" / "reference_structure.json").read_text())

# reference scheme -> (format, llmquant quantize arguments)
MATCHING = {
    "ct-w4-g128-sym": ("compressed-tensors", ["--bits", "4", "--group-size", "128", "--sym"]),
    "ct-w4-g128-asym": ("compressed-tensors", ["--bits", "4", "--group-size", "128"]),
    "ct-w4-g64-asym": ("compressed-tensors", ["--bits", "4", "--group-size", "64"]),
    "ct-w8-channel-sym": ("compressed-tensors", ["--bits", "8", "--group-size", "-1", "--sym"]),
    "ct-w8-g32-asym": ("compressed-tensors", ["--bits", "8", "--group-size", "32"]),
    "ct-w4-g128-sym-skip-down": ("compressed-tensors", ["--bits", "4", "--group-size", "128", "--sym",
                                                        "--skip", "down_proj", "lm_head"]),
    "gptq-w4-g128-sym": ("gptq", ["--bits", "4", "--group-size", "128", "--sym"]),
    "gptq-w4-g128-asym-v2": ("gptq", ["--bits", "4", "--group-size", "128"]),
    "gptq-w8-g64-sym": ("gptq", ["--bits", "8", "--group-size", "64", "--sym"]),
    "gptq-w4-g128-sym-skip-down": ("gptq", ["--bits", "4", "--group-size", "128", "--sym", "--skip", "down_proj",
                                            "lm_head"]),
}

# compressed-tensors: the weight-quantization fields a reader acts on (all must be equal)
CT_WEIGHT_FIELDS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "actorder")
# GPTQ: the fields transformers/optimum, GPTQModel and vLLM act on (all must be equal)
GPTQ_FIELDS = (
    "quant_method", "bits", "group_size", "desc_act", "sym", "lm_head", "checkpoint_format", "format", "method",
    "pack_dtype",
)


def _structure(folder: Path) -> dict[str, list]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                t = handle.get_slice(name)
                tensors[name] = [t.get_dtype(), list(t.get_shape())]
    return tensors


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def ours(tiny_llama, tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """{scheme: (tensor structure, quantization_config)} of llmquant's export of each scheme."""
    root = tmp_path_factory.mktemp("ours")
    out = {}
    for scheme, (fmt, args) in MATCHING.items():
        folder = root / scheme
        assert main(["quantize", str(tiny_llama), "-o", str(folder), "--format", fmt, "--quiet", *args]) == 0
        out[scheme] = (_structure(folder), json.loads((folder / "config.json").read_text())["quantization_config"])
    return out


def test_every_matched_scheme_is_pinned():
    assert set(MATCHING) <= set(PINNED), sorted(set(MATCHING) - set(PINNED))


@pytest.mark.parametrize("scheme", sorted(MATCHING))
def test_tensors_match_the_reference_writer(scheme, ours):
    tensors, _ = ours[scheme]
    reference = PINNED[scheme]["tensors"]
    # GPTQ writers store a zero bias on bias-free layers only in some versions: not part of the format
    reference = {k: v for k, v in reference.items() if not (scheme.startswith("gptq") and k.endswith(".bias"))}
    assert sorted(set(tensors) ^ set(reference)) == [], PINNED[scheme]["writer"]
    mismatched = {k: (tensors[k], reference[k]) for k in tensors if tensors[k] != reference[k]}
    if scheme.startswith("gptq"):
        # GPTQModel 7.7 stores the linears it keeps in float (dynamic "-:" rules) in bf16 whatever the
        # model's dtype; llmquant keeps the source dtype (fp16 here): shapes must still agree
        mismatched = {k: v for k, v in mismatched.items() if not (k.endswith(".weight") and v[0][1] == v[1][1])}
    assert mismatched == {}, PINNED[scheme]["writer"]


@pytest.mark.parametrize("scheme", sorted(s for s in MATCHING if s.startswith("ct-")))
def test_compressed_tensors_config_matches_llm_compressor(scheme, ours):
    _, qc = ours[scheme]
    ref = PINNED[scheme]["quantization_config"]
    for key in ("quant_method", "format", "quantization_status", "kv_cache_scheme"):
        assert qc.get(key) == ref.get(key), key
    assert sorted(qc["ignore"]) == sorted(ref["ignore"])
    (group,) = qc["config_groups"].values()
    (ref_group,) = ref["config_groups"].values()
    assert group["targets"] == ref_group["targets"] and group.get("format") == ref_group.get("format")
    assert group["input_activations"] == ref_group["input_activations"] is None
    for field in CT_WEIGHT_FIELDS:
        assert group["weights"][field] == ref_group["weights"][field], field
    assert set(group["weights"]) <= set(ref_group["weights"]), set(group["weights"]) - set(ref_group["weights"])


@pytest.mark.parametrize("scheme", sorted(s for s in MATCHING if s.startswith("gptq-")))
def test_gptq_config_matches_gptqmodel(scheme, ours):
    _, qc = ours[scheme]
    ref = PINNED[scheme]["quantization_config"]
    for field in GPTQ_FIELDS:
        assert qc.get(field) == ref.get(field), (field, qc.get(field), ref.get(field))
    # top-level keys: GPTQModel's, plus modules_in_block_to_quantize where layers are kept in float
    # (transformers/optimum read that, not `dynamic`)
    assert set(qc) - {"modules_in_block_to_quantize"} == set(ref), set(qc) ^ set(ref)
    assert isinstance(ref.get("meta"), dict) and set(qc["meta"]) <= set(ref["meta"]) | {"method"}
    if "dynamic" in ref:
        # the same modules kept in float: GPTQModel's rule (a regex) matches exactly our modules
        import re

        modules = [m for m in (k.rsplit(".", 1)[0] for k in PINNED[scheme]["tensors"]) if ".layers." in m]
        kept_ref = {m for m in modules if any(re.match(r[2:], m) for r in ref["dynamic"] if r.startswith("-:"))}
        kept_ours = {m for m in modules if any(re.match(r[2:], m) for r in qc["dynamic"] if r.startswith("-:"))}
        assert kept_ref == kept_ours and kept_ours
