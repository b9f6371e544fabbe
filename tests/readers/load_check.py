"""Load a quantized folder with an engine's own reader and write its logits: run by the tests in
the reader environment (scripts/reader-env), which has no llmquant.

    python load_check.py JOBS.json TOKENS.pt

JOBS.json lists {"folder", "reader": "transformers" | "gptqmodel", "out", "dtype"}; each job's
`out` (.pt) receives {"logits": [B, T, vocab] float32, "report": {...}} or, when the reader
refuses the folder, {"error": "...", "report": {...}}. The report lists what the
loader said about the weights: missing / unexpected / mismatched keys (transformers'
`output_loading_info`), every log record that mentions "newly initialized", "not used",
"mismatch", "missing" or "unexpected", the classes of the model's linear layers, and the
versions of the reader packages.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
import warnings

import torch

WORDS = ("newly initialized", "not used", "mismatch", "missing", "unexpected", "were not", "not initialized")


class Collect(logging.Handler):
    """Keeps every log record that reports weights the loader did not match."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if any(word in text.lower() for word in WORDS):
            self.lines.append(f"{record.name}: {text[:400]}")


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "compressed-tensors", "optimum", "gptqmodel", "llmquant"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = ""
    return out


def load(folder: str, reader: str, dtype: torch.dtype, tokens: torch.Tensor) -> dict:
    """{"logits": [B, T, vocab] float32, "report": {...}} or {"error": "Type: message", "report": {...}}."""
    collect = Collect()
    logging.getLogger().addHandler(collect)
    report: dict = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if reader == "transformers":
                from transformers import AutoModelForCausalLM

                model, info = AutoModelForCausalLM.from_pretrained(
                    folder, dtype=dtype, output_loading_info=True
                )
                report["loading_info"] = {k: sorted(map(str, v)) for k, v in info.items()}
            else:
                from gptqmodel import BACKEND, GPTQModel

                model = GPTQModel.load(folder, device="cpu", backend=BACKEND.TORCH, dtype=dtype).model
        report["log"] = collect.lines + [
            str(w.message)[:400] for w in caught if any(x in str(w.message).lower() for x in WORDS)
        ]
        report["classes"] = sorted(
            {type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj") or n == "lm_head"}
        )
        report["quantized_modules"] = sorted(
            n for n, m in model.named_modules() if hasattr(m, "qweight") or hasattr(m, "weight_packed")
        )
        with torch.no_grad():
            logits = model(tokens).logits.float()
        return {"logits": logits, "report": report}
    except Exception as error:  # the test decides whether this reader was expected to refuse
        report["log"] = collect.lines
        return {"error": f"{type(error).__name__}: {str(error)[:2000]}", "report": report}
    finally:
        logging.getLogger().removeHandler(collect)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("jobs", help="JSON list of {folder, reader, out, dtype}")
    parser.add_argument("tokens", help="a .pt file holding [B, T] int64 token ids")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()
    hf_logging.disable_default_handler()
    logging.getLogger().setLevel(logging.INFO)
    tokens = torch.load(args.tokens)
    for job in json.loads(open(args.jobs).read()):
        result = load(job["folder"], job["reader"], getattr(torch, job.get("dtype", "float32")), tokens)
        result["report"]["versions"] = versions()
        result["report"]["llmquant_imported"] = "llmquant" in sys.modules
        torch.save(result, job["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
