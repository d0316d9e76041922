"""Ad hoc: adasvd-duo at 40 % on SmolLM2 with tail_tolerance=0 (every probe reads all 16 sequences); log each
probe's per-sequence KL sums and the baseline's, and the allocation info, to test stopping rules offline."""
import dataclasses, json, sys, warnings
from pathlib import Path
sys.path.insert(0, 'benchmarks')
import torch
from common import method_config
from adasvd_lightning import compress_model, load_compressed, load_tokenizer
from adasvd_lightning.core import planning
from adasvd_lightning.workflows import CalibrationSpec, calibration_batches
log = {'base': None, 'probes': []}
orig_init, orig_measure = planning._TailProbe.__init__, planning._TailProbe.measure
def init(self, *a, **k):
    orig_init(self, *a, **k)
    log['base'] = self.base_kl
def measure(self, block, name, candidate, estimate):
    seen = []
    kl = self._kl
    self._kl = lambda i, replay=False: (seen.append(kl(i, replay)) or seen[-1])
    try:
        out = orig_measure(self, block, name, candidate, estimate)
    finally:
        del self._kl
    log['probes'].append({'name': name, 'estimate': estimate, 'kl': seen})
    return out
planning._TailProbe.__init__, planning._TailProbe.measure = init, measure
torch.manual_seed(0)
d = Path('/work/cache/smollm2-135m')
tok = load_tokenizer(d); model = load_compressed(d)
batches = calibration_batches(tok, CalibrationSpec(None, samples=64, seq_len=256, seed=0))
config = method_config(sys.argv[1], float(sys.argv[2]), statistics_dtype='float32')
from adasvd_lightning.core.planning import plan_ranks
with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    report = compress_model(model, config, batches)
json.dump({'log': log, 'allocation': report.allocation}, open(sys.argv[3], 'w'), default=str)
