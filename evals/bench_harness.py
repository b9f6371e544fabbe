"""Harness overhead: tokens/s of ``perplexity.score`` vs a bare loop of forward passes, same windows.

    python -m llmquant.evals.bench_harness MODEL_DIR --dataset PATH --seqlen 2048 --max-windows 4

Target (issue 3): ratio (harness tokens/s / bare-loop tokens/s) >= 0.9. Both sides process the
same windows; the bare loop is ``model(input_ids).logits`` (full logits, no loss), the harness
runs the body, chunked lm_head + log_softmax and the NLL bookkeeping. The two alternate
``--repeats`` times after a one-window warm-up; medians are reported.
"""

from __future__ import annotations

import argparse
import sys

from . import EvalError
from .cli import load_model, load_tokenizer, resolve_device, resolve_dtype
from .data import load_text, make_windows, tokenize
from .perplexity import compare_bare_loop


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llmquant.evals.bench_harness", description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--dataset", required=True)
    p.add_argument("--text-field", default="text")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        tok = load_tokenizer(args.model)
        if tok is None:
            raise EvalError(f"no tokenizer in {args.model}")
        tokens = tokenize(tok, load_text(args.dataset, text_field=args.text_field))
        windows = make_windows(len(tokens), args.seqlen, max_windows=args.max_windows)
        model = load_model(args.model, dtype, device)
    except EvalError as e:
        print(f"bench_harness: error: {e}", file=sys.stderr)
        return 2
    r = compare_bare_loop(model, tokens, windows, args.batch_size, args.repeats)
    print(
        f"{len(windows)} windows x {args.seqlen} tokens, {dtype} on {device}, median of {args.repeats}: "
        f"harness {r['harness_seconds']:.2f} s ({r['harness_tokens_per_s']:.0f} tok/s), "
        f"bare loop {r['bare_seconds']:.2f} s ({r['bare_tokens_per_s']:.0f} tok/s), ratio {r['ratio']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
