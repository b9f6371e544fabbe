"""Presentation of a run: console table, JSON, Markdown and a PNG plot (ppl against bits per weight).

A run is one ``payload`` dict: ``{"meta": {...}, "models": [{"name", "bits_per_weight",
"model_size_bytes", "ppl", ... , "delta_ppl_ci95", "kl_mean", "top1_agreement"}, ...]}``; the
baseline (if any) is the model whose ``"baseline"`` field is True.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

COLUMNS = (
    "model",
    "method",
    "bits/w",
    "memory MiB",
    "ppl",
    "Δppl [95% CI]",
    "KL",
    "top-1",
    "tokens",
    "s",
    "tok/s",
    "peak MiB",
)


def _fmt(x, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def rows(payload: dict) -> list[list[str]]:
    """One list of cell strings per model, in ``COLUMNS`` order."""
    out = []
    for m in payload["models"]:
        ci = m.get("delta_ppl_ci95")
        delta = "–" if "delta_ppl" not in m else f"{m['delta_ppl']:+.4f} [{_fmt(ci[0], '+.4f')}, {_fmt(ci[1], '+.4f')}]"
        out.append(
            [
                m["name"] + (" (baseline)" if m.get("baseline") and m["name"] != "baseline" else ""),
                m.get("method") or "–",
                _fmt(m.get("bits_per_weight"), ".3f"),
                _fmt(m["model_size_bytes"] / 2**20, ".1f"),
                f"{m['ppl']:.4f}",
                delta,
                _fmt(m.get("kl_mean"), ".5f"),
                _fmt(m.get("top1_agreement"), ".4f"),
                str(m["tokens"]),
                f"{m['seconds']:.1f}",
                _fmt(m.get("tokens_per_s"), ".0f"),
                _fmt(m["peak_memory_bytes"] / 2**20, ".0f"),
            ]
        )
    return out


def describe(meta: dict) -> str:
    """One line saying what the numbers were measured on."""
    stride = f", stride {meta['stride']}" if meta.get("stride") else ""
    return (
        f"{meta['dataset']} ({meta['split'] or 'file'}), seqlen {meta['seqlen']}{stride}, "
        f"{meta['windows']} of {meta['windows_available']} windows, {meta['tokens_scored']} tokens scored, "
        f"{meta['dtype']} on {meta['device']}"
    )


def table(payload: dict) -> str:
    """Fixed-width text table for the console."""
    body = rows(payload)
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(COLUMNS)]

    def line(cells: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([describe(payload["meta"]), line(COLUMNS), *map(line, body)])


def markdown(payload: dict, notes: list[str] | None = None) -> str:
    """Markdown report: what was measured, the table, how to read it."""
    meta = payload["meta"]
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"
    body = "\n".join("| " + " | ".join(r) + " |" for r in rows(payload))
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines = [
        f"# Perplexity: {meta['title']}",
        "",
        describe(meta) + ".",
        "",
        head,
        body,
        "",
        *[f"- {n}" for n in (notes or [])],
        '- Protocol: rows joined with `"\\n\\n"`, tokenized once, no BOS'
        + (" (BOS added once)" if meta.get("add_bos") else "")
        + ", non-overlapping windows, remainder dropped; each window scores its last seqlen − 1 tokens "
        "(the first token has no context), ppl = exp(mean NLL over all scored tokens). "
        "Every model scores the same windows.",
        f"- Δppl interval: {meta['ci_method']}",
        "- KL: mean over scored positions of KL(baseline ‖ model) of the next-token distributions; "
        "top-1: share of those positions where both models' argmax agree.",
        "- bits/w: stored bits per weight of the quantized linear layers (codes + scales + zeros; "
        "scales at the checkpoint's dtype; embeddings and lm_head stay in floating point and are not counted); "
        "for the baseline, the bits of the dtype it ran in. "
        "memory MiB: all parameters and buffers of the whole model as loaded (compute dtype, CPU kernel copy "
        "included). s, tok/s: each model's own forward + lm_head time; "
        "peak MiB: " + meta["peak_memory_kind"] + ".",
        f"- Command: `{meta['command']}`",
        f"- Versions: {versions}; git commit {meta['git_commit'] or 'none'}; {meta['date']}.",
    ]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    """PNG: perplexity against bits per weight, one labelled point per quantized model, baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for m in payload["models"]:
        if m.get("baseline"):
            ax.axhline(m["ppl"], color="gray", linestyle="--", label=f"{m['name']}: {m['ppl']:.3f}")
        elif m.get("bits_per_weight") is not None:
            ax.errorbar(
                m["bits_per_weight"],
                m["ppl"],
                yerr=_yerr(m),
                fmt="o",
                capsize=3,
                label=f"{m['name']}: {m['ppl']:.3f}",
            )
            ax.annotate(m["name"], (m["bits_per_weight"], m["ppl"]), textcoords="offset points", xytext=(5, 5))
    ppls = [m["ppl"] for m in payload["models"]]
    if max(ppls) > 3 * min(ppls):  # one collapsed config would squash the rest onto the baseline
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized layers)")
    ax.set_ylabel("perplexity")
    ax.set_title(payload["meta"]["title"] + "\n" + describe(payload["meta"]), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _yerr(m: dict):
    """Asymmetric error bar from the Δppl interval (None without a baseline)."""
    ci = m.get("delta_ppl_ci95")
    if not ci or any(math.isnan(c) for c in ci):
        return None
    return [[max(0.0, m["delta_ppl"] - ci[0])], [max(0.0, ci[1] - m["delta_ppl"])]]


def write_json(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nan_to_none(payload), indent=2, default=str, allow_nan=False) + "\n")


def _nan_to_none(x):
    """NaN is not JSON: write null (e.g. the Δ interval of a single window)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_nan_to_none(v) for v in x]
    return x


def write_report(payload: dict, prefix: Path, notes: list[str] | None = None) -> list[Path]:
    """``PREFIX.json``, ``PREFIX.md`` and ``PREFIX.png``; returns the paths."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if notes is not None:  # kept in the JSON so the Markdown can be re-rendered from it
        payload["meta"]["notes"] = list(notes)
    notes = payload["meta"].get("notes", [])
    paths = [prefix.with_name(prefix.name + ext) for ext in (".json", ".md", ".png")]
    write_json(payload, paths[0])
    paths[1].write_text(markdown(payload, notes))
    plot(payload, paths[2])
    return paths


def main(argv: list[str] | None = None) -> int:
    """Re-render ``PREFIX.md`` and ``PREFIX.png`` from ``PREFIX.json`` (e.g. after a report format change)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m llmquant.evals.report", description=main.__doc__)
    p.add_argument("json", type=Path)
    p.add_argument("--note", action="append", default=None, help="replace the stored notes")
    args = p.parse_args(argv)
    payload = json.loads(args.json.read_text())
    if args.note is not None:
        payload["meta"]["notes"] = args.note
    prefix = args.json.with_suffix("")
    for path in write_report(payload, prefix, payload["meta"].get("notes")):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
