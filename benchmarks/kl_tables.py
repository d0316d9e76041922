"""Module-KL cost tables side by side: the exhaustive probes against the estimated allocations.

    python benchmarks/kl_tables.py --ratio 0.4                                   # the reference model
    python benchmarks/kl_tables.py --model /path/to/hf-folder --modules 'layers\\.1\\.'

For each allocation (default: ``module-kl``, ``module-kl-fisher``, ``module-kl-fisher`` with
``fisher_scale=probed``), compresses the model with `svd-llm-w` under that allocation (calibration:
``--samples`` × 256 tokens of the embedded training split, seed 0) and prints, per module whose name
matches ``--modules``, the table the knapsack saw (`CompressionReport.allocation["sensitivity"]`: KL
increase over the uniform baseline at each candidate retention, 0.1 … 1.0), the baseline KL, and the
Spearman rank correlation of each table with the first one over all entries. It is how BENCHMARKS.md
("Module-KL allocation: two probes per module") located the estimate's error: right within a module,
off across modules.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import method_config, spearman  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reference", help="a local Hugging Face causal-LM folder, or 'reference'")
    parser.add_argument("--allocations", nargs="+",
                        default=["module-kl", "module-kl-fisher", "module-kl-fisher+fisher_scale=probed"])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--modules", default=r"layers\.[01]\.", help="regular expression of the modules to print")
    args = parser.parse_args()
    if not 0 < args.ratio < 1 or args.samples < 1:
        parser.error("ratio must be in (0, 1); samples >= 1")
    try:
        pattern = re.compile(args.modules)
    except re.error as error:
        parser.error(f"--modules: {error}")
    configs = {a: method_config(f"svd-llm-w+allocation={a}", args.ratio) for a in args.allocations}

    from adasvd_lightning import compress_model, load_compressed, load_tokenizer
    from adasvd_lightning.core.errors import InvalidInputError
    from adasvd_lightning.core.serialization import check_model_folder
    from adasvd_lightning.display import quiet_libraries
    from adasvd_lightning.workflows import CalibrationSpec, calibration_batches

    quiet_libraries()
    if args.model == "reference":
        from adasvd_lightning.training.reference import resolve_model

        folder = resolve_model("reference", show_progress=False)
    else:
        folder = Path(args.model).expanduser()
        try:
            check_model_folder(folder)
        except InvalidInputError as error:
            parser.error(str(error))
    batches = calibration_batches(load_tokenizer(folder), CalibrationSpec(None, samples=args.samples, seq_len=256))
    tables, baselines = {}, {}
    for allocation, config in configs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = compress_model(load_compressed(folder), config, batches).allocation
        tables[allocation] = info["sensitivity"]
        baselines[allocation] = info.get("sensitivity_baseline", info.get("fisher_baseline_kl"))
    first = args.allocations[0]
    flat = {a: [v for row in t.values() for v in row] for a, t in tables.items()}
    for allocation in args.allocations:
        print(f"{allocation}: baseline KL {baselines[allocation]:.4f}, Spearman vs {first} "
              f"{spearman(flat[first], flat[allocation]):.3f}")
    for name in tables[first]:
        if not pattern.search(name):
            continue
        print(name)
        for allocation in args.allocations:
            print(f"  {allocation:<40} " + " ".join(f"{v:+.3e}" for v in tables[allocation][name]))


if __name__ == "__main__":
    main()
