"""`Transform`: what a method does to the model around the quantizer, as hooks that the
calibration loop (`llmquant.calibration.loop`) calls in order. The loop knows no method: it
fires these events for each transform of the preset (methods/presets.py); each hook here does
nothing, a transform overrides the ones it needs.

Events, with `run` the model-wide state (`llmquant.calibration.loop.Run`: model, prefix, config,
targets, changed, scale_dtype, device, hidden, hessian) and `block` one block's state
(`BlockRun`: index, name, block, names, hidden, kwargs, reference):
1. before_model(run): the model can run up to its first block, run.hidden [S, T, D] is the first
   block's input (a transform may replace it);
2. for each block: before_block(run, block) on the float block before its float reference output
   is taken (changes that keep that output: rotations); before_quantize(run, block) after it;
   then, during the quantizing pass, on_input(module, x [n, K] float32, H [K, K]) once per
   distinct linear input and target(weight [N, K]) -> the weight to quantize for each linear;
   after_block(run, block);
3. after_model(run).
"""

from __future__ import annotations

from typing import Any


class Transform:
    """A method's change to the model around the quantizer; every hook defaults to nothing."""

    changes_float_tensors = False  # True: needs `changed` to return the float tensors it rewrites

    def before_model(self, run: Any) -> None:
        pass

    def before_block(self, run: Any, block: Any) -> None:
        pass

    def before_quantize(self, run: Any, block: Any) -> None:
        pass

    def on_input(self, module: Any, x: Any, hessian: Any) -> None:
        pass

    def target(self, weight: Any) -> Any:
        return weight

    def after_block(self, run: Any, block: Any) -> None:
        pass

    def after_model(self, run: Any) -> None:
        pass
