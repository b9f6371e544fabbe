"""``llmquant eval``: perplexity of quantized models against their floating-point baseline.

    llmquant eval OUT_DIR --baseline FP_DIR --dataset wikitext2 --seqlen 2048
    llmquant eval FP_DIR --configs int8-g128,int4-g128,int4-g128-sym --report evals/results/x

``llmquant/cli.py`` calls ``add_parser`` and ``run``; ``python -m llmquant.evals.cli`` works too.
Bad input raises ``EvalError``, which ``run`` prints as one line and turns into exit code 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from llmquant.errors import first_line, missing_module
from llmquant.methods.presets import METHOD_NAMES

from . import EvalError

if TYPE_CHECKING:  # torch loads on first use: `llmquant --help` must not import it
    import torch

VERSION_KEYS = ("python", "torch", "transformers", "llmquant", "triton", "datasets")

CI_METHOD = (
    "delta method over windows: paired per-window NLL differences d_w (model − baseline, summed over the "
    "window's tokens), D = Σd_w / Σn_w with ratio-estimator variance W/(W−1)·Σ(d_w − D·n_w)² / (Σn_w)², "
    "D ± 1.96·se mapped through Δppl = ppl_baseline·(exp(D) − 1)"
)


def add_parser(subparsers) -> None:
    """Add the ``eval`` subcommand and its flags to an argparse subparsers object."""
    p = subparsers.add_parser(
        "eval",
        help="perplexity of quantized models against their baseline",
        description="Score a saved quantized model against its baseline (--baseline), or quantize a "
        "floating-point model on the fly for each of --configs and score them all with the baseline.",
    )
    _add_arguments(p)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder: a saved quantized model, or the fp model with --configs")
    p.add_argument("--baseline", metavar="FP_DIR", help="floating-point model to compare against")
    p.add_argument(
        "--configs",
        metavar="LIST",
        help="comma-separated configs quantized from MODEL with llmquant.quantize_, e.g. "
        "int8-g128,int4-g64,int4-g128-sym,int4-g128-gptq (intB-gG[-sym][-METHOD], G a size or 'all', METHOD "
        f"{', '.join(METHOD_NAMES)}; rtn by default); MODEL is then also the baseline unless --baseline",
    )
    from llmquant.calibration.data import add_arguments as add_calibration_arguments

    add_calibration_arguments(p)
    d = p.add_argument_group("data")
    d.add_argument(
        "--dataset",
        default="wikitext2",
        help="wikitext2, a Hub dataset id[:config], or a "
        "local .jsonl/.json/.parquet (text field) or .txt file (default: wikitext2)",
    )
    d.add_argument("--split", default=None, help="Hub split (default: test)")
    d.add_argument("--text-field", default="text", help="column holding the text (default: text)")
    d.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default: 2048)")
    d.add_argument(
        "--stride",
        type=int,
        default=None,
        help="sliding windows every STRIDE tokens, each scoring only new tokens (default: disjoint)",
    )
    d.add_argument("--max-windows", type=int, default=None, metavar="N", help="score only the first N windows")
    d.add_argument("--add-bos", action="store_true", help="put one BOS token in front of the token stream")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="default: cuda if available")
    r.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="compute dtype (default: float32 on CPU, float16 on CUDA)",
    )
    r.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    r.add_argument(
        "--logits-chunk",
        type=int,
        default=None,
        metavar="ROWS",
        help="positions per lm_head/log_softmax chunk (default: ~128 MiB of fp32 logits)",
    )
    r.add_argument(
        "--compare-bare-loop",
        action="store_true",
        help="also time a bare loop of forward passes on the first model and print the ratio",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    o.add_argument("--report", type=Path, metavar="PREFIX", help="write PREFIX.json, PREFIX.md and PREFIX.png")
    o.add_argument("--title", default=None, help="title of the Markdown report and plot")
    o.add_argument("--note", action="append", default=[], help="extra line for the Markdown report (repeatable)")


def parse_configs(text: str) -> list:
    """``"int4-g128,int4-g128-sym-gptq"`` -> list of (entry, ``llmquant.QuantConfig``) (EvalError on a bad entry)."""
    import llmquant
    from llmquant.config import SHORT_NAME

    out = []
    for entry in (e.strip() for e in text.split(",")):
        if not SHORT_NAME.match(entry):
            raise EvalError(f"cannot parse --configs entry {entry!r}: expected intB-gG[-sym][-METHOD], e.g. int4-g128")
        try:
            cfg = llmquant.QuantConfig.from_short_name(entry)
        except ValueError as e:
            raise EvalError(f"bad --configs entry {entry!r}: {e}") from None
        out.append((entry, cfg))
    return out


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: no CUDA device available")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The compute dtype: as asked, else float32 on CPU (fp16 matmuls are slow there), float16 on GPU."""
    import torch

    return getattr(torch, name or ("float32" if device.type == "cpu" else "float16"))


def quantize_model(model, cfg, calibration, device: torch.device, progress: bool) -> tuple:
    """``llmquant.quantize_`` a loaded float model; returns it and its quantization seconds,
    extra peak memory and calibration record."""
    import llmquant

    from .memory import PeakMemory

    method = llmquant.methods.get_method(cfg.method)
    t0 = time.perf_counter()
    with PeakMemory(device) as peak:
        try:
            llmquant.quantize_(model, cfg, progress=progress, calibration=calibration if method.calibrated else None)
        except ValueError as e:
            raise EvalError(f"cannot quantize {cfg.short_name()}: {first_line(e)}") from None
    seconds = time.perf_counter() - t0
    record = {"quant_seconds": seconds, "quant_peak_bytes": peak.extra_bytes, "quant_peak_kind": peak.kind}
    if method.calibrated:
        record["calibration"] = calibration.describe()
    return model, record


def load_model(path: str, dtype: torch.dtype, device: torch.device, qconfig=None):
    """Causal LM from a folder (quantized on load when ``qconfig``), eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    import llmquant  # registers the transformers integration for saved quantized folders

    if not Path(path).is_dir():
        raise EvalError(f"model folder not found: {path}")
    # never pass quantization_config=None: it would override a saved folder's own config
    extra = {} if qconfig is None else {"quantization_config": qconfig}
    try:
        # llmquant.load also takes GPTQ and compressed-tensors folders (converted to llmquant's layout)
        load = AutoModelForCausalLM.from_pretrained if qconfig is not None else llmquant.load
        model, loading = load(path, dtype=dtype, output_loading_info=True, **extra)
    except Exception as e:  # anything from config parsing to missing shards: one line
        raise EvalError(f"cannot load model from {path}: {type(e).__name__}: {first_line(e)}") from None
    if loading.get("missing_keys"):  # randomly initialised weights would score, silently, as garbage
        missing = sorted(loading["missing_keys"])
        raise EvalError(f"cannot load model from {path}: {len(missing)} weights missing, e.g. {missing[0]}")
    return model.to(device).eval()


def load_tokenizer(path: str):
    """Tokenizer of a model folder, or None if the folder has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:
        return None


def check_same_tokenizer(a, b, name_a: str, name_b: str) -> None:
    """Refuse to compare models whose tokenizers map text to different ids."""
    diff = []
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        changed = sum(1 for k in va.keys() | vb.keys() if va.get(k) != vb.get(k))
        diff.append(f"vocabularies differ ({len(va)} vs {len(vb)} entries, {changed} tokens mapped differently)")
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            diff.append(f"{attr} {getattr(a, attr, None)} vs {getattr(b, attr, None)}")
    if diff:
        raise EvalError(f"tokenizers of {name_a} and {name_b} differ: {'; '.join(diff)}; refusing to compare")


def _quant_info(model) -> dict:
    """bits/group/sym/method of a (possibly) quantized model, from its config."""
    q = getattr(model.config, "quantization_config", None)
    if q is None:
        return {}
    q = q if isinstance(q, dict) else q.to_dict()
    return {k: q.get(k) for k in ("bits", "group_size", "sym", "method")}


def _command_line(args: argparse.Namespace) -> str:
    argv = getattr(args, "argv", None)  # set by main(); under `llmquant eval`, sys.argv is the command
    if argv is not None:
        return "llmquant eval " + shlex.join(argv)
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def evaluate(args: argparse.Namespace) -> dict:
    """Do the run described by parsed ``args``; returns the payload (see ``report``)."""
    import torch

    import llmquant
    from llmquant.stats import checkpoint_dtype

    from .data import load_text, make_windows, tokenize
    from .meta import environment
    from .perplexity import compare_bare_loop, score, summarize

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {args.batch_size}")
    configs = parse_configs(args.configs) if args.configs else []
    if args.report and (missing := missing_module("matplotlib", "--report (its PNG plot)")):
        raise EvalError(missing)
    text = load_text(args.dataset, args.split, args.text_field)  # cheap failures first, before loading models

    # name -> (folder, QuantConfig or None, is_baseline)
    plan: dict[str, tuple[str, object, bool]] = {}
    if args.baseline:
        plan["baseline"] = (args.baseline, None, True)
    if configs:
        if not args.baseline:
            plan["baseline"] = (args.model, None, True)
        for entry, cfg in configs:
            plan[entry] = (args.model, cfg, False)
    else:
        plan[Path(args.model).resolve().name or "model"] = (args.model, None, False)

    # one tokenizer for the run: the first model's; every other folder's must match it
    paths = list(dict.fromkeys(path for path, _, _ in plan.values()))
    tokenizers = {path: load_tokenizer(path) for path in paths}
    found = [p for p in paths if tokenizers[p] is not None]
    if not found:
        raise EvalError(f"no tokenizer found in {', '.join(paths)}")
    tokenizer = tokenizers[found[0]]
    for path in found[1:]:
        check_same_tokenizer(tokenizer, tokenizers[path], found[0], path)
    ref_name = next(iter(plan))

    tokens = tokenize(tokenizer, text, args.add_bos)
    all_windows = make_windows(len(tokens), args.seqlen, args.stride)
    windows = make_windows(len(tokens), args.seqlen, args.stride, args.max_windows)  # validates --max-windows

    calibration = None
    if any(llmquant.methods.get_method(cfg.method).calibrated for _, cfg in configs):
        try:
            calibration = llmquant.calibration.data.from_arguments(tokenizer, args)
        except ValueError as e:
            raise EvalError(str(e)) from None

    models, info = {}, {}
    for name, (path, cfg, is_base) in plan.items():
        t0 = time.perf_counter()
        print(
            f"loading {name} from {path}" + (f" (quantizing {cfg.short_name()})" if cfg else ""),
            file=sys.stderr,
        )
        models[name], quant = load_model(path, dtype, device), {}
        if cfg is not None:
            models[name], quant = quantize_model(models[name], cfg, calibration, device, not args.no_progress)
        vocab = models[name].get_output_embeddings().weight.shape[0]
        if len(tokenizer) > vocab:
            raise EvalError(f"tokenizer has {len(tokenizer)} tokens but {path} has an output head of {vocab}")
        # bits/weight with scales at the checkpoint's dtype, as `llmquant quantize` reports it (stats.py)
        bpw = llmquant.bits_per_weight(models[name], scale_dtype=checkpoint_dtype(path))
        info[name] = {
            "name": name,
            "path": str(Path(path).resolve()),
            "baseline": is_base,
            "quantized_on_load": cfg is not None,
            **_quant_info(models[name]),
            **({k: getattr(cfg, k) for k in ("bits", "group_size", "sym", "method")} if cfg is not None else {}),
            "bits_per_weight": bpw if bpw is not None else float(torch.finfo(dtype).bits),
            "model_size_bytes": llmquant.model_size_bytes(models[name]),
            "load_seconds": time.perf_counter() - t0,
            **quant,
        }

    baseline = "baseline" if "baseline" in plan else None
    t0 = time.perf_counter()
    scored = score(
        models,
        tokens,
        windows,
        baseline=baseline,
        batch_size=args.batch_size,
        chunk_rows=args.logits_chunk,
        progress=not args.no_progress,
    )
    wall = time.perf_counter() - t0
    results = []
    for name in plan:
        res = summarize(scored[name], scored[baseline] if baseline else None)
        results.append({**info[name], **res, "window_nll": scored[name].nll})

    env = environment(device)
    meta = {
        "title": args.title or f"{Path(plan[ref_name][0]).resolve().name}, {args.dataset}",
        "dataset": args.dataset,
        "split": args.split or (None if Path(args.dataset).suffix else "test"),
        "text_field": args.text_field,
        "seqlen": args.seqlen,
        "stride": args.stride,
        "add_bos": args.add_bos,
        "tokens_in_text": len(tokens),
        "windows_available": len(all_windows),
        "windows": len(windows),
        "tokens_scored": sum(w.n_scored for w in windows),
        "window_tokens_scored": [w.n_scored for w in windows],
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device)
        + (
            f" ({torch.cuda.get_device_name(device)})"
            if device.type == "cuda"
            else f" ({torch.get_num_threads()} threads)"
        ),
        "batch_size": args.batch_size,
        "baseline": baseline,
        "ci_method": CI_METHOD,
        "peak_memory_kind": "torch.cuda.max_memory_allocated during the model's forward passes"
        if device.type == "cuda"
        else "peak RSS of the whole process (all models loaded) at the end of the model's passes",
        "calibration": calibration.describe() if calibration is not None else None,
        "quant_peak_kind": "torch.cuda.max_memory_allocated above the loaded model"
        if device.type == "cuda"
        else "resident memory sampled every 20 ms, above the value before quantize_",
        "run_seconds": wall,
        "versions": {k: env[k] for k in VERSION_KEYS if k in env},
        "git_commit": env["git_commit"],
        "date": env["date"],
        "command": _command_line(args),
    }
    if args.compare_bare_loop:  # harness alone vs bare forward passes, first model, same windows
        name = next(iter(plan))
        meta["bare_loop"] = {"model": name, "repeats": 1}
        meta["bare_loop"].update(compare_bare_loop(models[name], tokens, windows, args.batch_size, repeats=1))
    return {"meta": meta, "models": results}


def run(args: argparse.Namespace) -> int:
    """Run ``llmquant eval``; prints the table; returns the exit code (2 on bad input)."""
    from . import report

    try:
        payload = evaluate(args)
    except EvalError as e:
        print(f"llmquant eval: error: {e}", file=sys.stderr)
        return 2
    print(report.table(payload))
    bare = payload["meta"].get("bare_loop")
    if bare:
        print(
            f"harness vs bare loop ({bare['model']}): {bare['harness_seconds']:.2f} s vs "
            f"{bare['bare_seconds']:.2f} s, tokens/s ratio {bare['ratio']:.3f}"
        )
    if args.json:
        report.write_json(payload, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.report:
        for path in report.write_report(payload, args.report, args.note):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m llmquant.evals.cli MODEL [flags]`` (same as ``llmquant eval``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="llmquant eval")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = argv
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
