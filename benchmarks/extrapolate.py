"""Predicted compression time and host memory of `svd-llm` for 7B / 70B shapes, from per-phase cost models.

    python benchmarks/extrapolate.py                 # measure this machine's single-thread rates, write BENCHMARKS.md
    python benchmarks/extrapolate.py --no-write

Each pipeline phase's dominant cost is counted per decoder block (FLOPs of the forwards, the Gram
statistics, the Cholesky whitening, the factorization's products along the route each target takes
(`core.factorization`) and the closed-form refinement of the residual writers; the symmetric
eigensolver as c·n³ seconds because it is not FLOP-bound). The single-thread rates of this machine are
measured in CPU seconds (`time.process_time`, one thread: immune to other jobs on shared cores) and
the model is checked against the measured real-model run (`benchmarks/results/compression_speed_real.json`,
its CPU seconds). Target hardware enters only through the assumed sustained rates in `HARDWARE`
(stated in the table). Memory: see `peak_bytes`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, write_section  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    mlp: int
    kv: int
    blocks: int
    vocab: int

    def matrices(self) -> list[tuple[int, int]]:
        """(out, in) of a block's targets: q, k, v, o, gate, up, down."""
        h, f, kv = self.hidden, self.mlp, self.kv
        return [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]

    def inputs(self) -> list[int]:
        """Widths of a block's distinct linear inputs (attention, o_proj, MLP, down_proj)."""
        return [self.hidden, self.hidden, self.hidden, self.mlp]

    @property
    def block_params(self) -> int:
        return sum(m * n for m, n in self.matrices())

    @property
    def params(self) -> int:
        return self.blocks * self.block_params + 2 * self.vocab * self.hidden


#: `MethodSpec.heldout_fraction`'s default: the share of calibration sequences held out for validation.
HELDOUT_FRACTION = 0.25

SHAPES = [
    Shape("SmolLM2-135M", 576, 1536, 192, 30, 49152),
    Shape("Llama-2-7B", 4096, 11008, 4096, 32, 32000),
    Shape("Llama-2-70B", 8192, 28672, 1024, 80, 32000),
]

#: Assumed sustained rates of the target hardware (not measured here): FLOP/s for float32 forwards and
#: float64 statistics/whitening/products, and the symmetric eigensolver's speed-up over one core of this
#: machine (LAPACK syevd is half matrix-vector work, bandwidth-bound).
HARDWARE = {
    "CPU node (64 cores, 300 GB/s)": {"f32": 2.0e12, "f64": 1.0e12, "eigh_speedup": 8.0, "bandwidth": 300e9},
    "one GPU (H100/H200 class, 3.3–4.8 TB/s)": {"f32": 30e12, "f64": 30e12, "eigh_speedup": 40.0,
                                                "bandwidth": 3.3e12},
}


def measure_rates() -> dict:
    """Single-thread rates of this machine in CPU seconds: float32/float64 GEMM, eigh's c in c·n³."""
    import torch

    torch.set_num_threads(1)

    def cpu(f, repeats=3) -> float:
        f()
        t0 = time.process_time()
        for _ in range(repeats):
            f()
        return (time.process_time() - t0) / repeats

    a32, b32 = torch.randn(2048, 1536), torch.randn(1536, 1536)
    a64, b64 = a32.double(), b32.double()
    f32 = 2 * 2048 * 1536 * 1536 / cpu(lambda: a32 @ b32)
    f64 = 2 * 2048 * 1536 * 1536 / cpu(lambda: a64 @ b64)
    g = a64.T @ a64 / 2048
    eigh_c = cpu(lambda: torch.linalg.eigh(g), repeats=2) / 1536**3
    return {"f32": f32, "f64": f64, "eigh_c": eigh_c}


def phase_costs(shape: Shape, tokens: int, seq_len: int, rank_ratio: float = 0.6) -> dict:
    """FLOPs per phase of a whole `svd-llm` run (paired statistics, closed-form refinement), and eigh n³."""
    per_pass = 2 * shape.block_params * tokens + 2 * tokens * seq_len * shape.hidden  # linears + causal attention
    forward = 3 * shape.blocks * per_pass  # dense stream, compressed stream, propagation
    statistics = shape.blocks * sum(3 * tokens * n * n for n in shape.inputs())  # ~half Gram + cross, ×2 FLOP
    whitening = shape.blocks * shape.inputs()[2] ** 3 / 3  # only the tall gate/up's input needs a factor
    svd = refinement = eigh_n3 = 0.0
    writers = {3, 6}  # o_proj and down_proj write into the residual stream: refined; the rest are not
    for i, (m, n) in enumerate(shape.matrices()):
        k = min(m, n)
        r = rank_ratio * m * n / (m + n)
        if m > n:  # tall: Gram of W·L from row blocks (triangular L), up = W·(L·V_r)/√σ, unwhiten
            svd += m * n * n + 2 * m * n * n + n * n * r + 2 * m * n * r + r * n * n
            eigh_n3 += k**3
        elif i in writers:  # wide / square, refined and validated: G = W·H·Wᵀ and the fit split's (from the
            # held-out moments: W·H_w·Wᵀ), two eigen-decompositions, down = U_rᵀ·W/√σ for each start
            svd += 2 * (2 * m * n * n + m * m * n) + 2 * 2 * m * n * r
            eigh_n3 += 2 * k**3
            refinement += 2 * (2 * n * n * r + 2 * m * n * r)  # the U-step's W·(H_oc·Vᵀ), validation and fit
        else:  # wide / square, unrefined: G = W·H·Wᵀ (upper blocks), down = U_rᵀ·W/√σ; no whitening
            svd += 2 * m * n * n + m * m * n + 2 * m * n * r
            eigh_n3 += k**3
    return {"calibration": forward, "statistics": statistics, "whitening": whitening,
            "svd": shape.blocks * svd, "refinement": shape.blocks * refinement, "eigh_n3": shape.blocks * eigh_n3}


def predict_seconds(costs: dict, rates: dict, eigh_c: float) -> dict:
    out = {"calibration": costs["calibration"] / rates["f32"],
           "statistics": costs["statistics"] / rates["f64"],
           "whitening": costs["whitening"] / rates["f64"],
           "svd": costs["svd"] / rates["f64"] + costs["eigh_n3"] * eigh_c / rates.get("eigh_speedup", 1.0),
           "refinement": costs["refinement"] / rates["f64"]}
    out["total"] = sum(out.values())
    return out


def peak_bytes(shape: Shape, tokens: int, weight_bytes: int = 4, batch_tokens: int = 8 * 2048) -> dict:
    """Peak host bytes of an in-place `svd-llm` run: the larger of two moments of the widest input's stage.

    Components as the Llama-7B-width runs found them (BENCHMARKS.md, "Memory", "Held-out tokens as rows
    or moments" and "SVD-LLM's closed-form update without a whitening factor"; `benchmarks/memory_trace.py`):

    * the stage's statistics pass: its H_cc and H_oc, the writer's held-out tokens in the smaller of their
      two forms (`core.writer_heldout`: float32 rows, or float64 moments of fixed size), and the pass's
      own float32 arrays at the MLP width — the forward's activations, the dense inputs stashed for the
      pairing and the residual-weighted copies: about eight per calibration batch of ``batch_tokens``;
    * down_proj's factorization, after H_cc is freed: H_oc, the held-out tokens, the two m×m output Grams,
      the eigenvectors and LAPACK's workspace (five m×m float64 arrays) and two n×r float64 factors.

    Both add the two streams' float32 hidden states. At hidden 4096 × 2 blocks (8 × 256 tokens) this
    predicts 4,303 MB over the imports at the statistics pass, 5 % under the 4,542 MB measured
    (`compression_speed_7b_width_svdllm_closed_form.json`). The budget counts one whole block's
    statistics; only the stage's are alive."""
    model = shape.params * weight_bytes
    statistics = sum(2 * n * n * 8 for n in shape.inputs())  # H_cc and H_oc per distinct input: the budget's
    widest = max(shape.inputs())
    stage = 2 * widest * widest * 8  # H_cc and H_oc of the widest input, alive at the peak
    m, n = shape.hidden, shape.mlp  # down_proj, the widest input's writer
    held_tokens = int(tokens * HELDOUT_FRACTION)
    heldout = min(held_tokens * (n + m + 1) * 4, (2 * n * n + 2 * m * n) * 8)  # rows or moments
    activations = 2 * tokens * shape.hidden * 4
    passing = 8 * min(batch_tokens, tokens) * shape.mlp * 4
    r = 0.6 * m * n / (m + n)
    factorizing = n * n * 8 + 5 * m * m * 8 + 2 * n * r * 8
    work = max(stage + passing, factorizing)
    return {"model": model, "statistics": statistics, "stage": stage, "heldout": heldout, "work": work,
            "activations": activations, "at": "statistics pass" if stage + passing >= factorizing else "factorization",
            "total": model + heldout + work + activations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256 * 2048, help="calibration tokens of the prediction")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--real", default="compression_speed_real_closed_form_after.json",
                        help="measured real-model rows (benchmarks/results/) to check the model against")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rates = measure_rates()
    here = {"f32": rates["f32"], "f64": rates["f64"], "eigh_speedup": 1.0}
    lines = [
        "## Extrapolation: `svd-llm` on 7B / 70B shapes (predicted from per-phase cost models)",
        "",
        f"Command: `python benchmarks/extrapolate.py {' '.join(sys.argv[1:])}`  ",
        f"This machine ({machine()}), one thread, CPU seconds: float32 GEMM {rates['f32'] / 1e9:.0f} GFLOP/s, "
        f"float64 GEMM {rates['f64'] / 1e9:.0f} GFLOP/s, eigh {rates['eigh_c'] * 1e9:.2f} ns·n³. "
        "Assumed targets (not measured): " + "; ".join(
            f"{name}: float32 {h['f32'] / 1e12:.0f} TFLOP/s, float64 {h['f64'] / 1e12:.0f} TFLOP/s sustained, "
            f"eigh {h['eigh_speedup']:.0f}× one core here" for name, h in HARDWARE.items()) + ".",
        "",
    ]
    real = RESULTS / args.real
    if real.exists():
        rows = [r for r in json.loads(real.read_text())["rows"] if r["method"] == "svd-llm"
                and r.get("decomposition_threads") == 1]
        if rows:
            r = rows[0]
            costs = phase_costs(SHAPES[0], r["tokens"], r["seq_len"])
            predicted = predict_seconds(costs, here, rates["eigh_c"])
            lines += [f"Check against the measured real run ({SHAPES[0].name}, {r['tokens']:,} tokens, "
                      f"`{args.real}`): predicted {predicted['total']:.0f} CPU s on one core, measured "
                      f"{r['cpu_s']:.0f} CPU s (2 threads, shared cores; the model counts the dominant terms "
                      "only: no norms, attention softmax, hooks or Python overhead).", ""]
    lines += ["| model | params | hardware | calibration | statistics | whitening | svd | refinement | "
              "total | peak host memory (float32 / bf16 weights) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for shape in SHAPES[1:]:
        costs = phase_costs(shape, args.tokens, args.seq_len)
        mem32, mem16 = peak_bytes(shape, args.tokens, 4), peak_bytes(shape, args.tokens, 2)
        for name, hw in HARDWARE.items():
            p = predict_seconds(costs, hw, rates["eigh_c"])
            cells = " | ".join(_duration(p[k]) for k in ("calibration", "statistics", "whitening", "svd", "refinement",
                                                         "total"))
            lines.append(f"| {shape.name} | {shape.params / 1e9:.1f} B | {name} | {cells} | "
                         f"{mem32['total'] / 2**30:.0f} / {mem16['total'] / 2**30:.0f} GiB |")
    lines += ["", f"Calibration {args.tokens:,} tokens (sequences of {args.seq_len}, batches of 8). Memory = "
              "weights + the writer's held-out tokens (rows or moments, the smaller) + two streams of float32 "
              "activations + the larger of down_proj's stage statistics pass (its paired float64 statistics and "
              "about eight float32 batch arrays at the MLP width) and its factorization (H_oc, m×m eigen work, "
              "n×r factors): components from the Llama-7B-width runs; at hidden 4096 × 2 blocks it predicts "
              "4,303 MB, 5 % under the measured 4,542 MB (`extrapolate.peak_bytes`); "
              "on one GPU with "
              "`execution_device=\"cuda\"` the host keeps weights and activations and the device holds one "
              "block, its statistics and the factor. Budget check (the issue's target, weights + one block's "
              "statistics ≤ 1.2 × weights + statistics): " + "; ".join(
                  _budget(s, args.tokens, args.seq_len) for s in SHAPES[1:]) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section("extrapolation", text)


def _budget(shape: Shape, tokens: int, seq_len: int) -> str:
    """Predicted peak against the issue's target 1.2 × weights + one block's statistics (float32 weights),
    and the calibration tokens up to which the predicted peak stays within it, with the largest batch
    (8, 4, 2 or 1 sequences) for which some tokens fit at all: a batch's arrays at the MLP width do not
    depend on the token count."""
    p = peak_bytes(shape, tokens, batch_tokens=8 * seq_len)
    target = 1.2 * p["model"] + p["statistics"]
    head = (f"{shape.name} {p['total'] / target:.2f}× the target at {tokens:,} tokens in batches of 8 × {seq_len} "
            f"(activations {p['activations'] / 2**30:.0f} GiB)")
    # With `activation_dir` the streams live in files: resident is one batch of each stream at a time,
    # at any token count; what is left is the batch's own arrays at the MLP width.
    def in_files(batch: int) -> float:
        q = peak_bytes(shape, tokens, batch_tokens=batch * seq_len)
        return (q["total"] - q["activations"] + 2 * batch * seq_len * shape.hidden * 4) / target

    fits = next((b for b in (8, 4, 2, 1) if in_files(b) <= 1.0), None)
    files = (f"; with `activation_dir`, {in_files(8):.2f}× at any token count in batches of 8"
             + (f" ({in_files(fits):.2f}× in batches of {fits})" if fits not in (None, 8) else ""))
    for batch in (8, 4, 2, 1):
        q = peak_bytes(shape, tokens, batch_tokens=batch * seq_len)
        room = target - (q["total"] - q["activations"])
        if room > 0:
            return (f"{head}; in memory, within it up to {room / (2 * shape.hidden * 4):,.0f} tokens in batches "
                    f"of {batch}{files}")
    return f"{head}; in memory, over it even with batches of one sequence{files}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    main()
