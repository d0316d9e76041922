import json, sys
from pathlib import Path
import torch
from adasvd_lightning import load_compressed
from adasvd_lightning.core.surgery import find_targets, linear_shape
from adasvd_lightning.core.budget import MatrixShape, budget_for_ratio, rank_cost
from adasvd_lightning.core.planning import _candidate_rank, probed_candidates, tail_row
from adasvd_lightning.core.allocation import knapsack
from adasvd_lightning.core.methods import get_method
d = json.load(open(sys.argv[1]))['allocation']
model = load_compressed(Path('/work/cache/smollm2-135m'))
shapes = [MatrixShape(n, *linear_shape(m)) for _, _, t in find_targets(model) for n, m in t.items()]
cands = get_method('duo-svd').sensitivity_candidates
ratio = float(sys.argv[2]) if len(sys.argv) > 2 else 0.4
budget = budget_for_ratio(shapes, ratio)
est, full = d['fisher_estimate'], d['sensitivity']
ranks = {s.name: [_candidate_rank(s, r) for r in cands] for s in shapes}
measured = {}
rounds = 0
while True:
    opts = []
    for s in shapes:
        row = est[s.name]
        if s.name in measured: row = full[s.name]
        opts.append([(rank_cost(s, r), v) for r, v in zip(ranks[s.name], row)])
    picked = knapsack(opts, budget)
    wanted = [s.name for s, k in zip(shapes, picked) if probed_candidates(est[s.name], 'tail') and s.name not in measured and est[s.name][k] > 0]
    if not wanted: break
    rounds += 1
    print('round', rounds, len(wanted))
    for n in wanted: measured[n] = 1
print('probes', len(measured), 'of', sum(1 for s in shapes if probed_candidates(est[s.name], 'tail')), 'rounds', rounds)
fullpick = knapsack([[(rank_cost(s, r), v) for r, v in zip(ranks[s.name], full[s.name])] for s in shapes], budget)
print('same picks', picked == fullpick)
