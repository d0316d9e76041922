"""Which targets write into the residual stream, and how much an error there matters per token.

Why compensation is restricted to these targets
-----------------------------------------------
The compensating refinements (closed-form, adaComp, optimal) fit a matrix to the dense model's
*outputs* from the compressed model's *inputs*: min ‖W′X_c − W X_o‖². That squared error is the error
the next blocks see only for a target whose output is added to the residual stream (``o_proj`` and
``down_proj`` in a pre-norm decoder block): its output error *is* its contribution to the residual
error. The other targets (q/k/v, gate/up) feed a nonlinearity (softmax attention, the gated
activation) whose result the writer then re-mixes; fitting each of them separately to its dense output
does not make the block's output closer to the dense one, and on a real LLM it drives the stream away:
on SmolLM2-135M at 20 %, compensating only gate/up grew the residual error from 0.30 to 2.4 by block 21
(perplexity 59 793, against 62.95 without any compensation), while compensating only o_proj gave 52.19
(BENCHMARKS.md, "the compensated presets at 20 %"). So inner targets keep the whitened fit to their
own compressed input, and the writer, fitted last within its stage order, absorbs both their
truncation and the upstream drift — the one place where the least-squares target is the block's
output error.

Why writers' tokens are weighted
--------------------------------
Every reader of the residual stream in a pre-norm model reads it through a normalisation that divides
each token by its root-mean-square. An output error δ_t therefore matters as δ_t / rms(r_t), r_t the
residual after the writer's addition. Real LLMs keep a few "attention sink" tokens whose residual is
two orders of magnitude larger than the rest (SmolLM2: 175× from block 11 on, created by that block's
down_proj, whose squared output error is then 99.9 % one token). Unweighted, the compensation spends
itself on that token: block 11's fit cut the sink's error from 0.23 to 0.04 and raised every other
token's from 0.30 to 0.40. Weighting each token by 1 / ms(r_t) measures every token on the scale its
readers see.

Detection is numerical and architecture-free: on one dense batch, a target writes into the residual
stream when some residual point after it equals a residual point before it plus the target's output
(the points are the block's input and output and the inputs of its normalisation modules). That holds
for pre-norm blocks (Llama, Mistral, Qwen, OPT, GPT-2) and for the original post-norm block, where the
normalisation reads the sum. Blocks where no target passes — a normalisation between the target and the
addition (Gemma-2's sandwich norms), parallel attention and MLP (GPT-J, Phi-2) — get no compensation at
all, which is the whitening-only fit, and the caller warns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ResidualWriter", "find_residual_writers", "is_norm", "residual_weights"]


@dataclass(frozen=True)
class ResidualWriter:
    """A target whose output is added to the residual stream.

    ``source``: where the residual *before* the addition is read — ``""`` for the block's input, else
    the name (relative to the block) of the normalisation module that reads it.
    """

    name: str
    source: str


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer (torch's, or a model family's ``*Norm`` class such as ``LlamaRMSNorm``)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")


def residual_weights(residual: torch.Tensor) -> torch.Tensor:
    """Per-token weight 1 / mean_j r_tj² (shape ``residual.shape[:-1] + (1,)``, float64).

    Zero rows (padding) get weight 0 instead of infinity.
    """
    ms = residual.to(torch.float64).square().mean(dim=-1, keepdim=True)
    return torch.where(ms > 0, 1.0 / ms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(ms))


def _added(after: torch.Tensor, before: torch.Tensor, output: torch.Tensor) -> bool:
    """``after == before + output`` up to the rounding of one addition in ``after``'s dtype."""
    # Some blocks flatten tokens for the MLP (OPT): compare per token, whatever the leading shape.
    if after.numel() != before.numel() or after.numel() != output.numel() or after.shape[-1] != output.shape[-1]:
        return False
    a, b, y = (t.reshape(-1, t.shape[-1]).to(torch.float64) for t in (after, before, output))
    eps = torch.finfo(after.dtype).eps if after.dtype.is_floating_point else 0.0
    bound = 2 * eps * (b.abs() + y.abs()) + torch.finfo(torch.float64).tiny
    # An output of all zeros would make any two equal points look like an addition.
    return bool(y.abs().max() > 0) and bool(((a - b - y).abs() <= bound).all())


def find_residual_writers(block: nn.Module, targets: dict[str, nn.Module], hidden: torch.Tensor,
                          run: Callable[[], torch.Tensor]) -> dict[str, ResidualWriter]:
    """The targets of ``block`` whose output is added to the residual stream, found on one dense batch.

    ``run()`` runs the dense block on the batch whose input hidden states are ``hidden`` and returns its
    output hidden states. Targets that share their input with another target (q/k/v, gate/up) are never
    writers here: they share one set of statistics.
    """
    points: list[tuple[int, str, torch.Tensor]] = []  # (call order, source name, residual value)
    outputs: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}  # name -> (order, input, output)
    clock = [0]

    def tick() -> int:
        clock[0] += 1
        return clock[0]

    norms = {name: m for name, m in block.named_modules() if name and is_norm(m)}

    def norm_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                points.append((tick(), name, args[0].detach().cpu()))
        return hook

    def target_hook(name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            if name not in outputs and isinstance(output, torch.Tensor) and args:
                outputs[name] = (tick(), args[0], output.detach().cpu())
        return hook

    handles = [m.register_forward_pre_hook(norm_hook(n)) for n, m in norms.items()]
    handles += [m.register_forward_hook(target_hook(n)) for n, m in targets.items()]
    try:
        with torch.no_grad():
            points.insert(0, (0, "", hidden.detach().cpu()))
            out = run()
            points.append((tick(), "<output>", out.detach().cpu()))
    finally:
        for handle in handles:
            handle.remove()

    shared = {name for name, (_, x, _) in outputs.items()
              if any(other != name and x2 is x for other, (_, x2, _) in outputs.items())}
    writers: dict[str, ResidualWriter] = {}
    for name, (order, _, y) in outputs.items():
        if name in shared:
            continue
        # The block's input first (no hook needed to read it), then the latest residual points.
        befores = [p for p in points if p[0] < order and p[1] != "<output>"]
        befores = befores[:1] + befores[:0:-1]
        afters = [p for p in points if p[0] > order]
        for _, source, before in befores:
            if any(_added(after, before, y) for _, _, after in afters):
                writers[name] = ResidualWriter(name=name, source=source)
                break
    return writers
