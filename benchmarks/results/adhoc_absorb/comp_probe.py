"""Ad hoc: tail probes that refit the block's down_proj (closed-form U-step of its baseline factors) after
a gate_proj / up_proj candidate, as adasvd-duo's compensation would; attention rows unchanged.

The U-step is fitted on the dense model's MLP inputs over the probe batches (16 x 256 tokens):
X_o = act(gate x) * up x with dense gate/up, X_c = the same with the candidate in place.
Usage: python comp_probe.py METHOD RATIO OUT.json
"""
import json, sys, time
sys.path.insert(0, "/work/main/benchmarks")
import torch
from adasvd_lightning.core import planning
from adasvd_lightning.core.fisher import sequences
from adasvd_lightning.core.lowrank import LowRankLinear
from adasvd_lightning.core.refinement import GramStatistics, RefinementTarget, u_step
from adasvd_lightning.core.surgery import linear_weight, replace_module

method, ratio, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
LOG = {}
_init, _measure = planning._TailProbe.__init__, planning._TailProbe.measure


def init(self, model, blocks, batches, base_modules, tolerance, limit=0):
    self.mlp_in, self.dense_w = {}, {}
    for name, module in base_modules.items():
        self.dense_w[name] = linear_weight(model.get_submodule(name)).detach().clone()  # still dense here
    hooks = []
    for name in base_modules:
        if name.endswith("mlp.gate_proj"):
            mod = model.get_submodule(name)
            self.mlp_in[name.rsplit(".", 1)[0]] = []
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, key=name.rsplit(".", 1)[0]: self.mlp_in[key].append(a[0].reshape(-1, a[0].shape[-1]).detach())))
    with torch.no_grad():
        for b in batches:
            for seq in sequences(b):
                planning._logits(model, seq)
    for h in hooks:
        h.remove()
    self.mlp_in = {k: torch.cat(v) for k, v in self.mlp_in.items()}
    _init(self, model, blocks, batches, base_modules, tolerance, limit)


@torch.no_grad()
def measure(self, block, name, candidate, estimate):
    if not (name.endswith("mlp.gate_proj") or name.endswith("mlp.up_proj")):
        return _measure(self, block, name, candidate, estimate)
    mlp_name = name.rsplit(".", 1)[0]
    writer = mlp_name + ".down_proj"
    base_writer = self.base_modules[writer]
    if not isinstance(base_writer, LowRankLinear):
        return _measure(self, block, name, candidate, estimate)
    x = self.mlp_in[mlp_name]
    act = self.model.get_submodule(mlp_name).act_fn
    g, u = x @ self.dense_w[mlp_name + ".gate_proj"].T, x @ self.dense_w[mlp_name + ".up_proj"].T
    x_o = (act(g) * u).double()
    if name.endswith("gate_proj"):
        x_c = (act(candidate(x)) * u).double()
    else:
        x_c = (act(g) * candidate(x)).double()
    n = len(x)
    target = RefinementTarget(self.dense_w[writer], GramStatistics(x_c.T @ x_c / n, x_o.T @ x_c / n, x_o.T @ x_o / n))
    down = base_writer.down.detach().double()
    up = u_step(target, down)
    stepped = LowRankLinear.from_factors(up, down, None, dtype=base_writer.down.dtype)
    replace_module(self.model, writer, stepped)
    try:
        value, count = _measure(self, block, name, candidate, estimate)
    finally:
        replace_module(self.model, writer, base_writer)
    LOG[name] = value
    return value, count


planning._TailProbe.__init__ = init
planning._TailProbe.measure = measure
from real_models import one

t0 = time.time()
row = one("/work/cache/smollm2-135m", method, ratio, 64, 256, 24, 512, "float32", 0, None)
row["compensated_probes"] = LOG
json.dump(row, open(out, "w"))
print(method, ratio, row["perplexity"], row["seconds"], row.get("probing"), len(LOG), time.time() - t0)
