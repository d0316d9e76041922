"""Peak host memory of loading a compressed folder, against the folder's size and the dense model's.

    python benchmarks/load_memory.py                      # 4 Llama blocks at 4096/11008, bf16, 40% smaller
    python benchmarks/load_memory.py --layers 2 --ratio 0.6

A synthetic Llama (7B-wide blocks, a small vocabulary so that the blocks dominate) is factorized at
random with the ranks a ``--ratio`` compression gives every linear layer, and saved with
`save_compressed` — no SVD is run, this measures loading, not compressing. Each loader then runs in a
fresh process. Two figures, both above what the process held just before the call: the peak resident
set (``ru_maxrss``; it counts the safetensors pages the loader mapped and touched, which the kernel
can drop again) and the peak anonymous memory (``RssAnon`` sampled every 2 ms: tensors and other heap
that cannot be dropped):

* ``load_compressed`` / ``AutoModelForCausalLM.from_pretrained``: the architecture is built on the
  meta device, the quantizer puts the factorized modules in, the safetensors are read into them.
* ``dense-first`` (the loader before this change, kept here as the baseline): build the whole dense
  architecture, replace the factorized layers, then read the state dict and copy it in.

Results go to ``benchmarks/results/load_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "load_memory.json"

LOADERS = {
    "load_compressed": "from adasvd_lightning import load_compressed\nmodel = load_compressed(folder)\n",
    "from_pretrained": (
        "import adasvd_lightning\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(folder)\n"
    ),
    "dense-first": (
        "from transformers import AutoConfig\n"
        "from adasvd_lightning.core import serialization as s, hf_format\n"
        "config = AutoConfig.from_pretrained(folder)\n"
        "model = s.build_empty_model(type(config).__mro__[1].from_dict(config.to_dict()))\n"
        "s.apply_manifest(model, hf_format.manifest_of(config))\n"
        "state = s._load_state_dict(s._weight_files(Path(folder)))\n"
        "model.to(next(iter(state.values())).dtype)\n"
        "s.load_weights(model, state, source=folder, assign=True)\n"
    ),
}

PROBE = """
import resource, sys, threading, torch
from pathlib import Path
folder = sys.argv[1]
import adasvd_lightning, transformers.modeling_utils  # imports are not the loader's memory
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
anon_peak, done = [status("RssAnon")], threading.Event()
def sample():
    while not done.wait(0.002):
        anon_peak[0] = max(anon_peak[0], status("RssAnon"))
before, anon_before = status("VmRSS"), status("RssAnon")
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
{loader}
done.set(); sampler.join()
anon_peak = max(anon_peak[0], status("RssAnon"))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(before, peak, anon_before, anon_peak, params)
"""


def build_folder(path: Path, layers: int, ratio: float, vocab: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adasvd_lightning import save_compressed
    from adasvd_lightning.core.lowrank import LowRankLinear
    from adasvd_lightning.core.serialization import apply_manifest
    from adasvd_lightning.core.surgery import is_linear, linear_shape

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=vocab, dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    dense_bytes = sum(p.numel() * 2 for p in model.parameters())
    modules = {}
    for name, module in model.named_modules():
        if name.startswith("model.layers.") and is_linear(module):
            m, n = linear_shape(module)  # (out, in)
            rank = max(1, int((1 - ratio) * m * n / (m + n)))
            modules[name] = LowRankLinear(n, m, rank, bias=False, device="meta").manifest_entry()
    apply_manifest(model, {"format_version": 1, "modules": modules})
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator).mul_(0.02))
    save_compressed(model, path, overwrite=True)
    return {"dense_bytes": dense_bytes, "modules": len(modules)}


def measure(loader: str, folder: Path) -> dict:
    script = PROBE.format(loader=LOADERS[loader])
    out = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, check=True)
    before, peak, anon_before, anon_peak, params = map(int, out.stdout.split()[-5:])
    return {"loader": loader, "rss_before": before, "peak_rss": peak, "load_peak": peak - before,
            "anon_load_peak": anon_peak - anon_before, "param_bytes": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.4, help="parameter reduction of every block linear")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    args = parser.parse_args()
    gb = 2**30
    with tempfile.TemporaryDirectory(prefix="adasvd-load-memory-") as tmp:
        folder = Path(tmp) / "compressed"
        info = build_folder(folder, args.layers, args.ratio, args.vocab)
        folder_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")
        print(f"synthetic Llama: {args.layers} blocks at 4096/11008, vocab {args.vocab}, bf16, "
              f"{info['modules']} layers factorized for {args.ratio:.0%} fewer parameters")
        print(f"dense model {info['dense_bytes'] / gb:.2f} GiB, compressed folder {folder_bytes / gb:.2f} GiB, "
              f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB\n")
        rows = [measure(loader, folder) for loader in args.loaders]
    print("| loader | peak RSS during load, GiB | ÷ folder size | ÷ dense size "
          "| peak anonymous (not file-backed) memory, GiB | ÷ folder size |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['loader']} | {row['load_peak'] / gb:.2f} | {row['load_peak'] / folder_bytes:.2f} "
              f"| {row['load_peak'] / info['dense_bytes']:.2f} | {row['anon_load_peak'] / gb:.2f} "
              f"| {row['anon_load_peak'] / folder_bytes:.2f} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "folder_bytes": folder_bytes, **info, "rows": rows}, indent=2))
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
