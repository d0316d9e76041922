"""Do the compensated writers shrink their outputs? Output energy and error of each residual writer.

    python benchmarks/writer_energy.py --ratio 0.8                      # the reference model
    python benchmarks/writer_energy.py --model /path/to/hf-folder --ratio 0.4 --samples 32

Compresses the model with each of ``--methods`` (default `svd-llm-w` and `svd-llm`: whitening alone and
the same plus the compensating U-step), runs the dense and each compressed model end to end on
``--windows`` × 256 tokens of the embedded test split, and prints, for every o_proj / down_proj, the
compressed output's energy as a fraction of the dense output's and its relative error against it. A
least-squares fit to the dense outputs from a far-off input keeps only the part of the output its
input can predict: low error at low energy. BENCHMARKS.md ("What the quality table says") has the
reference model at 40 and 80 %.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import method_config  # noqa: E402


def _writer_outputs(model, ids) -> dict[str, torch.Tensor]:
    outputs: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_hook(lambda mod, args, out, n=name: outputs.__setitem__(n, out.detach().double()))
               for name, module in model.named_modules() if name.endswith(("o_proj", "down_proj"))]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reference", help="a local Hugging Face causal-LM folder, or 'reference'")
    parser.add_argument("--methods", nargs="+", default=["svd-llm-w", "svd-llm"])
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--samples", type=int, default=64, help="calibration windows of 256 tokens (seed 0)")
    parser.add_argument("--windows", type=int, default=16, help="test windows of 256 tokens")
    args = parser.parse_args()
    if not 0 < args.ratio < 1 or args.samples < 1 or args.windows < 1:
        parser.error("ratio must be in (0, 1); samples, windows >= 1")
    configs = {m: method_config(m, args.ratio) for m in args.methods}  # unknown presets fail here

    from adasvd_lightning import compress_model, load_compressed, load_tokenizer
    from adasvd_lightning.core.corpus import embedded_corpus_path, read_text, tokenize_text
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
    tokenizer = load_tokenizer(folder)
    batches = calibration_batches(tokenizer, CalibrationSpec(None, samples=args.samples, seq_len=256))
    test = tokenize_text(tokenizer, read_text(embedded_corpus_path("test")))
    ids = test[: args.windows * 256].reshape(args.windows, 256)
    dense = _writer_outputs(load_compressed(folder), ids)
    compressed = {}
    for method, config in configs.items():
        model = load_compressed(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compress_model(model, config, batches)
        compressed[method] = _writer_outputs(model, ids)
    print(f"{folder.name}, {args.ratio:.0%}: per writer, output energy ÷ dense energy (E) and relative error vs "
          f"dense (err), end to end on {args.windows} × 256 test tokens")
    for name, d in dense.items():
        cells = []
        for method in configs:
            c = compressed[method][name]
            cells.append(f"{method}: E {float(c.square().sum() / d.square().sum()):.3f} "
                         f"err {float((c - d).norm() / d.norm()):.3f}")
        print(f"{name:<40} " + " | ".join(cells))


if __name__ == "__main__":
    main()
