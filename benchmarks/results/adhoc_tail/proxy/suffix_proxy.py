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


DEPTHS = (0, 1, 2, 4, 8)
RETURN = 4


@torch.no_grad()
def measure(self, block, name, candidate, estimate):
    t0 = time.perf_counter()
    self.replay.advance(block)
    blocks = self.replay.blocks
    sums, n = FISHER["f"]
    last = min(block + max(DEPTHS), len(blocks) - 1)
    fs = {k: sums[f"model.layers.{block + k}.mlp.down_proj"].double() / n for k in DEPTHS if block + k <= last}
    totals = {k: 0.0 for k in fs}
    tokens = 0.0
    for u, inp in enumerate(self.replay.inputs):
        hidden = self.replay._hidden(u)
        streams = []
        for swap in (False, True):
            if swap:
                replace_module(self.model, name, candidate)
            try:
                h, outs = hidden, {}
                for k in range(last - block + 1):
                    o = blocks[block + k](h, *inp.args, **inp.kwargs)
                    h = o[0] if isinstance(o, (tuple, list)) else o
                    if k in fs:
                        outs[k] = h
            finally:
                if swap:
                    replace_module(self.model, name, self.base_modules[name])
            streams.append(outs)
        for k, f in fs.items():
            d = (streams[1][k] - streams[0][k]).double().square().reshape(-1, f.numel())
            totals[k] += 0.5 * float(d.sum(0) @ f)
        tokens += d.shape[0]
    vals = {k: v / tokens for k, v in totals.items()}
    LOG[name] = {"proxy": vals, "estimate": estimate, "s": time.perf_counter() - t0}
    k = max(d for d in vals if d <= RETURN)
    return vals[k], len(self.replay.inputs)


planning._TailProbe.measure = measure
from real_models import one

row = one("/work/cache/smollm2-135m", method, 0.4, 64, 256, 24, 512, "float32", 0, None)
row["proxy_log"] = LOG
json.dump(row, open(out, "w"))
print(method, row["perplexity"], row["seconds"], row["phase_seconds"], len(LOG))
