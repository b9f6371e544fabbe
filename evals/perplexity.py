"""Scoring: run models side by side over the same windows; per-window NLL, KL and top-1 agreement.

The whole-batch logits are never materialised: each model's body gives hidden states
``[B, T, H]``; only the positions whose next token is scored are kept (``[M, H]``), and
``lm_head`` + ``log_softmax`` run over chunks of those rows, so memory holds
``chunk x vocab`` fp32 values per model at a time (SmolLM2: vocab 49,152).

Token ``t`` of a window is scored from the logits at position ``t - 1``; the first token of a
window is never scored (see ``data.Window``).
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmquant.progress import progress_bar

from .data import Window, batches

# Rows of fp32 logits per chunk = LOGITS_BUDGET // vocab (~128 MiB): bounded memory, and big
# enough that the matmul stays efficient.
LOGITS_BUDGET = 2**25


@dataclass
class Scored:
    """Per-window accumulators of one model; lists are indexed by window, in window order."""

    name: str
    nll: list[float] = field(default_factory=list)  # sum of NLL (nats) over the window's scored tokens
    tokens: list[int] = field(default_factory=list)  # scored tokens per window
    kl: list[float] = field(default_factory=list)  # sum of KL(baseline || model) over scored tokens
    top1: list[int] = field(default_factory=list)  # scored positions where both argmaxes agree
    seconds: float = 0.0  # this model's own forward + head + log_softmax time
    peak_memory: int = 0  # bytes: process peak RSS on CPU, max_memory_allocated on CUDA


def body_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (returns ``last_hidden_state``) and the output head of a causal LM.

    Logit post-processing some architectures apply after ``lm_head`` (e.g. Gemma-2's final
    soft-capping) is not reproduced; the Llama family has none.
    """
    head = model.get_output_embeddings()
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    if head is None or body is None:
        raise ValueError(f"{type(model).__name__} has no separable body/lm_head")
    return body, head


def hidden_states(body: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T] int64 -> [B, T, H]`` in the model dtype; no padding, no KV cache."""
    return body(input_ids=input_ids, use_cache=False).last_hidden_state


def log_probs(head: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """``[m, H] -> [m, V]`` fp32 log-probabilities (softmax in fp32 whatever the model dtype)."""
    return torch.log_softmax(head(rows).float(), dim=-1)


def target_mask(batch: list[Window], device: torch.device) -> torch.Tensor:
    """``[B, T-1]`` bool: position ``p`` predicts token ``p + 1``; True where that token is scored."""
    begin = torch.tensor([w.begin for w in batch], device=device)[:, None]
    first = torch.tensor([w.first_target for w in batch], device=device)[:, None]
    length = batch[0].end - batch[0].begin
    predicted = begin + 1 + torch.arange(length - 1, device=device)[None, :]  # absolute index of token p+1
    return predicted >= first


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@torch.inference_mode()
def score(
    models: dict[str, torch.nn.Module],
    tokens: torch.Tensor,
    windows: list[Window],
    baseline: str | None = None,
    batch_size: int = 1,
    chunk_rows: int | None = None,
    progress: bool = True,
) -> dict[str, Scored]:
    """Score every model on the same windows, batch by batch, side by side.

    Args:
        models: name -> causal LM, all on the same device, all sharing one tokenizer.
        tokens: ``[N]`` int64 token stream (CPU).
        windows: from ``data.make_windows``.
        baseline: name of the reference model; the others also get KL(baseline || model) and
            top-1 agreement, computed from both models' logits of the same positions.
        batch_size: windows per forward pass.
        chunk_rows: scored positions per lm_head/log_softmax chunk (default: ~128 MiB of logits).
    """
    names = list(models)
    if baseline is not None:  # the baseline goes first so its hidden states exist for the others
        names.remove(baseline)
        names.insert(0, baseline)
    device = next(models[names[0]].parameters()).device
    parts = {n: body_and_head(models[n]) for n in names}
    vocab = parts[names[0]][1].weight.shape[0]
    chunk = chunk_rows or max(1, LOGITS_BUDGET // vocab)
    out = {n: Scored(n) for n in names}
    for batch in progress_bar(batches(windows, batch_size), enabled=progress, desc="windows", unit="batch"):
        ids = torch.stack([tokens[w.begin : w.end] for w in batch]).to(device)  # [B, T]
        mask = target_mask(batch, device)  # [B, T-1]
        targets = ids[:, 1:][mask]  # [M]
        window_of = torch.arange(len(batch), device=device)[:, None].expand_as(mask)[mask]  # [M]
        rows = {}
        for n in names:  # bodies: one forward per model, only scored rows kept
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            rows[n] = hidden_states(parts[n][0], ids)[:, :-1][mask]  # [M, H]
            _sync(device)
            out[n].seconds += time.perf_counter() - t0
            out[n].peak_memory = max(out[n].peak_memory, _peak_memory(device))
        sums = {n: torch.zeros(3, len(batch), dtype=torch.float64, device=device) for n in names}
        for start in range(0, targets.numel(), chunk):  # heads: chunk by chunk, baseline first
            sl = slice(start, start + chunk)
            ref = None
            for n in names:
                t0 = time.perf_counter()
                logp = log_probs(parts[n][1], rows[n][sl])  # [m, V] fp32
                nll = -logp.gather(1, targets[sl, None])[:, 0]
                _sync(device)
                out[n].seconds += time.perf_counter() - t0
                sums[n][0].index_add_(0, window_of[sl], nll.double())
                if baseline is None:
                    continue
                if ref is None:
                    ref = logp
                    continue
                # KL(P_base || P_model) = sum_v p_base (log p_base - log p_model), per position
                kl = F.kl_div(logp, ref, log_target=True, reduction="none").sum(-1)
                agree = (logp.argmax(-1) == ref.argmax(-1)).double()
                sums[n][1].index_add_(0, window_of[sl], kl.double())
                sums[n][2].index_add_(0, window_of[sl], agree)
        counts = mask.sum(1).tolist()
        for n in names:
            nll_sum, kl_sum, agree = sums[n].cpu().tolist()
            out[n].nll += nll_sum
            out[n].tokens += counts
            if baseline is not None and n != baseline:
                out[n].kl += kl_sum
                out[n].top1 += [int(a) for a in agree]
    return out


@torch.inference_mode()
def bare_loop_seconds(
    model: torch.nn.Module, tokens: torch.Tensor, windows: list[Window], batch_size: int = 1
) -> float:
    """Wall time of plain ``model(input_ids)`` forward passes over the same windows (the yardstick)."""
    device = next(model.parameters()).device
    _sync(device)
    t0 = time.perf_counter()
    for batch in batches(windows, batch_size):
        ids = torch.stack([tokens[w.begin : w.end] for w in batch]).to(device)
        model(input_ids=ids, use_cache=False).logits.sum().item()  # .item(): wait for the device
    _sync(device)
    return time.perf_counter() - t0


def compare_bare_loop(model, tokens: torch.Tensor, windows: list, batch_size: int = 1, repeats: int = 3) -> dict:
    """Median seconds of both loops over ``windows`` and the tokens/s ratio harness / bare."""
    score({"m": model}, tokens, windows[:1], progress=False)  # warm-up (allocator, lazy init)
    bare_loop_seconds(model, tokens, windows[:1])
    harness, bare = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        score({"m": model}, tokens, windows, batch_size=batch_size, progress=False)
        harness.append(time.perf_counter() - t0)
        bare.append(bare_loop_seconds(model, tokens, windows, batch_size))
    h, b = statistics.median(harness), statistics.median(bare)
    n = sum(w.end - w.begin for w in windows)
    return {
        "harness_seconds": h,
        "bare_seconds": b,
        "harness_tokens_per_s": n / h,
        "bare_tokens_per_s": n / b,
        "ratio": b / h,
    }


def summarize(s: Scored, base: Scored | None = None) -> dict:
    """Perplexity and, against ``base`` (same windows), Δppl with a 95% interval, KL and top-1.

    ``ppl = exp(sum NLL / sum tokens)``. Δppl interval (delta method, windows as the sampling
    unit): per-window paired differences ``d_w = NLL_w(model) - NLL_w(base)`` (sums over the
    window's tokens, ``n_w`` tokens); ``D = sum d_w / sum n_w`` has the ratio-estimator variance
    ``W/(W-1) * sum (d_w - D n_w)^2 / (sum n_w)^2``; the interval ``D ± 1.96 se`` is mapped through
    ``Δppl(D) = ppl_base * (exp(D) - 1)``, conditioning on the baseline's windows. Windows, not
    tokens, are the unit because tokens within a window are correlated.
    """
    n = sum(s.tokens)
    mean_nll = sum(s.nll) / n
    res = {
        "ppl": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "tokens": n,
        "windows": len(s.tokens),
        "seconds": s.seconds,
        "tokens_per_s": n / s.seconds if s.seconds > 0 else None,
        "peak_memory_bytes": s.peak_memory,
    }
    if base is None or base is s:
        return res
    assert base.tokens == s.tokens, "models must be scored on the same windows"
    w = len(s.tokens)
    d = [a - b for a, b in zip(s.nll, base.nll, strict=True)]
    diff = sum(d) / n
    if w > 1:
        var = w / (w - 1) * sum((dw - diff * nw) ** 2 for dw, nw in zip(d, s.tokens, strict=True)) / n**2
        se = math.sqrt(var)
    else:
        se = float("nan")
    ppl_base = math.exp(sum(base.nll) / n)
    res.update(
        delta_ppl=res["ppl"] - ppl_base,
        delta_ppl_ci95=[ppl_base * math.expm1(diff - 1.96 * se), ppl_base * math.expm1(diff + 1.96 * se)],
        delta_nll=diff,
        delta_nll_se=se,
        kl_mean=sum(s.kl) / n,
        top1_agreement=sum(s.top1) / n,
    )
    return res
