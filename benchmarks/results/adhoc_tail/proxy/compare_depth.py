import json, sys, statistics as st
rec = json.load(open('/work/adhoc/reads40.json'))
base = rec['log']['base']
probe = {}
for p in rec['log']['probes']:
    kl, tok = zip(*p['kl'])
    probe[p['name']] = sum(a - b[0] for a, b in zip(kl, base)) / sum(tok)
row = json.load(open(sys.argv[1])); log = row['proxy_log']
print('ppl', row['perplexity'], 'alloc s', round(row['phase_seconds']['allocation']), 'proxy s', round(sum(v['s'] for v in log.values())))
def rank(xs):
    o = sorted(range(len(xs)), key=xs.__getitem__); r = [0]*len(xs)
    for i, j in enumerate(o): r[j] = i
    return r
def sp(x, y):
    n = len(x); rx, ry = rank(x), rank(y); return 1 - 6*sum((i-j)**2 for i, j in zip(rx, ry))/(n*(n*n-1))
for k in ('0', '1', '2', '4', '8'):
    names = [n for n in log if n in probe and k in log[n]['proxy']]
    a = [probe[n] for n in names]; b = [log[n]['proxy'][k] for n in names]; e = [log[n]['estimate'] for n in names]
    big = [n for n in names if probe[n] / log[n]['estimate'] > 5]
    print(f"depth {k}: n={len(names)} spearman(probe, proxy)={sp(a,b):.3f} (probe, est)={sp(a,e):.3f}  "
          f"median proxy/est mlp={st.median(log[n]['proxy'][k]/log[n]['estimate'] for n in names if 'mlp' in n):.2f} "
          f"attn={st.median(log[n]['proxy'][k]/log[n]['estimate'] for n in names if 'attn' in n):.2f}  "
          f"big lifts (probe/est>5): " + ", ".join(f"{n.split('layers.')[1]} p{probe[n]/log[n]['estimate']:.0f} x{log[n]['proxy'][k]/log[n]['estimate']:.1f}" for n in big))
