"""Calibration data for calibrated methods: text through `datasets`, cut into token samples.

`load_calibration(tokenizer, source, nsamples, seqlen, seed)` reads a local .txt/.jsonl/.json/
.parquet file, a named Hub set (`c4`, the default) or a Hub dataset id (its train split), joins the
rows with "\\n\\n", tokenizes the text once without special tokens and picks `nsamples` disjoint
windows of `seqlen` tokens at random positions chosen by `seed` (deterministic for a given seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CalibrationError, first_line, with_cause
from ..hub import hub_offline, looks_like_path

if TYPE_CHECKING:  # torch is imported lazily: the CLI builds its parser from this module
    import torch


@dataclass(frozen=True)
class HubText:
    """A text set on the Hugging Face Hub: `datasets.load_dataset(path, name, data_files=..., split=...)`."""

    path: str
    name: str | None = None
    data_files: str | None = None
    split: str = "train"

    def describe(self) -> str:
        """What the model card records, e.g. 'allenai/c4 en/c4-validation...json.gz train[:2000]'."""
        return " ".join(p for p in (self.path, self.name, self.data_files, self.split) if p)


# Named calibration sets. `c4` (the default): C4, the corpus the GPTQ paper and most GPTQ tools
# calibrate on; its first validation shard (40 MB, where a train shard is 320 MB). Only its first
# 2,000 documents (~1M tokens with a Llama tokenizer; the default 64 x 256 samples need 16K) are
# tokenized: seconds, not the whole shard's minutes.
KNOWN_CALIBRATION = {
    "c4": HubText("allenai/c4", data_files="en/c4-validation.00000-of-00008.json.gz", split="train[:2000]"),
}
DEFAULT_CALIBRATION = "c4"
DEFAULT_NSAMPLES = 64
DEFAULT_SEQLEN = 256
LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class CalibrationSet:
    """tokens: [nsamples, seqlen] int64 token ids, and where they came from."""

    tokens: torch.Tensor
    source: str
    seed: int
    tokens_available: int

    def describe(self) -> dict:
        """What the model card and reports record."""
        samples, seqlen = self.tokens.shape
        return {
            "dataset": self.source,
            "nsamples": samples,
            "seqlen": seqlen,
            "tokens": samples * seqlen,
            "seed": self.seed,
        }


def _hub_error(source: str, why: str) -> CalibrationError:
    """The one-line error for a Hub calibration set that cannot be had: why, and how to use a local file."""
    return CalibrationError(
        f"calibration data {source!r} comes from the Hugging Face Hub, {why}; "
        "pass a local file instead: --calib PATH (.txt, .jsonl/.json with a 'text' field, or .parquet)"
    )


def describe_source(source: str | Path) -> str:
    """How a calibration source is recorded: a named Hub set by its full address, anything else as given."""
    known = KNOWN_CALIBRATION.get(str(source))
    return known.describe() if known is not None else str(source)


def load_text(source: str | Path, text_field: str = "text") -> str:
    """All rows of `source` joined with "\\n\\n" (a .txt file as one document)."""
    import datasets


    path = Path(source).expanduser()
    loader = LOADERS.get(path.suffix.lower())
    local = path.exists() or (str(source) not in KNOWN_CALIBRATION and looks_like_path(str(source)))
    try:
        if loader is not None or local:
            if not path.is_file():
                raise CalibrationError(f"calibration file not found: {path}")
            if loader is None:
                raise CalibrationError(f"calibration file {path}: expected .txt, .jsonl, .json or .parquet")
            extra = {"sample_by": "document"} if loader == "text" else {}
            ds = datasets.load_dataset(loader, data_files=str(path), split="train", **extra)
        else:
            hub = KNOWN_CALIBRATION.get(str(source), HubText(str(source)))
            if hub_offline():  # fail fast: never let datasets retry the network
                raise _hub_error(str(source), "which is not reachable (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)")
            try:
                ds = datasets.load_dataset(hub.path, hub.name, data_files=hub.data_files, split=hub.split)
            except Exception as error:  # no network, unknown id, gated: all end the same way for the user
                raise _hub_error(str(source), f"and could not be fetched ({with_cause(error)})") from None
    except CalibrationError:
        raise
    except Exception as error:
        raise CalibrationError(f"cannot read calibration data {str(source)!r}: {first_line(error)}") from None
    if text_field not in ds.column_names:
        raise CalibrationError(
            f"calibration data {str(source)!r} has no field {text_field!r} (fields: {', '.join(ds.column_names)})"
        )
    return "\n\n".join(str(row) for row in ds[text_field] if row)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str) -> torch.Tensor:
    """`nsamples` disjoint windows [nsamples, seqlen] of the token stream ids: [n], chosen by seed."""
    if nsamples < 1 or seqlen < 1:
        raise CalibrationError(f"nsamples and calib-seqlen must be positive, got {nsamples} and {seqlen}")
    needed = nsamples * seqlen
    if ids.numel() < needed:
        raise CalibrationError(
            f"calibration data {source!r} has {ids.numel():,} tokens, fewer than nsamples x calib-seqlen = "
            f"{nsamples} x {seqlen} = {needed:,}; lower --nsamples or --calib-seqlen, or give more text"
        )
    import torch

    windows = ids.numel() // seqlen
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(windows, generator=generator)[:nsamples].sort().values * seqlen
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def load_calibration(
    tokenizer,
    source: str | Path | None = None,
    nsamples: int = DEFAULT_NSAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
    seed: int = 0,
    text_field: str = "text",
) -> CalibrationSet:
    """Token samples [nsamples, seqlen] for calibration from `source` (default: `c4` from the Hub)."""
    import torch

    source = str(DEFAULT_CALIBRATION if source is None else source)
    text = load_text(source, text_field)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    tokens = sample_windows(ids, nsamples, seqlen, seed, source)
    return CalibrationSet(tokens=tokens, source=describe_source(source), seed=seed, tokens_available=ids.numel())


def position_limit(model_config) -> int | None:
    """The longest sequence the model serves (max_position_embeddings of a transformers config,
    or of its text config), None when the config does not say."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    limit = getattr(text, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None


def check_seqlen(seqlen: int, model_config) -> None:
    """Refuse calibration samples longer than the model's positions: with RoPE the statistics
    would come from positions the model never serves, with learned positions the forward pass
    fails inside torch.embedding. CalibrationError naming both numbers."""
    limit = position_limit(model_config)
    if limit is not None and seqlen > limit:
        raise CalibrationError(
            f"calibration samples of {seqlen} tokens (--calib-seqlen) are longer than the model's "
            f"max_position_embeddings {limit}; use --calib-seqlen {limit} or less"
        )


def check_seqlen_for(src: str | Path, seqlen: int) -> None:
    """`check_seqlen` against the config of the model folder or Hub id `src`, before any work.
    A config that cannot be read is left to the checks that read it properly (named there)."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(src)
    except Exception:  # reported, naming the file, by the quantize command's own config checks
        return
    check_seqlen(seqlen, model_config)


def add_arguments(parser) -> None:
    """The calibration flags shared by `llmquant quantize` and `llmquant eval`."""
    group = parser.add_argument_group("calibration (every method but rtn)")
    group.add_argument(
        "--calib",
        default=None,
        metavar="DATA",
        help="local .txt/.jsonl/.json/.parquet file (field 'text'), a Hub dataset id (train split) or c4 "
        f"(default: {KNOWN_CALIBRATION['c4'].describe()} from the Hub; offline, pass a local file)",
    )
    group.add_argument(
        "--nsamples", type=int, default=DEFAULT_NSAMPLES, help=f"calibration samples (default {DEFAULT_NSAMPLES})"
    )
    group.add_argument(
        "--calib-seqlen", type=int, default=DEFAULT_SEQLEN, help=f"tokens per sample (default {DEFAULT_SEQLEN})"
    )
    group.add_argument("--seed", type=int, default=0, help="seed choosing the samples (default 0)")


def from_arguments(tokenizer, args) -> CalibrationSet:
    """`load_calibration` with the flags of `add_arguments`."""
    return load_calibration(tokenizer, args.calib, args.nsamples, args.calib_seqlen, args.seed)


def load_tokenizer(src: str | Path):
    """The tokenizer of a model folder or Hub id (CalibrationError if it has none)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception as error:
        raise CalibrationError(f"{src}: calibrated methods need the model's tokenizer: {first_line(error)}") from None
