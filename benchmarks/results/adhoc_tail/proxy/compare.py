import json, sys, math
rec = json.load(open('/work/adhoc/reads40.json'))
base = rec['log']['base']
probe = {}
for p in rec['log']['probes']:
    kl, tok = zip(*p['kl'])
    probe[p['name']] = (sum(a - b[0] for a, b in zip(kl, base)) / sum(tok), p['estimate'])
row = json.load(open(sys.argv[1]))
log = row['proxy_log']
def rank(xs):
    o = sorted(range(len(xs)), key=xs.__getitem__); r = [0]*len(xs)
    for i, j in enumerate(o): r[j] = i
    return r
common = [n for n in log if n in probe]
print('proxied', len(log), 'common', len(common), 'ppl', row['perplexity'], 'sec', round(row['seconds']),
      'alloc', round(row['phase_seconds']['allocation']), 'proxy s', round(sum(v['s'] for v in log.values()),1))
a = [probe[n][0] for n in common]; b = [log[n]['proxy'] for n in common]; e = [log[n]['estimate'] for n in common]
ra, rb, re_ = rank(a), rank(b), rank(e)
def sp(x, y):
    n = len(x); return 1 - 6*sum((i-j)**2 for i, j in zip(x, y))/(n*(n*n-1))
print('spearman probe~proxy', round(sp(ra, rb), 3), 'probe~estimate', round(sp(ra, re_), 3))
print(f"{'module':40} {'est':>9} {'probe':>9} {'proxy':>9} {'p/e':>6} {'x/e':>6}")
for n in sorted(common, key=lambda n: -probe[n][0]/max(log[n]['estimate'],1e-12))[:25]:
    print(f"{n:40} {log[n]['estimate']:9.4f} {probe[n][0]:9.4f} {log[n]['proxy']:9.4f} {probe[n][0]/log[n]['estimate']:6.2f} {log[n]['proxy']/log[n]['estimate']:6.2f}")
import statistics as st
for kind in ('self_attn', 'mlp'):
    sel = [n for n in common if kind in n]
    print(kind, len(sel), 'median probe/est', round(st.median(probe[n][0]/log[n]['estimate'] for n in sel), 2),
          'median proxy/est', round(st.median(log[n]['proxy']/log[n]['estimate'] for n in sel), 2))
