"""Perplexity harness and benchmarks (installed as ``llmquant.evals``; may import ``llmquant``)."""


class EvalError(ValueError):
    """Bad input to the harness (dataset, model folder, tokenizer, config): one line, CLI exit code 2."""
