"""scripts/bench_gpu, the one call on the GPU machine (issue 21), proven on CPU: its dry run runs every
step (the Triton kernels through the interpreter, tiny shapes) and leaves at most 8 files in $OUT."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_gpu"
STEPS = ("install", "tests", "kernels", "e2e", "eval", "quantize")


def run_script(out: Path, *args: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(
        [str(SCRIPT), "--dry-run", *args], env=full_env, capture_output=True, text=True, timeout=timeout
    )


def one(out: Path, pattern: str) -> dict:
    (path,) = out.glob(pattern)
    return json.loads(path.read_text())


def test_caps_add_up_to_under_six_minutes():
    text = SCRIPT.read_text()
    caps = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A cap=\((.*)\)", text).group(1)))
    assert set(caps) == set(STEPS)
    total = int(re.search(r"total_s=\$\{TOTAL_S:-\$\(\((\d+) \* factor\)\)\}", text).group(1))
    assert sum(map(int, caps.values())) <= total <= 355  # + bookkeeping, under the 360 s of one call
    for step, cap in caps.items():  # the header's budget table says the same
        assert re.search(rf"#\s+{step}\s+{cap}\s", text), step


def test_dry_run_runs_every_step_and_writes_at_most_8_files(tmp_path):
    # Generous limits: the caps are sized for the GPU machine; the interpreter on a busy CPU is slower.
    caps = {f"CAP_{s.upper()}": "400" for s in STEPS}
    done = run_script(tmp_path, TOTAL_S="3000", **caps)
    log = (tmp_path / "bench_gpu.log").read_text()
    assert done.returncode == 0, log[-3000:]
    assert "DRY RUN" in log
    for step in STEPS:
        assert re.search(rf"== {step} done in \d+s, rc 0 \(ok\)", log), step
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) <= 8, files
    assert all("dryrun" in name for name in files if name.endswith((".json", ".md"))), files

    kernels = one(tmp_path, "bench_kernels-dryrun-*.json")
    assert kernels["dry_run"] and kernels["env"]["device"].endswith("threads") and kernels["env"]["git_commit"]
    rows = kernels["results"]
    assert {(r["quant"], r["m"]) for r in rows} == {
        ("int4-g128-asym", 1), ("int4-g128-asym", 16), ("int8-g128-sym", 1), ("int4-g128-asym", 2048)
    }  # fmt: skip
    assert {r["route"] for r in rows} == {"gemv", "gemm", "dequant"}
    for r in rows:
        assert {"n", "k", "m", "speedup", "quant"} <= set(r) and r["speedup"] > 0 and r["dry_run"] and r["ok"]
    assert "DRY RUN" in next(tmp_path.glob("bench_kernels-dryrun-*.md")).read_text()

    e2e = one(tmp_path, "bench_e2e-dryrun-*.json")
    assert e2e["dry_run"] and [r["model"] for r in e2e["results"]] == ["fp16", "int4-g128"]
    assert e2e["results"][1]["quant_linear_layers"] == 7
    assert all(e2e[k] > 0 for k in ("decode_speedup", "eager_generate_speedup", "prefill_speedup"))

    evaluated = one(tmp_path, "eval-stories260k-dryrun-*.json")
    assert evaluated["dry_run"] and set(evaluated["runs"]) == {"cpu-float32", "interpreter-float32"}
    assert evaluated["equal_to_cpu"] and evaluated["max_abs_diff"] <= 1e-3

    quantized = one(tmp_path, "quantize-gptq-rot-dryrun-*.json")
    assert quantized["dry_run"] and quantized["exit_code"] == 0 and len(quantized["block_seconds"]) == 2
    assert quantized["extrapolated_32_layer_seconds"] > 0 and quantized["cuda_max_allocated_bytes"] is None

    with tarfile.open(tmp_path / "tuned-configs.tar.gz") as tar:
        assert "tuned" in tar.getnames()


def test_a_step_over_its_cap_is_killed_and_its_log_still_comes_back(tmp_path):
    done = run_script(tmp_path, "kernels", timeout=120, CAP_KERNELS="5")
    log = (tmp_path / "bench_gpu.log").read_text()
    assert done.returncode == 124, log
    assert "== kernels done in" in log and "killed at its limit" in log
    assert (tmp_path / "tuned-configs.tar.gz").is_file()


def test_an_unknown_step_is_refused_before_anything_runs(tmp_path):
    done = run_script(tmp_path / "out", "kernels", "kernel", timeout=60)
    assert done.returncode == 2 and "unknown step 'kernel'" in done.stderr
    assert not (tmp_path / "out").exists()


def test_no_step_starts_without_time_left(tmp_path):
    done = run_script(tmp_path, "kernels", timeout=60, TOTAL_S="3")
    log = (tmp_path / "bench_gpu.log").read_text()
    assert done.returncode == 0 and "== kernels skipped" in log, log
