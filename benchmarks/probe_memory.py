"""Peak host memory of one module-KL probe batch (`core.planning._sensitivity_metric`) on a real model.

    python benchmarks/probe_memory.py --model /path/to/hf-folder --batch-size 8 --seq-len 256

Loads the model, computes the dense reference log-probabilities of one random batch (as the module-KL
allocation keeps them), then runs the probe metric once and prints the process's peak resident memory
before and after: the difference is what a probe adds on top of the allocation's standing memory. At a
large vocabulary the vocabulary-sized temporaries (logits, log-probabilities, the KL's terms) dominate.
"""

from __future__ import annotations

import argparse
import resource

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face causal-LM folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    if args.batch_size < 1 or args.seq_len < 2:
        parser.error("batch size >= 1, seq-len >= 2")

    from adasvd_lightning import load_compressed
    from adasvd_lightning.core.calibration import model_forward
    from adasvd_lightning.core.errors import InvalidInputError
    from adasvd_lightning.core.planning import _sensitivity_metric
    from adasvd_lightning.core.serialization import check_model_folder

    try:
        check_model_folder(args.model)
    except InvalidInputError as error:
        parser.error(str(error))
    model = load_compressed(args.model)
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = [torch.log_softmax(model_forward(model, batch).logits.float(), dim=-1)]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        _sensitivity_metric(model, [batch], reference, "module-kl")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"vocabulary {vocab}, batch {args.batch_size}×{args.seq_len}: peak {before:.0f} MB before the probe, "
          f"{after:.0f} MB after (+{after - before:.0f} MB)")


if __name__ == "__main__":
    main()
