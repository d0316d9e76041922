"""Second-order (Fisher) estimate of Duo-SVD's module-KL costs, without probes.

The exact ``module-kl`` allocation measures, for every module and candidate rank, KL(dense ‖ model with
that module truncated) by rerunning the model: modules × candidates suffix forwards. Around the dense
model the KL is second order in the change of a module's outputs Δy = (W − W′)x (its gradient vanishes
there), with the Fisher information of the model's own predictive distribution as the curvature:

    KL_total ≈ ½ Δyᵀ F Δy,   F = E_ŷ~p [g gᵀ],   g = ∇_y Σ_t log p(ŷ_t)

(the true Fisher: ŷ sampled from the dense model itself, so no labels are involved and F is positive
semi-definite). Two approximations make it cheap:

* diagonal over the module's output channels and positions, with the gradient and the input statistics
  taken as independent across tokens: mean-token KL ≈ ½ Σ_i F̄_i (E H̄ Eᵀ)_ii, where F̄_i = mean over
  tokens of g_ti² and H̄ = mean x xᵀ (the Gram matrix the whitening already has), E = W − W′;
* with SVD-LLM's whitened SVD W L = U S Vᵀ (L Lᵀ = H̄) and W′ its rank-r truncation, E L = Σ_{j>r} s_j u_j v_jᵀ,
  so (E H̄ Eᵀ)_ii = Σ_{j>r} s_j² u_ij² and the cost of every candidate rank of a module is one cumulative
  sum, ½(Σ_i F̄_i ‖(WL)_i‖² − Σ_{j≤r} s_j² Σ_i F̄_i u_ij²), after the one whitened SVD the method computes
  anyway.

The Fisher diagonals of all target modules come from one backward pass per probe sequence over the dense
model (`output_fisher`): tensor hooks on the modules' outputs square and sum their gradients per
channel (m floats per module), and nothing else is kept. Sequences are independent given the model, so
the pass runs one sequence at a time — the same numbers as whole batches, with the activations of one
sequence alive (the memory bound that matters at 7B).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .calibration import model_forward, normalise_batch
from .distributed import all_reduce_tensor

__all__ = ["output_fisher", "truncation_kl", "sequences"]


def sequences(batch: Any) -> list[Any]:
    """``batch`` split into one-sequence batches of the same kind (tensor, dict or list/tuple)."""
    positional, kwargs, _ = normalise_batch(batch)
    if positional is not None:
        if positional.ndim < 2:
            return [batch]
        parts = [positional[i:i + 1] for i in range(positional.shape[0])]
        return parts if isinstance(batch, torch.Tensor) else [type(batch)([p, *batch[1:]]) for p in parts]
    rows = kwargs["input_ids"].shape[0]
    return [{k: v[i:i + 1] for k, v in kwargs.items()} for i in range(rows)]


def _sequence_seed(seq: Any, seed: int) -> int:
    """A seed from the sequence's real tokens: the labels drawn for a sequence then depend on nothing
    else, so the statistics do not depend on how the sequences are batched, padded or sharded over ranks."""
    positional, kwargs, mask = normalise_batch(seq)
    ids = positional if positional is not None else kwargs["input_ids"]
    if mask is not None:
        ids = ids[mask.to(ids.device).bool()]
    return zlib.crc32(ids.detach().cpu().contiguous().numpy().tobytes(), seed)


def _first_block_leaf(block: nn.Module, leaves: list[torch.Tensor]):
    """Pre-hook making the first block's hidden input a fresh leaf that requires grad (kept in
    ``leaves``): every target's output then carries a gradient, and `torch.autograd.grad` with respect
    to that leaf alone computes no weight gradient and leaves every ``.grad`` untouched."""

    def hook(module, args, kwargs):
        if args:
            leaf = args[0].detach().requires_grad_(True)
            leaves.append(leaf)
            return (leaf, *args[1:]), kwargs
        kwargs = dict(kwargs)
        leaf = kwargs["hidden_states"].detach().requires_grad_(True)
        leaves.append(leaf)
        kwargs["hidden_states"] = leaf
        return args, kwargs

    return block.register_forward_pre_hook(hook, with_kwargs=True)


def output_fisher(model: nn.Module, first_block: nn.Module, modules: dict[str, nn.Module], batches: Sequence[Any],
                  *, samples: int = 1, seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """Per target module, Σ over tokens of E_ŷ[g_ti²] per output channel (float64, length m), and the
    token count T (summed over ranks under a process group).

    ``samples`` label draws ŷ ~ p(·|context) per sequence (one backward each, one forward shared)
    estimate the expectation, seeded by ``seed`` and the sequence's tokens. Padding (``attention_mask``
    0) contributes neither loss nor statistics.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    sums: dict[str, torch.Tensor] = {}
    mask_now: list[torch.Tensor | None] = [None]

    def make_hook(name: str):
        def on_output(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not out.requires_grad:
                return

            def on_grad(grad: torch.Tensor) -> None:
                sq = grad.detach().double().square()
                if mask_now[0] is not None:
                    sq = sq * mask_now[0].to(sq.device, sq.dtype)[..., None]
                total = sq.reshape(-1, sq.shape[-1]).sum(0)
                if name in sums:
                    sums[name] += total
                else:
                    sums[name] = total

            out.register_hook(on_grad)
        return on_output

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    leaves: list[torch.Tensor] = []
    handles.append(_first_block_leaf(first_block, leaves))
    tokens = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                for seq in sequences(batch):
                    _, _, mask = normalise_batch(seq)
                    out = model_forward(model, seq)
                    logits = (out.logits if hasattr(out, "logits") else out).float()
                    logp = torch.log_softmax(logits, dim=-1)
                    valid = (mask.to(logp.device).bool() if mask is not None
                             else torch.ones(logp.shape[:-1], dtype=torch.bool, device=logp.device))
                    mask_now[0] = valid if mask is not None else None
                    tokens += int(valid.sum())
                    generator = torch.Generator(device=logp.device).manual_seed(_sequence_seed(seq, seed))
                    flat_valid = valid.reshape(-1)
                    probs = logp.detach().reshape(-1, logp.shape[-1])[flat_valid].exp()
                    if len(leaves) != 1:
                        raise RuntimeError(f"the first decoder block ran {len(leaves)} times in one forward")
                    leaf = leaves.pop()
                    for k in range(samples):
                        draw = torch.multinomial(probs, 1, generator=generator)  # real positions only
                        loss = logp.reshape(-1, logp.shape[-1])[flat_valid].gather(-1, draw).sum()
                        torch.autograd.grad(loss, leaf, retain_graph=k + 1 < samples)
                    del out, logits, logp, probs
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if n not in sums]
    if missing:
        raise RuntimeError(f"no gradient reached {missing[:3]}… from the model's output: the Fisher estimate "
                           "needs every target on the path from the first decoder block to the logits")
    names = sorted(modules)  # same order on every rank
    device = sums[names[0]].device
    flat = all_reduce_tensor(torch.cat([sums[n] for n in names] + [torch.tensor([float(tokens)], dtype=torch.float64,
                                                                                   device=device)]))
    result, offset = {}, 0
    for n in names:
        size = sums[n].numel()
        result[n] = flat[offset:offset + size] / samples
        offset += size
    return result, int(flat[-1])


def truncation_kl(fisher: torch.Tensor, tokens: int, whitened: torch.Tensor, u: torch.Tensor, s: torch.Tensor,
                  ranks: Sequence[int | None]) -> list[float]:
    """Estimated mean-token KL of truncating one module to each rank in ``ranks`` (None = kept dense → 0).

    Args:
        fisher: Σ_t E[g_ti²] per output channel (from `output_fisher`), over ``tokens`` tokens.
        whitened: A = W·L (m×n, L Lᵀ = H̄), u / s: its top left singular vectors (m×k) and singular values,
            with k ≥ every rank asked for.
    """
    f = fisher.detach().to(torch.float64) / max(tokens, 1)
    whitened, u, s = whitened.detach(), u.detach(), s.detach()
    total = float(f @ whitened.square().sum(1))
    k = u.shape[1]
    head = torch.cumsum(s[:k].square() * (f @ u.square()), 0)
    costs = []
    for rank in ranks:
        if rank is None:
            costs.append(0.0)
            continue
        if rank > k:
            raise ValueError(f"rank {rank} needs {rank} singular vectors, got {k}")
        kept = float(head[rank - 1]) if rank > 0 else 0.0
        costs.append(0.5 * max(total - kept, 0.0))
    return costs
