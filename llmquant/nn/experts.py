"""Mixture-of-Experts layers: finding transformers' experts modules and quantizing them.

In transformers 5 the routed experts of an MoE block are one module holding 3-D parameters, not
nn.Linear layers: `gate_up_proj` [E, 2I, H] (expert e's gate rows then its up rows) and
`down_proj` [E, H, I] (e.g. MixtralExperts, Qwen2MoeExperts, Qwen3MoeExperts). Each expert's
matrix is an ordinary linear weight [N, K], so it is quantized group-wise exactly like one
(`QuantExperts`: one packed matrix per expert, the layout of docs/FORMAT.md stacked along a
leading expert axis). Routers (`gate`, `shared_expert_gate`) stay in floating point by default;
shared experts (Qwen2-MoE) are nn.Linear layers and are quantized like any other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..kernels.layout import STORED_NAMES, stored_tensors
from .linear import QuantLinear

PROJECTIONS = ("gate_up_proj", "down_proj")
MEMBERS = STORED_NAMES  # each expert's slice holds a QuantLinear's tensors


def is_experts(module: nn.Module) -> bool:
    """A transformers experts module: 3-D `gate_up_proj` and `down_proj` weights per expert."""
    if isinstance(module, QuantExperts):
        return False
    weights = [getattr(module, p, None) for p in PROJECTIONS]
    return all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights) and hasattr(module, "num_experts")


def check_layout(name: str, module: nn.Module) -> None:
    """ValueError (one line) for an experts module whose layout QuantExperts does not run: weights
    stored transposed, biases, no gate, interleaved gate/up or a norm after each expert (gpt-oss,
    some research models), or a module not declared through transformers'
    `use_experts_implementation` (Llama-4's, whose forward takes pre-sorted tokens). The plain
    layout: gate, up = (x @ gate_up_proj[e].T).chunk(2);
    y = down_proj[e] @ (act(gate) * up)."""
    flags = {
        "is_transposed": False,
        "has_bias": False,
        "has_gate": True,
        "is_concatenated": True,
        "has_post_expert_norm": False,
    }
    odd = [f"{key}={getattr(module, key)}" for key, plain in flags.items() if getattr(module, key, plain) != plain]
    if not hasattr(module, "is_transposed"):  # not under transformers' experts interface (Llama-4: [E, H, 2I], bmm)
        odd.append("a layout outside transformers' experts interface")
    if odd or not isinstance(getattr(module, "act_fn", None), nn.Module | Callable):
        raise ValueError(
            f"{name} ({type(module).__name__}): experts with {', '.join(odd) or 'no act_fn'} are not supported; "
            f"keep them in float with modules_to_not_convert=[{name.rpartition('.')[2]!r}] (--skip)"
        )


def expert_shapes(module: nn.Module) -> dict[str, tuple[int, int, int]]:
    """{projection: (E, N, K)} of an experts module or a QuantExperts."""
    if isinstance(module, QuantExperts):
        return dict(module.shapes)
    return {p: tuple(getattr(module, p).shape) for p in PROJECTIONS}


class QuantExperts(nn.Module):
    """The routed experts of one MoE block with every expert matrix quantized.

    Buffers per projection P in (gate_up_proj, down_proj), expert matrix W_e: [N, K]:
    `P_qweight` [E, ceil(K/V), N] int32, `P_scales` [E, G, N] float, `P_qzeros` [E, G, N] uint8
    (asymmetric only): expert e's slice is exactly a QuantLinear's buffers (docs/FORMAT.md). The
    names are flat (`gate_up_proj_qweight`, not `gate_up_proj.qweight`) so that transformers'
    conversion rules, which match `experts.gate_up_proj`, never take them for float weights.

    forward(hidden_states [T, H], top_k_index [T, k] int64, top_k_weights [T, k]) -> [T, H], as the
    float module: each expert hit runs its tokens through two QuantLinear views of its slices (CPU
    kernel or dequantize + GEMM on CPU, the Triton kernel on CUDA: two launches per routed expert).
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, int, int]],
        bits: int,
        group_size: int,
        sym: bool,
        act_fn: nn.Module,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.shapes = {p: tuple(shapes[p]) for p in PROJECTIONS}
        self.num_experts = self.shapes["gate_up_proj"][0]
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.act_fn = act_fn
        for proj, shape in self.shapes.items():
            for name, buffer_dtype, buffer_shape in stacked_buffers(proj, shape, bits, group_size, sym, dtype):
                self.register_buffer(name, torch.zeros(buffer_shape, dtype=buffer_dtype, device=device))
        self.__dict__["_views"] = {}  # (projection, expert) -> (key, QuantLinear view); not submodules

    @classmethod
    def like(cls, experts: nn.Module, bits: int, group_size: int, sym: bool, dtype: torch.dtype | None = None):
        """An empty QuantExperts with the shapes, activation and device of the float `experts`."""
        weight = experts.gate_up_proj
        dtype = dtype or weight.dtype
        quantized = cls(expert_shapes(experts), bits, group_size, sym, experts.act_fn, dtype, weight.device)
        quantized.float_class = type(experts)  # what `to_float` builds back (llmquant.dequantize_)
        return quantized

    def to_float(self, model_config, dtype: torch.dtype | None = None) -> nn.Module:
        """The float experts module these were quantized from (its transformers class, built from
        the model's config), holding the dequantized [E, N, K] weights in `dtype` (default the scales')."""
        float_class = getattr(self, "float_class", None)
        if float_class is None:
            raise ValueError("these QuantExperts were not built from a float experts module; cannot dequantize them")
        with torch.device("meta"):
            experts = float_class(model_config)
        for proj in PROJECTIONS:
            weight = self.dequantize(proj, dtype)
            setattr(experts, proj, nn.Parameter(weight, requires_grad=False))
        return experts

    def packed(self, proj: str, expert: int) -> dict[str, torch.Tensor]:
        """Expert `expert`'s packed tensors of `proj` (views), as quantize_weight returns them."""
        return {m: getattr(self, f"{proj}_{m}")[expert] for m in MEMBERS if hasattr(self, f"{proj}_{m}")}

    def load_packed(self, proj: str, expert: int, packed: dict[str, torch.Tensor]) -> None:
        """Copy one expert's packed tensors (as quantize_weight returns them) into the buffers."""
        for member, value in packed.items():
            getattr(self, f"{proj}_{member}")[expert].copy_(value)

    def linear(self, proj: str, expert: int) -> QuantLinear:
        """A QuantLinear whose buffers are views of expert `expert`'s slices (made again when the
        buffers were replaced or moved, e.g. by loading or `.to()`)."""
        buffers = self.packed(proj, expert)
        key = tuple((t.data_ptr(), t.device, t.dtype) for t in buffers.values())
        cached = self._views.get((proj, expert))
        if cached is not None and cached[0] == key:
            return cached[1]
        _, n, k = self.shapes[proj]
        view = QuantLinear(k, n, self.bits, self.group_size, self.sym, bias=False, device="meta")
        for member, tensor in buffers.items():
            view._buffers[member] = tensor
        self._views[(proj, expert)] = (key, view)
        return view

    def dequantize(self, proj: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[E, N, K] float weights of `proj` (default dtype: the scales')."""
        return torch.stack([self.linear(proj, e).dequantize(dtype) for e in range(self.num_experts)])

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        hit = torch.unique(top_k_index).tolist()
        for expert in hit:
            if not 0 <= expert < self.num_experts:  # padding index of expert-parallel routers
                continue
            token_idx, top_k_pos = torch.where(top_k_index == expert)
            state = hidden_states[token_idx]
            gate, up = self.linear("gate_up_proj", expert)(state).chunk(2, dim=-1)
            out = self.linear("down_proj", expert)(self.act_fn(gate) * up)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def extra_repr(self) -> str:
        e, n, k = self.shapes["gate_up_proj"]
        group = "all" if self.group_size == -1 else self.group_size
        return (
            f"num_experts={e}, hidden={k}, intermediate={n // 2}, bits={self.bits}, group_size={group}, sym={self.sym}"
        )


def quantize_experts(
    experts: nn.Module,
    quantize: Callable[[str, int, torch.Tensor], dict[str, torch.Tensor]],
    bits: int,
    group_size: int,
    sym: bool,
    dtype: torch.dtype | None = None,
) -> QuantExperts:
    """A QuantExperts of the float `experts`, each expert matrix packed by quantize(projection,
    expert, W [N, K]) -> {"qweight", "scales"[, "qzeros"]}."""
    module = QuantExperts.like(experts, bits, group_size, sym, dtype)
    for proj in PROJECTIONS:
        weights = getattr(experts, proj).detach()
        for expert in range(module.num_experts):
            module.load_packed(proj, expert, quantize(proj, expert, weights[expert]))
    return module


def stacked_buffers(
    proj: str, shape: tuple[int, int, int], bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of the QuantExperts buffers of projection `proj` [E, N, K]: each
    expert's slice is a QuantLinear's qweight, scales and (asymmetric) qzeros."""
    experts, n, k = shape
    return [
        (f"{proj}_{name}", dtype, (experts, *one))
        for name, dtype, one in stored_tensors(n, k, bits, group_size, sym, scale_dtype)
    ]
