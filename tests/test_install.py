"""The built wheel, installed outside the source tree, does what the README's user section says.

The wheel is built from a copy of the working tree (tracked and untracked, not ignored files), so
the build leaves nothing in the checkout. It is installed with `pip install` into a fresh venv
that sees neither the checkout nor ../shared; every command runs from another working directory
and gets the shared test data only as explicit arguments, offline (HF_HUB_OFFLINE=1).

Dependencies: a cold `pip install torch==2.13.0 llmquant.whl` takes minutes on a 2-core machine (8
min measured by hand, 14 min inside this test, both at a load average near 10), so the dependencies
live in a venv cached under ~/.cache/llmquant (LLMQUANT_CACHE), keyed by the wheel's declared
dependencies and the Python version, and made by installing the wheel itself and uninstalling
llmquant again. Each run makes a fresh venv that adds the cached one's site-packages
(site.addsitedir, so their .pth files run as installed) and `pip install`s the wheel into it: pip
resolves the wheel's Requires-Dist against what is there, and llmquant's own files, console script
and .pth hook are new every run. A new dependency changes the key, so the cache cannot hide a
missing one. LLMQUANT_FRESH_VENV=1 rebuilds it. With it cached the test takes 2.4 min (6.4 min at load 10).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from .conftest import SHARED_DATA, STORIES

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LLMQUANT_CACHE", Path.home() / ".cache" / "llmquant")) / "install-test"
TORCH = "torch==2.13.0"  # a CPU wheel on the development machines' disk (scripts/setup pins the same)
C4_SAMPLE = SHARED_DATA / "c4-calibration-sample.txt"
TINY_TEXT = SHARED_DATA / "tinystories-valid-excerpt.txt"
# What a path out of the package looks like: the development data folder, or climbing from __file__.
ESCAPE = re.compile(r"shared/|[\"']shared[\"']|parents\[|__file__.*\.parent\.parent|[\"']\.\./")


def _run(cmd: list, timeout: int = 900, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _build_wheel(scratch: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the working tree (the checkout stays clean)."""
    listed = _run(["git", "-C", ROOT, "ls-files", "-co", "--exclude-standard", "-z"]).stdout.split("\0")
    src = scratch / "src"
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", scratch / "wheel", src])
    (wheel,) = (scratch / "wheel").glob("llmquant-*.whl")
    return wheel


def _requirements(wheel: Path) -> list[str]:
    """The wheel's core Requires-Dist lines (no extras)."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    return sorted(x.split(":", 1)[1].strip() for x in lines if x.startswith("Requires-Dist:") and "extra ==" not in x)


def _site_packages(venv: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(_run([venv / "bin" / "python", "-c", code]).stdout.strip())


def _dependency_venv(wheel: Path) -> Path:
    """The cached venv holding the wheel's dependencies and no llmquant."""
    key = hashlib.sha256("\n".join([sys.version, TORCH, *_requirements(wheel)]).encode()).hexdigest()[:16]
    venv = CACHE / f"deps-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"deps-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs never build (or read a half-built) one together
        done = venv / ".complete"
        if done.exists() and os.environ.get("LLMQUANT_FRESH_VENV") != "1":
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", venv])
        pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        _run([*pip, TORCH, wheel], timeout=1800)
        _run([venv / "bin" / "python", "-m", "pip", "uninstall", "-y", "-q", "llmquant"])
        done.write_text(str(wheel.name))
    return venv


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh venv with the built wheel pip-installed; the environment and folders to run it with."""
    scratch = tmp_path_factory.mktemp("install")
    wheel = _build_wheel(scratch)
    deps = _dependency_venv(wheel)
    venv = scratch / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    site = _site_packages(venv)
    (site / "_deps.pth").write_text(f"import site; site.addsitedir({str(_site_packages(deps))!r})\n")
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel])
    _run([venv / "bin" / "python", "-m", "pip", "check"])  # every Requires-Dist of every package is met
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "TRITON", "LLMQUANT"))}
    env.update(
        PATH=f"{venv / 'bin'}:/usr/bin:/bin",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(scratch / "hf"),  # no cache of the developer's: only what the commands fetch themselves
        TOKENIZERS_PARALLELISM="false",
    )
    cwd = scratch / "elsewhere"
    cwd.mkdir()
    return {"venv": venv, "site": site, "env": env, "cwd": cwd, "wheel": wheel}


def _cli(installed: dict, *args, code: int = 0) -> subprocess.CompletedProcess:
    cmd = [str(installed["venv"] / "bin" / "llmquant"), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=installed["env"], cwd=installed["cwd"])
    assert done.returncode == code, f"{cmd}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    if code == 2:  # bad input: one line, no traceback
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    return done


def test_installed_wheel_runs_the_documented_commands_outside_the_checkout(installed):
    env, cwd, venv = installed["env"], installed["cwd"], installed["venv"]
    python = venv / "bin" / "python"
    where = _run([python, "-c", "import llmquant; print(llmquant.__file__, llmquant.__version__)"], env=env, cwd=cwd)
    path, version = where.stdout.split()
    assert Path(path).is_relative_to(installed["site"]) and not Path(path).is_relative_to(ROOT)
    assert _cli(installed, "--version").stdout == f"llmquant {version}\n"
    assert installed["wheel"].name.startswith(f"llmquant-{version}-")

    rtn, gptq = cwd / "s260k-rtn", cwd / "s260k-gptq"
    _cli(installed, "quantize", STORIES, "-o", rtn, "--bits", "4", "--group-size", "32", "--quiet")
    calib = ["--calib", C4_SAMPLE, "--nsamples", "8", "--calib-seqlen", "64"]
    _cli(installed, "quantize", STORIES, "-o", gptq, "--group-size", "32", "--method", "gptq", *calib, "--quiet")
    recorded = json.loads((gptq / "config.json").read_text())["quantization_config"]
    assert recorded["method"] == "gptq" and recorded["calibration"]["dataset"].endswith(C4_SAMPLE.name)

    # the default calibration set is on the Hub: offline, one line that says how to use a local file
    err = _cli(installed, "quantize", STORIES, "-o", cwd / "default", "--method", "gptq", code=2).stderr
    assert "'c4' comes from the Hugging Face Hub, which is not reachable" in err and "--calib PATH" in err
    assert not (cwd / "default").exists()

    # a plain from_pretrained in a process that never imports llmquant: the .pth hook registers it
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'llmquant' not in sys.modules\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(gptq)!r})\n"
        "kinds = {type(m).__module__ + '.' + type(m).__name__ for m in model.modules()}\n"
        "assert 'llmquant.nn.linear.QuantLinear' in kinds, kinds\n"
        "with torch.no_grad():\n"
        "    logits = model(input_ids=torch.arange(3, 35).view(1, 32)).logits\n"
        f"torch.save(logits, {str(cwd / 'logits.pt')!r})\n"
    )
    _run([python, "-c", code], env=env, cwd=cwd)
    # ... and it computes what the checkout's llmquant computes from the same folder
    expected = AutoModelForCausalLM.from_pretrained(gptq)
    with torch.no_grad():
        reference = expected(input_ids=torch.arange(3, 35).view(1, 32)).logits
    torch.testing.assert_close(torch.load(cwd / "logits.pt"), reference)

    report = cwd / "eval.json"
    data = ["--dataset", TINY_TEXT, "--seqlen", "128", "--max-windows", "4", "--no-progress"]
    _cli(installed, "eval", rtn, "--baseline", STORIES, *data, "--json", report)
    models = {m["name"]: m for m in json.loads(report.read_text())["models"]}
    assert models["baseline"]["ppl"] < models["s260k-rtn"]["ppl"] < 2 * models["baseline"]["ppl"]

    err = _cli(installed, "eval", rtn, "--baseline", STORIES, code=2).stderr  # default: wikitext2 from the Hub
    assert "'wikitext2' must come from the Hugging Face Hub" in err and "--dataset PATH" in err
    err = _cli(installed, "eval", rtn, *data, "--report", cwd / "r", code=2).stderr  # plots extra not installed
    assert 'needs matplotlib, which is not installed: pip install "llmquant[plots]"' in err


def test_no_installed_file_points_outside_the_package(installed):
    """Every file the wheel installed lies in the package (or is its .pth hook and console script),
    and none names the development data folder or climbs out of the package from __file__."""
    site = installed["site"]
    (record,) = site.glob("llmquant-*.dist-info/RECORD")
    files = [(site / line.split(",")[0]).resolve() for line in record.read_text().splitlines() if line]
    base = site.resolve()
    inside = {f.relative_to(base).parts[0] for f in files if f.is_relative_to(base)}
    package = {"llmquant", "_llmquant_autoload.py", "llmquant-autoload.pth", record.parent.name}
    assert inside - {"__pycache__"} == package
    assert [f for f in files if not f.is_relative_to(base)] == [(installed["venv"] / "bin" / "llmquant").resolve()]
    sources = [f for f in files if f.suffix in (".py", ".pth") and f.exists()]
    assert len(sources) > 50
    escapes = [f"{f.relative_to(base)}: {m.group()}" for f in sources for m in ESCAPE.finditer(f.read_text())]
    assert escapes == []
    assert ESCAPE.search('DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data"')  # it would see one
    assert ESCAPE.search("ROOT = Path(__file__).parent.parent")
    assert not ESCAPE.search("created = [p for p in (out.parent, *out.parent.parents)]")  # publish.py: no escape

