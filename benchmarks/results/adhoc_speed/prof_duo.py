"""Ad hoc: cProfile of adasvd-duo on SmolLM2-135M at 40 % (64 x 256), to see where allocation goes."""
import cProfile, pstats, sys, time, warnings
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks")
from real_models import method_config
from adasvd_lightning import compress_model, load_compressed, load_tokenizer
from adasvd_lightning.display import quiet_libraries
from adasvd_lightning.workflows import CalibrationSpec, calibration_batches
quiet_libraries(); torch.manual_seed(0)
d = Path("/work/cache/smollm2-135m")
tok = load_tokenizer(d); model = load_compressed(d)
batches = calibration_batches(tok, CalibrationSpec(None, samples=64, seq_len=256, seed=0))
config = method_config(sys.argv[1], 0.4, statistics_dtype="float32")
pr = cProfile.Profile()
t = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pr.enable(); report = compress_model(model, config, batches); pr.disable()
print("seconds", time.perf_counter() - t, report.phase_seconds)
pr.dump_stats(sys.argv[2])
st = pstats.Stats(pr); st.sort_stats("cumulative").print_stats(60)
