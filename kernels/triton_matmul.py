"""The public entry of the Triton kernels (kept for existing imports): `quant_matmul` and its config
type. The kernels live by family in `gemv.py`, `gemm.py` and `prefill.py`, routing and the custom
op in `dispatch.py`, candidate configs and the tuned-config cache in `tuning.py`."""

from .dispatch import quant_matmul
from .tuning import KernelConfig, candidate_configs

__all__ = ["KernelConfig", "candidate_configs", "quant_matmul"]
