"""Ad hoc: a tail probe table whose values are each probe's mean over its first K sequences (from reads40.json),
under the fingerprint of METHOD (which must carry tail_tolerance=0), for real_models.py --probe-tables."""
import json, sys, statistics as st
from pathlib import Path
sys.path.insert(0, "/work/main/benchmarks")
from common import method_config
from adasvd_lightning import load_compressed, load_tokenizer
from adasvd_lightning.core.planning import _PROBED_CONFIG, _PROBED_SPEC, probed_candidates
from adasvd_lightning.core.probe_table import ProbeTable, fingerprint
from adasvd_lightning.workflows import CalibrationSpec, calibration_batches
method, K, outdir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
d = json.load(open('/work/adhoc/reads40.json'))
base, est = d['log']['base'], d['allocation']['fisher_estimate']
model_dir = Path("/work/cache/smollm2-135m")
config = method_config(method, 0.4, statistics_dtype="float32")
spec = config.spec
model = load_compressed(model_dir)
batches = calibration_batches(load_tokenizer(model_dir), CalibrationSpec(None, samples=64, seq_len=256, seed=0))
settings = {key: config.to_dict()[key] for key in _PROBED_CONFIG}
settings.update({key: getattr(spec, key) for key in _PROBED_SPEC}, processes=1)
key = fingerprint(model, batches, settings)
outdir.mkdir(parents=True, exist_ok=True)
target = outdir / f"{model_dir.name}_0.4_64x256_seed0_float32_{spec.allocation}.jsonl"
assert not target.exists(), target
table = ProbeTable.open(str(target), key)
for p in d['log']['probes']:
    kl, tok = zip(*p['kl'])
    diffs = [(a - b[0]) / t for a, t, b in zip(kl, tok, base)]
    m = sum(a - b[0] for a, b in zip(kl, base)) / sum(tok)
    se = st.stdev(diffs) / len(diffs) ** 0.5
    (i,) = probed_candidates(est[p['name']], 'tail')
    values = [None] * len(est[p['name']])
    values[i] = sum(a - b[0] for a, b in list(zip(kl, base))[:K]) / sum(tok[:K])
    table.record(p['name'], values)
print(target, len(d['log']['probes']))
