"""Ad hoc: the tail route with a block-local probe instead of the full suffix probe.

The probe value is ½ Σ_i F̄_i E_t[(Δh_ti)²], Δh = block output with the module at its candidate − block output
at the baseline, on the probe sequences' baseline-context block inputs, F̄ = the diagonal Fisher of the
block's residual output (the Fisher of the block's last target, down_proj). Usage:
python block_proxy.py METHOD OUT.json
"""
import json, sys, time
sys.path.insert(0, "/work/main/benchmarks")
import torch
from adasvd_lightning.core import planning
from adasvd_lightning.core.surgery import replace_module

method, out = sys.argv[1], sys.argv[2]
FISHER = {}
LOG = {}
_orig_tail = planning._allocate_tail


def tail(ctx, fisher):
    FISHER["f"] = fisher
    return _orig_tail(ctx, fisher)


planning._allocate_tail = tail


@torch.no_grad()
def measure(self, block, name, candidate, estimate):
    t0 = time.perf_counter()
    self.replay.advance(block)
    blk = self.replay.blocks[block]
    sums, n = FISHER["f"]
    f = sums[f"model.layers.{block}.mlp.down_proj"].double() / n
    total = tokens = 0.0
    per = []
    for u, inp in enumerate(self.replay.inputs):
        hidden = self.replay._hidden(u)
        base = blk(hidden, *inp.args, **inp.kwargs)
        base = base[0] if isinstance(base, (tuple, list)) else base
        replace_module(self.model, name, candidate)
        try:
            cand = blk(hidden, *inp.args, **inp.kwargs)
        finally:
            replace_module(self.model, name, self.base_modules[name])
        cand = cand[0] if isinstance(cand, (tuple, list)) else cand
        d = (cand - base).double().square().reshape(-1, f.numel())
        v = 0.5 * float(d.sum(0) @ f)
        per.append(v)
        total += v
        tokens += d.shape[0]
    LOG[name] = {"proxy": total / tokens, "estimate": estimate, "per": per, "s": time.perf_counter() - t0}
    return total / tokens, len(per)


planning._TailProbe.measure = measure
from real_models import one

row = one("/work/cache/smollm2-135m", method, 0.4, 64, 256, 24, 512, "float32", 0, None)
row["proxy_log"] = LOG
json.dump(row, open(out, "w"))
print(method, row["perplexity"], row["seconds"], row["phase_seconds"], len(LOG))
