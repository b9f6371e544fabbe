"""Evaluation text: load it, tokenize it once, cut it into scoring windows.

Protocol (the one the GPTQ papers and transformers' perplexity guide use): dataset rows joined
with ``"\\n\\n"``, tokenized once without special tokens, non-overlapping windows of ``seqlen``
tokens, remainder dropped. Inside a window the first token has no context, so a window scores ``seqlen - 1`` predicted
tokens (the standard HF/GPTQ protocol: ``labels = input_ids`` shifted by one inside the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmquant.errors import first_line, with_cause
from llmquant.hub import hub_offline, looks_like_path

from . import EvalError

# Short names for the datasets of published tables: (hub path, config name, default split).
KNOWN_DATASETS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "test")}
LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")


def _column_text(ds, field: str, source: str) -> str:
    """``"\\n\\n".join`` of one column of a ``datasets.Dataset`` (empty rows kept, as on the Hub)."""
    if field not in ds.column_names:
        fields = ", ".join(ds.column_names)
        raise EvalError(f"dataset {source!r} has no field {field!r} (fields: {fields}); use --text-field")
    return "\n\n".join("" if r is None else str(r) for r in ds[field])


def load_text(dataset: str, split: str | None = None, text_field: str = "text") -> str:
    """The evaluation text: ``"\\n\\n".join(rows[text_field])``, or a ``.txt`` file's content as is.

    ``dataset`` is ``wikitext2``, a local file (``.jsonl``/``.json`` with a ``text_field``,
    ``.txt``, ``.parquet``) or a Hub dataset id, optionally ``id:config``. ``split`` defaults to
    ``test`` for Hub datasets; local files hold a single split.
    """
    path = Path(dataset).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists() or looks_like_path(dataset):
        return _load_local(path, text_field)
    if dataset in KNOWN_DATASETS:
        hub, config, default_split = KNOWN_DATASETS[dataset]
    else:
        hub, _, config = dataset.partition(":")
        config, default_split = config or None, "test"
    return _load_hub(hub, config, split or default_split, text_field, dataset)


def _load_local(path: Path, text_field: str) -> str:
    if not path.is_file():
        raise EvalError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8")
    if suffix not in LOCAL_SUFFIXES:
        raise EvalError(f"unsupported dataset file {path.name!r}: use .jsonl, .json, .txt or .parquet")
    import datasets

    builder = "parquet" if suffix == ".parquet" else "json"
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for malformed files
        raise EvalError(f"cannot read {path}: {with_cause(e)}") from None
    return _column_text(ds, text_field, str(path))


def _load_hub(hub: str, config: str | None, split: str, text_field: str, name: str) -> str:
    hint = (
        f"dataset {name!r} must come from the Hugging Face Hub, which is not reachable; pass a local file "
        "instead: --dataset PATH (.jsonl/.json with a 'text' field, .txt or .parquet; for wikitext2, the "
        "rows of wikitext/wikitext-2-raw-v1/test as JSON lines)"
    )
    if hub_offline():  # fail fast: never let datasets retry the network
        raise EvalError(hint + " (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)")
    import datasets

    try:
        ds = datasets.load_dataset(hub, config, split=split)
    except Exception as e:
        raise EvalError(f"{hint}; datasets said: {type(e).__name__}: {first_line(e)}") from None
    return _column_text(ds, text_field, name)


def tokenize(tokenizer, text: str, add_bos: bool = False) -> torch.Tensor:
    """Token ids of the whole text, shape ``[N]`` int64, tokenized once.

    No special tokens; with ``add_bos`` one BOS is put in front of the stream (what
    ``tokenizer(text)`` does for Llama tokenizers in the GPTQ reference code), not per window.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise EvalError("--add-bos: the tokenizer has no BOS token")
        ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` are the model input; tokens ``[first_target, end)`` are scored.

    ``first_target >= begin + 1``: a token is scored from the logits of the position before it.
    """

    begin: int
    end: int
    first_target: int

    @property
    def n_scored(self) -> int:
        return self.end - self.first_target


def make_windows(n_tokens: int, seqlen: int, stride: int | None = None, max_windows: int | None = None) -> list[Window]:
    """Scoring windows over a stream of ``n_tokens`` tokens.

    Without ``stride``: ``n_tokens // seqlen`` disjoint windows, each scoring ``seqlen - 1``
    tokens, remainder dropped. With ``stride`` (HF "Perplexity of fixed-length models"): windows
    start every ``stride`` tokens, are at most ``seqlen`` long (the last one may be shorter) and
    each scores only the tokens no earlier window scored, so every token but the first is scored
    once, with up to ``seqlen - stride`` tokens of context. ``max_windows`` keeps a prefix.
    """
    if seqlen < 2:
        raise EvalError(f"--seqlen must be at least 2, got {seqlen}")
    if n_tokens < seqlen:
        raise EvalError(f"the text has {n_tokens} tokens, fewer than one window of --seqlen {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise EvalError(f"--max-windows must be at least 1, got {max_windows}")
    windows: list[Window] = []
    if stride is None:
        windows = [Window(b, b + seqlen, b + 1) for b in range(0, n_tokens - seqlen + 1, seqlen)]
    else:
        if not 1 <= stride <= seqlen:
            raise EvalError(f"--stride must be between 1 and --seqlen ({seqlen}), got {stride}")
        prev_end = 0
        for begin in range(0, n_tokens, stride):
            end = min(begin + seqlen, n_tokens)
            windows.append(Window(begin, end, max(begin + 1, prev_end)))
            prev_end = end
            if end == n_tokens:
                break
    return windows[:max_windows] if max_windows else windows


def batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows grouped ``batch_size`` at a time; only equal lengths share a batch (no padding)."""
    out: list[list[Window]] = []
    for w in windows:
        last = out[-1] if out else None
        if last and len(last) < batch_size and (last[0].end - last[0].begin) == (w.end - w.begin):
            last.append(w)
        else:
            out.append([w])
    return out
