"""Ad hoc: the reference model's tail probes at 80 %, 4 vs 16 sequences."""
import sys, warnings, torch
sys.path.insert(0, "/work/main/benchmarks")
from common import method_config
from adasvd_lightning import compress_model, load_compressed, load_tokenizer
from adasvd_lightning.training.reference import resolve_model
from adasvd_lightning.workflows import CalibrationSpec, calibration_batches
path = resolve_model("reference", show_progress=False)
tok = load_tokenizer(path)
batches = calibration_batches(tok, CalibrationSpec(None, samples=64, seq_len=256))
out = {}
for method in sys.argv[1:]:
    torch.manual_seed(0)
    model = load_compressed(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compress_model(model, method_config(method, 0.8), batches)
    a = report.allocation
    out[method] = (a["sensitivity_probe_values"], a["fisher_estimate"], {m.name: m.rank for m in report.modules}, a["sensitivity_probe_sequences"], a.get("sensitivity_baseline"))
from adasvd_lightning.core.planning import probed_candidates
m4, m16 = sys.argv[1], sys.argv[2]
p4, est, r4, s4, b4 = out[m4]; p16, _, r16, s16, b16 = out[m16]
print("baseline KL", b4, b16, "seqs", set(s4.values()), set(s16.values()))
for name in est:
    i = probed_candidates(est[name], "tail")
    e = est[name][min(i)] if i else None
    a, b = p4.get(name), p16.get(name)
    if a is None and b is None and r4[name] == r16[name]:
        continue
    print(f"{name:32} est {e if e is None else round(e,4)!s:>8} p4 {a if a is None else round(a,4)!s:>8} p16 {b if b is None else round(b,4)!s:>8}  rank4 {r4[name]!s:>5} rank16 {r16[name]!s:>5}")
