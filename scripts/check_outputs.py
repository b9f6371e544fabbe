"""Are the checkpoints llmquant writes byte-identical to those recorded before a change?

Quantizes stories260k (and a tiny generated Mixtral) with each method into each format, rewrites
one export with `llmquant convert`, and compares the SHA-256 of every file written against
`scripts/output-hashes.json`. A restructuring that changes no behaviour must leave every hash equal.

    .venv/bin/python scripts/check_outputs.py            # compare (exit 1 and a list on any difference)
    .venv/bin/python scripts/check_outputs.py --only moe # the cases whose name contains "moe"
    .venv/bin/python scripts/check_outputs.py --record   # write the hashes of this tree

Floating-point results can differ between CPUs and thread counts, so the hashes are those of this
machine class (x86-64, 2 threads); record them and compare on the same machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
HASHES = ROOT / "scripts" / "output-hashes.json"
CALIB = ["--calib", str(DATA / "c4-calibration-sample.txt"), "--nsamples", "16", "--calib-seqlen", "128"]

SKIP = {
    "llmquant": [],
    "gptq": ["--skip", "gate_proj", "up_proj", "down_proj", "lm_head"],
    "compressed-tensors": ["--skip", "down_proj", "lm_head"],
}
# name -> (source, extra arguments of `llmquant quantize`)
CASES: dict[str, tuple[str, list[str]]] = {
    **{
        # stories260k's down_proj is 172 wide: no whole int32 words of int4 codes along K in these formats
        f"{method}-{fmt}": ("stories260k", ["--method", method, "--format", fmt, *SKIP[fmt]])
        for method in ("rtn", "gptq", "gptq-rot")
        for fmt in ("llmquant", "gptq", "compressed-tensors")
    },
    **{
        f"{method}-llmquant": ("stories260k", ["--method", method])
        for method in ("clip", "gptq-noclip", "awq", "gptq-awq", "gptaq")
    },
    "rtn-sym-int8-rows-gptq": ("stories260k", ["--sym", "--format", "gptq", "--bits", "8", "--group-size", "-1"]),
    "gptq-sym-skip-compressed-tensors": (
        "stories260k",
        ["--method", "gptq", "--sym", "--skip", "down_proj", "lm_head", "--format", "compressed-tensors"],
    ),
    "moe-rtn-llmquant": ("mixtral", []),
    "moe-gptq-gptq": ("mixtral", ["--method", "gptq", "--format", "gptq"]),
    "moe-rtn-compressed-tensors": ("mixtral", ["--format", "compressed-tensors"]),
}
CONVERTS = {
    "moe-rtn-llmquant-to-gptq": ("moe-rtn-llmquant", "gptq"),
    "gptq-gptq-to-llmquant": ("gptq-gptq", "llmquant"),
    "gptq-sym-skip-compressed-tensors-to-llmquant": ("gptq-sym-skip-compressed-tensors", "llmquant"),
}


def llmquant(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, "-m", "llmquant.cli", *args, "--quiet"], check=True, env=env, cwd=ROOT)


def digest(folder: Path, work: Path) -> dict[str, str]:
    """SHA-256 of each file under `folder`; in text files (model card, configs) the temporary
    folder's path is replaced by a placeholder: a card names its base model by path."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix in (".md", ".json"):
                data = data.replace(str(work).encode(), b"$WORK")
            hashes[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return hashes


def mixtral(work: Path) -> Path:
    out = work / "mixtral"
    subprocess.run(
        [sys.executable, "-m", "llmquant.evals.make_moe_checkpoint", str(out), "--tokenizer", str(DATA / "stories260k"),
         "--layers", "2", "--experts", "4", "--hidden", "64", "--intermediate", "128"],
        check=True, cwd=ROOT,
    )  # fmt: skip
    return out


def outputs(only: str | None = None) -> dict[str, dict[str, str]]:
    hashes = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sources = {"stories260k": DATA / "stories260k", "mixtral": mixtral(work)}
        for name, (source, extra) in CASES.items():
            if only and only not in name and not any(only in c and s == name for c, (s, _) in CONVERTS.items()):
                continue
            calib = CALIB if "--method" in extra and extra[extra.index("--method") + 1] != "rtn" else []
            llmquant("quantize", str(sources[source]), "-o", str(work / name), "--bits", "4", "--group-size", "32",
                     *extra, *calib)  # fmt: skip
            hashes[name] = digest(work / name, work)
            print(f"{name}: {len(hashes[name])} files", flush=True)
        for name, (source, fmt) in CONVERTS.items():
            if source not in hashes:
                continue
            llmquant("convert", str(work / source), "-o", str(work / name), "--format", fmt)
            hashes[name] = digest(work / name, work)
            print(f"{name}: {len(hashes[name])} files", flush=True)
    return hashes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help=f"write {HASHES.name} instead of comparing")
    parser.add_argument(
        "--only", metavar="TEXT", help="compare only the cases whose name contains TEXT (e.g. gptq-rot, moe)"
    )
    args = parser.parse_args()
    if args.record and args.only:
        parser.error("--record writes every case: drop --only")
    hashes = outputs(args.only)
    if args.record:
        HASHES.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
        print(f"recorded {sum(map(len, hashes.values()))} files of {len(hashes)} outputs in {HASHES}")
        return 0
    recorded = {
        case: files for case, files in json.loads(HASHES.read_text()).items() if case in hashes or not args.only
    }
    differences = [
        f"{case}/{file}"
        for case in sorted(recorded.keys() | hashes.keys())
        for file in sorted(recorded.get(case, {}).keys() | hashes.get(case, {}).keys())
        if recorded.get(case, {}).get(file) != hashes.get(case, {}).get(file)
    ]
    for line in differences:
        print(f"differs: {line}")
    print(f"{len(differences)} of {sum(map(len, hashes.values()))} files differ from {HASHES.name}")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
