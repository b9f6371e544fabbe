"""Write reference checkpoints with the formats' own writers and record their structure.

Run in an environment WITHOUT llmquant that has llm-compressor (compressed-tensors) and/or
GPTQModel (GPTQ) installed, e.g.:

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 llmcompressor gptqmodel
    GPTQMODEL_CPU_WORKERS=2 /tmp/ref/bin/python scripts/reference_exports.py --out /tmp/reference

(run it from a scratch folder's parent if you mind GPTQModel's `logs/` folder in the working
directory; GPTQModel 7.7 needs GPTQMODEL_CPU_WORKERS >= 2 on a 1-2 core machine.)

For the tiny random Llama of tests/tiny_llama.py (fp16) it writes, per scheme, a folder and one
entry of tests/data/reference_structure.json: every tensor's name, dtype and shape, the
`quantization_config` of config.json, and the writer's version. tests/formats/test_reference_formats.py
compares llmquant's exports of the same model against those entries (names, shapes, dtypes and
config keys exactly), and, where llmquant and the writer compute the same RTN codes, the values.
Both writers run on CPU in about a minute; the tests read the pinned JSON, so CI does not install
them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]


def tiny_llama():
    spec = importlib.util.spec_from_file_location("tiny_llama", ROOT / "tests" / "tiny_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def structure(folder: Path, writer: str) -> dict:
    """{"tensors": {name: [dtype, shape]}, "quantization_config": {...}, "writer": "name version"}."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                t = handle.get_slice(name)
                tensors[name] = [t.get_dtype(), list(t.get_shape())]
    config = json.loads((folder / "config.json").read_text())
    return {
        "tensors": dict(sorted(tensors.items())),
        "quantization_config": config.get("quantization_config"),
        "writer": f"{writer} {importlib.metadata.version(writer)}",
    }


# scheme name -> (bits, group size (-1: channel), symmetric, ignore (regexes as llm-compressor takes them))
CT_SCHEMES = {
    "ct-w4-g128-sym": (4, 128, True, ["lm_head"]),
    "ct-w4-g128-asym": (4, 128, False, ["lm_head"]),
    "ct-w4-g64-asym": (4, 64, False, ["lm_head"]),
    "ct-w8-channel-sym": (8, -1, True, ["lm_head"]),
    "ct-w8-g32-asym": (8, 32, False, ["lm_head"]),
    "ct-w4-g128-sym-skip-down": (4, 128, True, ["lm_head", "re:.*down_proj$"]),
}


def run_llmcompressor(out: Path, model_dir: Path) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    results = {}
    for name, (bits, group, sym, ignore) in CT_SCHEMES.items():
        weights = QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=sym,
            strategy="group" if group != -1 else "channel",
            group_size=group if group != -1 else None,
            observer="minmax",
        )
        scheme = QuantizationScheme(targets=["Linear"], weights=weights)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16)
        recipe = QuantizationModifier(config_groups={"group_0": scheme}, ignore=ignore)
        oneshot(model=model, recipe=recipe)
        folder = out / name
        model.save_pretrained(folder, save_compressed=True)
        results[name] = structure(folder, "llmcompressor")
        print(f"{name}: {len(results[name]['tensors'])} tensors", flush=True)
    return results


# scheme name -> (bits, group size, symmetric, checkpoint format, dynamic)
GPTQ_SCHEMES = {
    "gptq-w4-g128-sym": (4, 128, True, "gptq", None),
    "gptq-w4-g128-asym": (4, 128, False, "gptq", None),
    "gptq-w4-g128-asym-v2": (4, 128, False, "gptq_v2", None),
    "gptq-w8-g64-sym": (8, 64, True, "gptq", None),
    "gptq-w4-g128-sym-skip-down": (4, 128, True, "gptq", {r"-:.*[.]down_proj$": {}}),
}


def run_gptqmodel(out: Path, model_dir: Path) -> dict:
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    calibration = [{"input_ids": torch.randint(3, 512, (1, 64)), "attention_mask": torch.ones(1, 64, dtype=torch.long)}
                   for _ in range(8)]
    results = {}
    for name, (bits, group, sym, fmt, dynamic) in GPTQ_SCHEMES.items():
        config = QuantizeConfig(bits=bits, group_size=group, sym=sym, desc_act=False, format=fmt, dynamic=dynamic)
        model = GPTQModel.load(str(model_dir), config, device="cpu")
        model.quantize(calibration, tokenizer=tokenizer)
        folder = out / name
        model.save(str(folder))
        results[name] = structure(folder, "gptqmodel")
        print(f"{name}: {len(results[name]['tensors'])} tensors", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the reference checkpoints")
    parser.add_argument("--writers", nargs="+", default=["llmcompressor", "gptqmodel"])
    parser.add_argument("--json", type=Path, default=ROOT / "tests" / "data" / "reference_structure.json")
    args = parser.parse_args()
    if importlib.util.find_spec("llmquant") is not None:
        print("run this in an environment without llmquant", file=sys.stderr)
        return 2
    model_dir = tiny_llama().build_tiny_llama(args.out / "tiny-llama")
    pinned = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if "llmcompressor" in args.writers:
        pinned.update(run_llmcompressor(args.out, model_dir))
    if "gptqmodel" in args.writers:
        pinned.update(run_gptqmodel(args.out, model_dir))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(sorted(pinned.items())), indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
