"""Ad hoc: stopping rules for tail probes, from every probe's 16 per-sequence KL sums (dump_reads.py)."""
import json, sys, math
from pathlib import Path
import torch
from adasvd_lightning import load_compressed
from adasvd_lightning.core.surgery import find_targets, linear_shape
from adasvd_lightning.core.budget import MatrixShape, budget_for_ratio, rank_cost
from adasvd_lightning.core.planning import _candidate_rank, probed_candidates, tail_row
from adasvd_lightning.core.allocation import knapsack
from adasvd_lightning.core.methods import get_method
d = json.load(open(sys.argv[1]))
ratio = float(sys.argv[2])
log, alloc = d['log'], d['allocation']
est = alloc['fisher_estimate']
model = load_compressed(Path('/work/cache/smollm2-135m'))
blocks = {}
shapes = [MatrixShape(n, *linear_shape(m)) for _, _, t in find_targets(model) for n, m in t.items()]
cands = get_method('duo-svd').sensitivity_candidates
budget = budget_for_ratio(shapes, ratio)
ranks = {s.name: [_candidate_rank(s, r) for r in cands] for s in shapes}
base = log['base']
probes = {p['name']: p for p in log['probes']}
def value(p, k):
    kl = p['kl'][:k]
    return sum(a - b[0] for (a, _), b in zip(kl, base)) / sum(t for _, t in kl)
def rule_tol(p, tau, kmin=4):
    count = first = second = total = tokens = 0.0
    for j, ((a, t), b) in enumerate(zip(p['kl'], base)):
        diff = (a - b[0]) / t
        count += 1; first += diff; second += diff * diff; total += a - b[0]; tokens += t
        mean = total / tokens
        if tau > 0 and count >= kmin:
            var = max(second - first * first / count, 0) / (count - 1)
            if (var / count) ** 0.5 <= tau * max(mean, p['estimate']):
                return mean, int(count)
    return total / tokens, int(count)
def allocate(mvals):
    measured = {}
    while True:
        opts = []
        for s in shapes:
            row = est[s.name]
            if s.name in measured:
                i = min(probed_candidates(row, 'tail'))
                row = tail_row(row, [measured[s.name] if j == i else None for j in range(len(row))])
            opts.append([(rank_cost(s, r), v) for r, v in zip(ranks[s.name], row)])
        picked = knapsack(opts, budget)
        wanted = [s.name for s, k in zip(shapes, picked) if probed_candidates(est[s.name], 'tail') and s.name not in measured and est[s.name][k] > 0]
        if not wanted: return picked, measured
        for n in wanted:
            if n not in mvals: return None, n
            measured[n] = mvals[n]
full = {n: value(p, 16) for n, p in probes.items()}
ref, _ = allocate(full)
kept = lambda picked: [ranks[s.name][k] or min(s.out_features, s.in_features) for s, k in zip(shapes, picked)]
print('probes', len(probes))
for label, fn in [('all 16', lambda p: (value(p, 16), 16))] + [(f'fixed {k}', (lambda k: lambda p: (value(p, k), k))(k)) for k in (2, 4, 8)] + [(f'tol {t}', (lambda t: lambda p: rule_tol(p, t))(t)) for t in (0.05, 0.1, 0.2, 0.3, 0.5, 1e9)]:
    res = {n: fn(p) for n, p in probes.items()}
    mv = {n: v for n, (v, _) in res.items()}
    picked, measured = allocate(mv)
    if picked is None:
        print(label, 'needs unprobed', measured); continue
    moved = sum(1 for a, b in zip(picked, ref) if a != b)
    moved_params = sum(abs(rank_cost(s, ranks[s.name][a]) - rank_cost(s, ranks[s.name][b])) for s, a, b in zip(shapes, picked, ref)) / 2 / budget
    reads = [res[n][1] for n in measured]
    rel = [abs(mv[n] - full[n]) / max(full[n], p['estimate']) for n, p in probes.items()]
    print(f'{label:10s} probes {len(measured):3d} reads mean {sum(reads)/len(reads):5.2f}  moved modules {moved:3d} params {moved_params:.3f}  rel err median {sorted(rel)[len(rel)//2]:.3f} max {max(rel):.2f}')
