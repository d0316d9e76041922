"""How much of each down_proj's squared error one position holds: the attention-sink diagnostic.

    python benchmarks/sink_tokens.py --model /path/to/hf-folder [--samples 8] [--seq-len 256]

Runs the dense model on calibration windows (as `real_models.py` draws them) and prints, per block, the
first position's share of down_proj's input and output energy, and the first position's residual RMS
over the median token's. A share near 1 means an unweighted squared-error fit of that matrix is a fit
to one token (BENCHMARKS.md, "the compensated presets at 20 %"; `core/residual.py` weights it away).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    if args.samples < 1 or args.seq_len < 2:
        parser.error("samples >= 1, seq-len >= 2")
    from adasvd_lightning import load_compressed, load_tokenizer
    from adasvd_lightning.core.errors import InvalidInputError
    from adasvd_lightning.core.serialization import check_model_folder
    from adasvd_lightning.workflows import CalibrationSpec, calibration_batches

    path = Path(args.model).expanduser()
    try:
        check_model_folder(path)
    except InvalidInputError as error:
        parser.error(str(error))
    tokenizer, model = load_tokenizer(path), load_compressed(path)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(getattr(layer, "mlp", None), "down_proj") for layer in layers):
        parser.error("this diagnostic reads Llama-style blocks (model.model.layers[i].mlp.down_proj)")
    batches = calibration_batches(tokenizer, CalibrationSpec(None, samples=args.samples, seq_len=args.seq_len))
    ids = torch.cat([b["input_ids"] if isinstance(b, dict) else b for b in batches])
    seen: dict[tuple[int, str], torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        down = layer.mlp.down_proj
        down.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__((i, "in"), a[0].detach()))
        down.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__((i, "out"), o.detach()))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    print("| block | first position's share of down_proj input energy | of its output energy | residual RMS, first / median |")
    print("|---|---|---|---|")
    for i in range(len(model.model.layers)):
        e_in, e_out = (seen[(i, k)].double().square().sum(-1) for k in ("in", "out"))
        rms = hidden[i + 1].double().square().mean(-1).sqrt()
        print(f"| {i} | {float(e_in[:, 0].sum() / e_in.sum()):.3f} | {float(e_out[:, 0].sum() / e_out.sum()):.3f} "
              f"| {float(rms[:, 0].median() / rms[:, 1:].median()):.1f} |")


if __name__ == "__main__":
    main()
