"""Experiment-only method variants registered in-process, then `llmquant eval` with argv[1:]."""
import functools, sys, torch
from llmquant import methods
from llmquant.methods import Method, METHODS, gptq, grid
from llmquant import quantize as qz

orig_gp, orig_search = qz.group_params, grid.search_clip

def group_params2(w, bits, sym, scale_dtype, ratio=1.0):
    if sym or not torch.is_tensor(ratio) or ratio.dim() != w.dim():
        return orig_gp(w, bits, sym, scale_dtype, ratio)
    max_code = (1 << bits) - 1
    lo = w.amin(dim=-1).clamp(max=0) * ratio[..., 0]
    hi = w.amax(dim=-1).clamp(min=0) * ratio[..., 1]
    scale = qz._storable((hi - lo) / max_code, scale_dtype).to(w.dtype)
    zero = torch.clamp(torch.round(-lo / scale), 0, max_code)
    return scale, zero

def search_lohi(w, hessian, bits, sym, scale_dtype):
    r = orig_search(w, hessian, bits, sym, scale_dtype)
    if sym:
        return r
    pair = torch.stack([r, r], -1)
    def err_of(p):
        scale, zero = group_params2(w, bits, sym, scale_dtype, p)
        d = w - grid.from_codes(qz.to_codes(w, scale, zero, bits), scale, zero)
        return (d * d).sum(1) if hessian is None else ((d @ hessian) * d).sum(1)
    best_err = err_of(pair)
    for side in (1, 0, 1):
        for c in grid.CLIP_RATIOS:
            cand = pair.clone(); cand[:, side] = c
            e = err_of(cand)
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            pair = torch.where(better.unsqueeze(1), cand, pair)
    return pair

def gptq_lohi(*a, **k):
    gptq.search_clip, gptq.group_params = search_lohi, group_params2
    try:
        return gptq.quantize(*a, **k)
    finally:
        gptq.search_clip, gptq.group_params = orig_search, orig_gp

for name, fn in [
    ("gptq-d10", functools.partial(gptq.quantize, percdamp=0.1)),
    ("gptq-d03", functools.partial(gptq.quantize, percdamp=0.03)),
    ("gptq-lohi", gptq_lohi),
    ("gptq-noact", functools.partial(gptq.quantize, act_order=False)),
]:
    METHODS[name] = Method(name, fn, True, name)
for name, fn in [("gptq-awq-lohi", gptq_lohi), ("gptq-awq-d10", functools.partial(gptq.quantize, percdamp=0.1))]:
    METHODS[name] = Method(name, fn, True, name, scaling=True)

from llmquant.cli import main
sys.exit(main(["eval", *sys.argv[1:]]))
