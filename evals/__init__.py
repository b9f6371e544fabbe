"""Perplexity harness and benchmarks (installed as ``llmquant.evals``; may import ``llmquant``)."""

from llmquant.errors import EvalError

__all__ = ["EvalError"]
