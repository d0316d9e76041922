"""Streaming calibration statistics of linear-layer inputs.

For each *distinct* input tensor inside a decoder block we accumulate H = Σ x xᵀ (n×n, float64) and
the token count. q/k/v projections read the same tensor, as do gate/up; rather than hard-coding
architecture names we detect sharing at run time: modules whose forward receives the very same tensor
object in the first calibration batch form one group and share one Gram matrix. Statistics memory is
therefore independent of the number of calibration tokens and bounded by one block's distinct inputs.

Padding is excluded: set :attr:`BlockStatistics.token_mask` to the batch's attention mask (B×T) and
only positions where it is non-zero contribute.

Paired mode (for refinement against dense targets): run the *dense* block on the dense model's hidden
states with ``mode = "original"`` (inputs are stashed, one batch at a time), then the same block on the
compressed model's hidden states with ``mode = "compressed"``; each compressed-stream input is paired
with its stashed original and H_cc = X_cᵀX_c and H_oc = X_oᵀX_c are accumulated. A residual writer that
is its stage's only target stashes its dense *outputs* instead, and W·H_oc = Y_oᵀX_c is accumulated
(`InputStatistics.add_output_pair`): refinement reads H_oc only as W·H_oc, and for down_proj (m < n)
that is m·n products per token instead of n² (about 40 % less of SmolLM2's paired down_proj
statistics), an m×n sum instead of n×n (0.36 GB instead of 0.97 GB in float64 at Llama-7B width) and
no m·n² product W·H_oc afterwards.

Held-out sequences (paired mode, ``holdout=True``): the pipeline marks some calibration sequences as
held out (`core.holdout`, set per batch with `BlockStatistics.masked`). Their tokens are summed apart
from the rest (``InputStatistics.heldout``, their own target energy) and added into the whole once,
when the statistics are first read or finalized, so the refinement can fit on the rest (all minus
held-out) and validate on them, then refit on everything with the number of steps that validated best
(`core.refinement.validated_steps`). Summing them apart rather than twice (into the whole *and* their
own sums) forms each token's Gram products once: with a quarter held out, a fifth less statistics work.
Residual writers (``residual_sources``) are the exception: their held-out tokens go straight into the
whole sums and are kept as rows or as their moments, whichever is smaller (`BlockStatistics.writer_heldout`,
`core.writer_heldout`), which carry everything their held-out sums did and what the plain-error guard
needs, without two more n×n float64 matrices next to the whole data's at the memory peak.

Product precision: each token chunk's products are formed in ``product_dtype`` (the pipeline passes
`CompressionConfig.statistics_dtype`, float32 by default; this class alone defaults to float64, the
reference; float32 GEMMs run ~2× faster on CPU and 32–64× on consumer GPUs) and always *added* into
float64 running sums, so only the per-chunk rounding differs (see `CompressionConfig.statistics_dtype`).

Output Gram (``output_gram``): a plain or activation-scaled SVD keeps W′ = P·W, P an orthogonal
projection onto r output directions, so its error ‖(W′ − W)X‖² = ‖(I − P)Y‖² needs only the outputs'
Gram Σ y yᵀ. For a wide target that reads an input alone (down_proj: m = 576 against n = 1536 in
SmolLM2) that is m² flops per token instead of n²; its input then keeps only the activation scales.

Target energy: every target's output is also observed (forward hook) in ``"single"`` and ``"original"``
mode, and Σ‖W x‖² (bias removed) is accumulated per module in float64. That is the denominator of every
relative output error and the ‖Y‖² of refinement; reading it off the outputs the forward computes anyway
costs N·m per module, where the Gram route needs a third n×n Gram product per input in paired mode
(H_oo = X_oᵀX_o, N·n² per batch and n² memory) or an m·n² product per matrix afterwards. A pass that
needs only inputs stops before its targets compute (`pipeline`: the compressed stream's stages without
a residual writer, a single stream propagated by the compressed block's own pass); their energy is then
not observed (`target_energy` None) and is taken from the Gram where a report needs it (most read their
error off spectra and need none): m·n² instead of N·m·n, fewer flops whenever N tokens exceed n.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .gram import accumulate_cross, accumulate_gram, mirror_lower, token_chunks
from .profiling import phase
from .residual import residual_weights
from .surgery import linear_bias, linear_shape
from .writer_heldout import HeldoutMoments, HeldoutRows, WriterHeldout, rows_are_smaller

__all__ = ["InputStatistics", "BlockStatistics", "accumulate_gram", "accumulate_cross", "mirror_lower"]

@dataclass
class InputStatistics:
    """Accumulated statistics of one distinct linear input of width n.

    ``gram_sum`` is Σ x_c x_cᵀ of the inputs the layer sees; in paired mode ``cross_sum`` (Σ x_o x_cᵀ)
    relates them to the dense model's inputs x_o.
    """

    gram_sum: torch.Tensor | None  # n×n float64, Σ x xᵀ (None after `release_gram`)
    abs_sum: torch.Tensor  # n float64, Σ |x| (ASVD's activation scale)
    tokens: int = 0
    cross_sum: torch.Tensor | None = None
    normalized: bool = False  # True after `finalize`: the *_sum fields hold means
    lower_only: bool = False  # gram_sum holds only its block lower triangle (see `accumulate_gram`)
    product_dtype: torch.dtype = torch.float64  # per-chunk products; the sums are float64 regardless
    # The held-out sequences' sums (paired). Until `merge_heldout` the sums above hold only the other
    # tokens; from then on, all of them (each token's products are formed once, see the module doc).
    heldout: "InputStatistics | None" = None
    heldout_merged: bool = False
    # Σ y yᵀ (m×m float64) of the one module reading this input, for statistics that keep its outputs'
    # Gram instead of H (``gram_sum`` None; `BlockStatistics` ``output_gram``): the report of a left
    # projection W′ = P·W needs only ‖(I − P)Y‖², and m² < n² per token for a wide W.
    output_sum: torch.Tensor | None = None
    output_lower_only: bool = False
    # True: ``cross_sum`` is Σ y_o x_cᵀ (m×n), the dense outputs (bias removed) against the compressed
    # inputs, i.e. W·Σ x_o x_cᵀ already multiplied (`add_output_pair`); refinement reads it as W·H_oc.
    cross_outputs: bool = False

    def finalize(self) -> None:
        """Turn the sums into means in place (once accumulation and any all-reduce are done).

        The factorization reads the means several times per matrix (whitening, refinement, error
        report); dividing a copy each time held up to three extra n×n float64 matrices per read —
        for a paired MLP input of width 11008 that is ~3 GB of transient copies. In place, none.
        """
        self.merge_heldout()
        self._mirror()
        if self.heldout is not None:
            self.heldout.finalize()
        if self.normalized or self.tokens == 0:  # no tokens: `gram` raises when it is read
            return
        for t in (self.gram_sum, self.abs_sum, self.cross_sum, self.output_sum):
            if t is not None:
                t.div_(self.tokens)
        self.normalized = True

    @classmethod
    def empty(cls, width: int, device: torch.device | str = "cpu",
              product_dtype: torch.dtype = torch.float64, heldout: bool = False,
              output_width: int | None = None) -> "InputStatistics":
        """Zero sums of width n; ``product_dtype`` (float64 or float32) forms each chunk's products.

        ``heldout``: also zero paired sums for the held-out sequences, created up front so that every
        process of a distributed run all-reduces the same tensors (some may hold out nothing).
        ``output_width`` m: no H, but Σ y yᵀ of the reading module's outputs (`add_output`) next to
        the activation scales.
        """
        if product_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"product_dtype must be torch.float64 or torch.float32, got {product_dtype}")
        zeros = dict(dtype=torch.float64, device=device)
        if output_width is not None:
            if heldout:
                raise ValueError("statistics of a module's outputs hold nothing out")
            return cls(gram_sum=None, abs_sum=torch.zeros(width, **zeros), product_dtype=product_dtype,
                       output_sum=torch.zeros(output_width, output_width, **zeros))
        child = None
        if heldout:
            child = cls(gram_sum=torch.zeros(width, width, **zeros), abs_sum=torch.zeros(width, **zeros),
                        cross_sum=torch.zeros(width, width, **zeros), product_dtype=product_dtype)
        return cls(gram_sum=torch.zeros(width, width, **zeros), abs_sum=torch.zeros(width, **zeros),
                   product_dtype=product_dtype, heldout=child)

    def merge_heldout(self) -> None:
        """Add the held-out sums into these (which held the other tokens only): from now on, all tokens.

        Idempotent; done on the first read or at `finalize`, after any all-reduce of the separate sums.
        """
        held = self.heldout
        if held is None or self.heldout_merged:
            return
        if held.normalized:
            raise RuntimeError("the held-out statistics were finalized before they were merged")
        held._mirror()
        self._mirror()
        self.gram_sum.add_(held.gram_sum)
        self.abs_sum.add_(held.abs_sum)
        if held.cross_sum is not None:
            if self.cross_sum is None:
                self.cross_sum = torch.zeros_like(self.gram_sum)
            self.cross_sum.add_(held.cross_sum)
        self.tokens += held.tokens
        self.heldout_merged = True

    def _check_open(self) -> None:
        if self.normalized:
            raise RuntimeError("statistics were finalized; no more batches can be added")
        if self.heldout_merged:
            raise RuntimeError("statistics were read (held-out sums merged); no more batches can be added")

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a (tokens × n) batch into float64 sums (float32 sums drift over millions of tokens)."""
        self._check_open()
        for chunk in token_chunks(x, self.product_dtype):
            self._add_chunk(chunk.detach().to(self.product_dtype))

    def add_output(self, y: torch.Tensor) -> None:
        """Accumulate the reading module's outputs (tokens × m, bias removed) into Σ y yᵀ; the tokens are
        counted by `add`, which sees the same rows."""
        self._check_open()
        if self.output_sum is None:
            raise RuntimeError("these statistics keep H, not their module's outputs")
        for chunk in token_chunks(y, self.product_dtype):
            accumulate_gram(self.output_sum, chunk.detach().to(self.product_dtype))
        self.output_lower_only = True

    def _mirror(self) -> None:
        if self.lower_only:
            mirror_lower(self.gram_sum)
            self.lower_only = False
        if self.output_lower_only:
            mirror_lower(self.output_sum)
            self.output_lower_only = False

    def _add_chunk(self, x: torch.Tensor) -> None:
        # Also after a read: the mirrored upper triangle is overwritten by the next `_mirror`.
        if self.gram_sum is not None:
            accumulate_gram(self.gram_sum, x)
            self.lower_only = True
        # The chunk's column sums in x's dtype (a float64 reduction of float32 input measured 2.6× the
        # float32 one), the running sum in float64.
        self.abs_sum.add_(x.abs().sum(dim=0))
        self.tokens += x.shape[0]

    def add_pair(self, x_original: torch.Tensor, x_compressed: torch.Tensor) -> None:
        """Accumulate a batch seen by the dense model (x_o) and by the compressed prefix (x_c)."""
        self._check_open()
        if self.cross_sum is None:
            self.cross_sum = torch.zeros_like(self.gram_sum)
        dtype = self.product_dtype
        for xo, xc in zip(token_chunks(x_original, dtype), token_chunks(x_compressed, dtype)):
            xc = xc.detach().to(dtype)
            self._add_chunk(xc)
            accumulate_cross(self.cross_sum, xo.detach().to(dtype), xc)

    def add_output_pair(self, y_original: torch.Tensor, x_compressed: torch.Tensor) -> None:
        """Accumulate a batch of a module's dense outputs y_o = W x_o (tokens × m, bias removed) and its
        compressed-stream inputs x_c: Σ y_o x_cᵀ = W·Σ x_o x_cᵀ, everything refinement reads of H_oc.

        For a module that reads its input alone. m·n products per token instead of n² (down_proj: 576
        against 1536 rows in SmolLM2), an m×n sum instead of n×n, and no m·n² product W·H_oc later.
        """
        self._check_open()
        if self.cross_sum is None:
            self.cross_sum = torch.zeros(y_original.shape[-1], self.gram_sum.shape[0], dtype=torch.float64,
                                         device=self.gram_sum.device)
            self.cross_outputs = True
        if not self.cross_outputs:
            raise RuntimeError("these statistics pair inputs (Σ x_o x_cᵀ), not outputs")
        dtype = self.product_dtype
        width = max(y_original.shape[-1], x_compressed.shape[-1])  # the same rows in both chunkings
        for yo, xc in zip(token_chunks(y_original, dtype, width=width),
                          token_chunks(x_compressed, dtype, width=width)):
            xc = xc.detach().to(dtype)
            self._add_chunk(xc)
            accumulate_cross(self.cross_sum, yo.detach().to(dtype), xc)

    def grams(self):
        """`GramStatistics` (means) for refinement; single-stream statistics give H_cc = H_oc (= H_oo).

        After `release_gram`, paired statistics give ``h_cc=None`` (the whitening factor stands in).
        Statistics paired from outputs (`add_output_pair`) give W·H_oc (``w_h_oc``) and no H_oc.
        """
        from .refinement import GramStatistics

        self.merge_heldout()
        if self.gram_sum is None and self.cross_sum is not None:
            return self._paired(GramStatistics, None)
        h = self.gram
        if self.cross_sum is None:
            return GramStatistics.single_stream(h)
        return self._paired(GramStatistics, h)

    def _paired(self, cls, h_cc: torch.Tensor | None):
        cross = self._cross_mean()
        return cls(h_cc=h_cc, h_oc=None, w_h_oc=cross) if self.cross_outputs else cls(h_cc=h_cc, h_oc=cross)

    def release_heldout(self) -> None:
        """Free the held-out sequences' sums once the refinement has been validated on them (they are
        in the whole already): two n×n float64 matrices less while the whole data is factorized."""
        self.merge_heldout()
        self.heldout = None

    def _cross_mean(self) -> torch.Tensor:
        self.merge_heldout()
        return self.cross_sum if self.normalized else self.cross_sum / self.tokens

    def release_gram(self) -> None:
        """Free H (n×n float64) once its Cholesky factor has replaced it for every later use.

        The factor is as large as H, so keeping both doubles the largest live matrices at the run's
        memory peak (the widest input's whitening, e.g. down_proj: 970 MB each at width 11008). Cross
        statistics and activation scales stay; reading `gram` afterwards is an error.
        """
        if not self.normalized:
            raise RuntimeError("statistics must be finalized (all batches in, all-reduced) before H is released")
        self.gram_sum = None
        self.lower_only = False

    def release_sums(self) -> None:
        """Free H and the cross sum (two n×n float64) once the last reader is done with both; the token
        count and activation scales stay. Reading `gram` or `grams` afterwards is an error."""
        self.release_gram()
        self.cross_sum = None
        self.output_sum = None
        self.heldout = None

    @property
    def gram(self) -> torch.Tensor:
        """Mean Gram matrix H/N (same eigenvectors as Σ x xᵀ, numbers of order one)."""
        if self.gram_sum is None and self.output_sum is not None:
            raise RuntimeError("these statistics keep their module's output Gram, not H (BlockStatistics output_gram)")
        if self.gram_sum is None:
            raise RuntimeError("H was released after whitening (release_gram); nothing may read it later")
        self.merge_heldout()
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        self._mirror()
        return self.gram_sum if self.normalized else self.gram_sum / self.tokens

    @property
    def output_gram(self) -> torch.Tensor:
        """Mean Σ y yᵀ / N of the reading module's outputs (see ``empty``'s ``output_width``)."""
        if self.output_sum is None:
            raise RuntimeError("these statistics keep H, not their module's outputs")
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        self._mirror()
        return self.output_sum if self.normalized else self.output_sum / self.tokens

    @property
    def mean_abs(self) -> torch.Tensor:
        self.merge_heldout()
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        return self.abs_sum if self.normalized else self.abs_sum / self.tokens


def selected_tokens(x: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The rows of a B×T×n tensor that count: the tokens ``mask`` (B×T) keeps, of the sequences ``rows``
    (B bools) when given; a mask of another shape (e.g. a module that flattened its input) keeps all."""
    if rows is not None:  # a subset of the batch's sequences
        x = x[rows]
        mask = mask[rows.to(mask.device)] if mask is not None else None
    if mask is not None and x.ndim >= 2 and tuple(mask.shape) == tuple(x.shape[:-1]):
        return x[mask.to(device=x.device).bool()]
    return x.reshape(-1, x.shape[-1])


def _output_side_is_smaller(module: nn.Module) -> bool:
    """Whether a linear's output Gram (m×m) is smaller than its input's (n×n): a wide matrix."""
    out_features, in_features = linear_shape(module)
    return out_features < in_features


def _add_energy(energy: dict[str, torch.Tensor], counts: dict[str, int], name: str, y: torch.Tensor) -> None:
    """energy[name] += Σ‖y‖² over the rows of y: row sums in y's dtype (m terms), the total in float64."""
    value = y.float().square().sum(dim=-1).to(torch.float64).sum()
    energy[name] = energy[name] + value if name in energy else value
    counts[name] = counts.get(name, 0) + y.shape[0]


class BlockStatistics:
    """Forward-pre-hooks on a block's target linears that stream their input statistics.

    Usage::

        with BlockStatistics(targets) as stats:
            for batch in batches:
                stats.token_mask = mask
                block(hidden, **kwargs)
        h = stats.for_module("model.layers.0.self_attn.q_proj").gram
    """

    def __init__(self, targets: dict[str, nn.Module], product_dtype: torch.dtype = torch.float64,
                 holdout: bool = False, residual_sources: dict[str, nn.Module | None] | None = None,
                 heldout_tokens: int | None = None, output_gram: Collection[str] = (),
                 shared_input: bool = False) -> None:
        self.targets = targets
        # Targets whose factors will be left projections W′ = P·W (plain or activation-scaled SVD): one
        # that reads an input no earlier target read keeps Σ y yᵀ of its outputs (m²) instead of that
        # input's H (n²) when that is smaller, and leads no group (a later reader of the same input
        # collects H itself). Decided at each one's first call, in single-stream mode only.
        self._output_candidates = {name for name in output_gram if _output_side_is_smaller(targets[name])}
        self._output_mode: set[str] = set()
        # Paired mode: residual writers (`core.residual`) → the norm module whose input is the residual
        # before their addition (None: the block's input, `residual_input`). Their tokens are weighted
        # by 1 / ms(residual after the addition) of the dense stream, in every sum they enter.
        self.residual_sources = dict(residual_sources or {})
        # A writer that is its stage's only target pairs its dense *outputs* with the compressed inputs
        # (`InputStatistics.add_output_pair`): W·H_oc directly, in m·n per token instead of n². One that
        # shares its input with other targets keeps H_oc: the group's statistics are the leader's.
        self._output_pairs = set(self.residual_sources) & set(targets) if len(targets) == 1 else set()
        self.residual_input: torch.Tensor | None = None  # the dense stream's block input of this batch
        self._residual_before: dict[int, torch.Tensor] = {}  # id(norm) -> its input in the dense pass
        self._weights: dict[str, torch.Tensor] = {}  # writer -> √weight per selected token (dense pass)
        self._weights_heldout: dict[str, torch.Tensor] = {}
        self.product_dtype = product_dtype  # see `InputStatistics.product_dtype`
        self.holdout = holdout  # paired mode: also sum the held-out sequences separately
        self.token_mask: torch.Tensor | None = None
        self.heldout_rows: torch.Tensor | None = None  # B bools for the current batch (see `masked`)
        self._stash_heldout: dict[str, torch.Tensor] = {}
        self._energy_heldout: dict[str, torch.Tensor] = {}
        self._energy_heldout_tokens: dict[str, int] = {}
        # Residual writers' held-out rows, unweighted (float32): compressed inputs per input group
        # leader and dense outputs per writer (`core.writer_heldout`: the guard's and the validation's data).
        self._plain_inputs: dict[str, list[torch.Tensor]] = {}
        self._plain_outputs: dict[str, list[torch.Tensor]] = {}
        self._plain_weights: dict[str, list[torch.Tensor]] = {}  # writer -> √weight per held-out token (N×1)
        # Writers whose held-out tokens are many keep their moments instead of rows (`core.writer_heldout`,
        # chosen from ``heldout_tokens``, all processes' held-out tokens per batch pass); the batch's
        # dense outputs wait here for its compressed pass.
        self.heldout_tokens = heldout_tokens
        self._moments: dict[str, HeldoutMoments] = {}
        self._stash_heldout_outputs: dict[str, torch.Tensor] = {}
        # "single" | "original" (stash) | "compressed" (pair with the stash) | "idle" (a pass that must
        # not count, e.g. the dense stream advancing through a stage that is not paired)
        self.mode = "single"
        self._stash: dict[str, torch.Tensor] = {}
        self._group_of: dict[str, str] = {}  # module name -> group leader name
        self._stats: dict[str, InputStatistics] = {}
        self._energy: dict[str, torch.Tensor] = {}  # module name -> Σ ‖W x‖² (float64 scalar)
        self._energy_tokens: dict[str, int] = {}
        self._energy_normalized = False
        # First-batch input tensor per module. Holding the tensors (not just their addresses) keeps
        # the allocator from reusing a freed buffer, which would make unrelated inputs look shared.
        self._seen: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._grouping_done = False
        if shared_input and targets:
            # One input stage (`pipeline.input_stages`: every target reads the very same tensor): the
            # first target counts the tokens for all, so a pass may stop as soon as its pre-hook has
            # run, before any of them computes an output nobody reads (their energies then come from
            # the Gram where a report needs them, `target_energy` None).
            first = next(iter(targets))
            self._group_of = {name: first for name in targets}
            self._grouping_done = True

    # -- hook management -------------------------------------------------------------------------
    def __enter__(self) -> "BlockStatistics":
        for name, module in self.targets.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
            self._handles.append(module.register_forward_hook(self._make_output_hook(name)))
        for norm in {id(m): m for m in self.residual_sources.values() if m is not None}.values():
            self._handles.append(norm.register_forward_pre_hook(self._make_residual_hook()))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def masked(self, mask: torch.Tensor | None, heldout_rows: torch.Tensor | None = None,
               residual_input: torch.Tensor | None = None) -> Iterator[None]:
        """Token mask (B×T), held-out sequences (B bools) and dense block input of the batch about to run."""
        previous = self.token_mask, self.heldout_rows, self.residual_input
        self.token_mask, self.heldout_rows, self.residual_input = mask, heldout_rows, residual_input
        try:
            yield
        finally:
            self.token_mask, self.heldout_rows, self.residual_input = previous

    def _make_residual_hook(self):
        def hook(module: nn.Module, args: tuple) -> None:
            if self.mode == "original" and args and isinstance(args[0], torch.Tensor):
                self._residual_before[id(module)] = args[0].detach()
        return hook

    def _writer_weights(self, name: str, output: torch.Tensor) -> torch.Tensor | None:
        """√(1 / ms(r_after)) per token (B×T×1) of a residual writer's dense output, or None."""
        if name not in self.residual_sources:
            return None
        source = self.residual_sources[name]
        before = self.residual_input if source is None else self._residual_before.get(id(source))
        if before is None or before.numel() != output.numel():
            raise RuntimeError(f"{name}: the residual stream before its output was not observed")
        before = before.reshape(output.shape).to(output.device, torch.float64)
        return residual_weights(before + output.to(torch.float64)).sqrt()

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or self.mode == "idle":
                return
            if not self._grouping_done:
                self._assign_group(name, x)
            if self._group_of.get(name, name) != name:
                return  # another module with the same input already counts these tokens
            with phase("statistics"):
                held = self._heldout_tokens(x)
                # Held-out tokens go to their own sums only (merged into the whole when read).
                rest = None if held is None else ~self.heldout_rows.to(x.device)
                tokens = self._select_tokens(x, rest)
                if self.mode == "original":
                    if name not in self._output_pairs:  # those stash their outputs (output hook)
                        self._stash[name] = tokens.detach()
                        if held is not None:
                            self._stash_heldout[name] = held.detach()
                elif self.mode == "compressed":
                    stats = self._stats_for(name, x)
                    original = self._stash.pop(name)
                    if name in self._weights:  # a residual writer: both streams on the residual's scale
                        w = self._weights.pop(name).to(tokens.device, tokens.dtype)
                        original, tokens = original * w, tokens * w
                    pair = stats.add_output_pair if name in self._output_pairs else stats.add_pair
                    pair(original, tokens)
                    if held is not None and name in self._stash_heldout:
                        original = self._stash_heldout.pop(name)
                        if name in self.residual_sources:
                            # A writer keeps its held-out tokens as rows or moments (`core.writer_heldout`)
                            # and sums them into the whole now: no held-out Gram sums (two n×n float64).
                            root = self._weights_heldout.pop(name).to(held.device, held.dtype)
                            if self._keeps_moments(name):
                                self._moments[name].add(held, self._stash_heldout_outputs.pop(name), root)
                            else:
                                self._plain_inputs.setdefault(name, []).append(held.detach().float())
                                self._plain_weights.setdefault(name, []).append(root.reshape(-1, 1).float())
                            pair(original * root, held * root)
                        else:
                            stats.heldout.add_pair(original, held)
                else:
                    stats = self._stats_for(name, x)
                    stats.add(tokens)
                    if held is not None:
                        stats.heldout.add(held)

        return hook

    def _make_output_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            # The dense targets' outputs: on the compressed stream ("compressed") they are not targets.
            if self.mode in ("compressed", "idle") or not isinstance(output, torch.Tensor):
                return
            with phase("statistics"):
                weights = self._writer_weights(name, output.detach()) if self.mode == "original" else None
                y = self._select_tokens(output.detach())
                bias = linear_bias(module)
                if bias is not None:
                    y = y - bias.detach()
                if self.mode == "original" and name in self._output_pairs:
                    # Paired with the compressed inputs in its compressed pass, like an input's stash:
                    # the tokens outside the held-out rows, and the held-out ones apart.
                    held_out = self._heldout_tokens(output.detach())
                    if held_out is None:
                        self._stash[name] = y
                    else:
                        rest = self._select_tokens(output.detach(), ~self.heldout_rows.to(output.device))
                        unbiased = (lambda t: t - bias.detach()) if bias is not None else (lambda t: t)
                        self._stash[name], self._stash_heldout[name] = unbiased(rest), unbiased(held_out)
                held_weights = None
                if weights is not None:
                    y = y * self._select_tokens(weights).to(y.dtype)
                    # The inputs' sums take the held-out rows apart (see `_make_hook`): so do their weights.
                    held_weights = self._heldout_tokens(weights)
                    rest = None if held_weights is None else ~self.heldout_rows.to(weights.device)
                    self._weights[name] = self._select_tokens(weights, rest)
                    if held_weights is not None:
                        self._weights_heldout[name] = held_weights
                _add_energy(self._energy, self._energy_tokens, name, y)
                if name in self._output_mode and name in self._stats:  # its pre-hook saw a tensor input
                    self._stats[name].add_output(y)
                held = self._heldout_tokens(output.detach())
                if held is not None:
                    held = held - bias.detach() if bias is not None else held
                    if held_weights is not None:
                        if self._keeps_moments(name):
                            self._stash_heldout_outputs[name] = held.float()
                        else:
                            self._plain_outputs.setdefault(name, []).append(held.float())
                        held = held * held_weights.to(held.dtype)
                    _add_energy(self._energy_heldout, self._energy_heldout_tokens, name, held)

        return hook

    def _assign_group(self, name: str, x: torch.Tensor) -> None:
        if name in self._seen:
            # A module came round again: the first batch is over and its grouping is final.
            self._grouping_done = True
            self._seen.clear()
            return
        for other, other_x in self._seen.items():
            if other_x is x and self._group_of.get(other, other) == other and other not in self._output_mode:
                self._group_of[name] = other
                break
        else:
            self._group_of[name] = name
            if name in self._output_candidates and self.mode == "single" and not self.holdout:
                self._output_mode.add(name)
        self._seen[name] = x

    def _stats_for(self, name: str, x: torch.Tensor) -> InputStatistics:
        if name not in self._stats:
            if name in self._output_mode:
                self._stats[name] = InputStatistics.empty(x.shape[-1], x.device, self.product_dtype,
                                                          output_width=linear_shape(self.targets[name])[0])
                return self._stats[name]
            # Writers keep their held-out tokens as rows or moments, not sums (see the "compressed" hook).
            self._stats[name] = InputStatistics.empty(x.shape[-1], x.device, self.product_dtype,
                                                      heldout=self.holdout and name not in self.residual_sources)
            if self._keeps_moments(name):  # created up front: every process all-reduces the same tensors
                out_features = linear_shape(self.targets[name])[0]
                self._moments[name] = HeldoutMoments.empty(x.shape[-1], out_features, x.device, self.product_dtype)
        return self._stats[name]

    def _keeps_moments(self, name: str) -> bool:
        """Whether a writer's held-out tokens are kept as moments rather than rows (the smaller form)."""
        if not self.holdout or name not in self.residual_sources or self.heldout_tokens is None:
            return False
        out_features, in_features = linear_shape(self.targets[name])
        return not rows_are_smaller(self.heldout_tokens, in_features, out_features)

    def _select_tokens(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return selected_tokens(x, self.token_mask, rows)

    def _heldout_tokens(self, x: torch.Tensor) -> torch.Tensor | None:
        """The held-out sequences' tokens of a B×T×n tensor (None: holding out is off or none here)."""
        rows = self.heldout_rows
        if not self.holdout or rows is None or x.ndim != 3 or x.shape[0] != rows.shape[0] or not bool(rows.any()):
            return None
        return self._select_tokens(x, rows.to(x.device))

    def all_reduce(self) -> None:
        """Sum the statistics over ranks of a process group (no-op without one)."""
        from .distributed import all_reduce_statistics

        from .distributed import all_reduce_sum, all_reduce_tensor, is_distributed

        all_reduce_statistics(self._stats)
        all_reduce_statistics({name: s.heldout for name, s in self._stats.items() if s.heldout is not None})
        if not is_distributed():
            return
        for name in sorted(self._moments):  # same order on every rank
            moments = self._moments[name]
            for t in moments.tensors():
                all_reduce_tensor(t)
            moments.tokens = int(all_reduce_sum([float(moments.tokens)], device=moments.energies.device)[0])
        self._gather_plain_rows()
        if not self._energy:
            return
        names = sorted(self._energy)  # same order on every rank
        device = self._energy[names[0]].device
        for energy, tokens in ((self._energy, self._energy_tokens), (self._energy_heldout, self._energy_heldout_tokens)):
            # Every rank reduces every name (a rank may have held out nothing).
            local = [float(energy.get(n, 0.0)) for n in names] + [float(tokens.get(n, 0)) for n in names]
            sums = all_reduce_sum(local, device=device)
            for i, n in enumerate(names):
                energy[n] = torch.tensor(sums[i], dtype=torch.float64, device=device)
                tokens[n] = int(sums[len(names) + i])

    def _gather_plain_rows(self) -> None:
        """Every rank gets every rank's held-out writer rows (the owner of a writer validates it)."""
        from .distributed import all_gather_rows

        if not self.holdout:
            return
        for name in sorted(n for n in self.residual_sources if n in self.targets and not self._keeps_moments(n)):
            out_features, in_features = linear_shape(self.targets[name])
            for rows, key, width in ((self._plain_inputs, self.leader(name), in_features),
                                     (self._plain_outputs, name, out_features), (self._plain_weights, name, 1)):
                device = next(self.targets[name].parameters()).device  # NCCL gathers on the GPU
                local = torch.cat(rows[key]) if rows.get(key) else torch.zeros(0, width, device=device)
                rows[key] = [all_gather_rows(local)]

    def finalize(self) -> None:
        """Sums → means in place for every input (after `all_reduce`; see `InputStatistics.finalize`)."""
        # No batch follows: the grouping is final, and the first batch's inputs kept to find it are
        # dropped. With a single calibration batch nothing else would drop them, and they stayed alive
        # through the whole factorization (182 MB at Llama-7B width, 8 × 256 tokens).
        self._grouping_done = True
        self._seen.clear()
        for stats in self._stats.values():
            stats.finalize()
        for moments in self._moments.values():
            moments.finalize()
        if not self._energy_normalized:
            for energy, counts in ((self._energy, self._energy_tokens), (self._energy_heldout, self._energy_heldout_tokens)):
                for name, tokens in counts.items():
                    if tokens:
                        energy[name] = energy[name] / tokens
            self._energy_normalized = True

    # -- results -----------------------------------------------------------------------------------
    def for_module(self, name: str) -> InputStatistics:
        leader = self.leader(name)
        if leader not in self._stats:
            raise RuntimeError(f"no calibration input reached {name}; is it used in the forward pass?")
        return self._stats[leader]

    @property
    def keeps_output_grams(self) -> bool:
        """Whether some target may keep its outputs' Gram (``output_gram``): its pass must compute them."""
        return bool(self._output_candidates)

    def leader(self, name: str) -> str:
        """The module whose statistics ``name`` shares (itself when its input is not shared)."""
        return self._group_of.get(name, name)

    def release(self, name: str) -> None:
        """Free the statistics of ``name``'s input group (its last reader is done with them)."""
        leader = self.leader(name)
        self._stats.pop(leader, None)
        self._plain_inputs.pop(leader, None)
        for member, group in self._group_of.items():
            if group == leader:
                self._plain_outputs.pop(member, None)
        self._plain_outputs.pop(name, None)
        self._plain_weights.pop(name, None)
        self._moments.pop(name, None)

    def writer_heldout(self, name: str) -> WriterHeldout | None:
        """A residual writer's held-out tokens as rows: compressed inputs (N×n) and dense outputs (N×m),
        unweighted, and each token's √weight (in the whole sums already, see the "compressed" hook) —
        or their moments where those are smaller (`core.writer_heldout`); None when it is not a writer,
        nothing was held out, or its input group is led by a module that is not a writer (then its
        compressed inputs were not kept)."""
        if name in self._moments:
            return self._moments[name] if self._moments[name].tokens else None
        inputs, outputs = self._plain_inputs.get(self.leader(name)), self._plain_outputs.get(name)
        if not inputs or not outputs:
            return None
        x, y = torch.cat(inputs), torch.cat(outputs)
        self._plain_inputs[self.leader(name)], self._plain_outputs[name] = [x], [y]  # joined once
        root = None
        if self._plain_weights.get(name):
            root = torch.cat(self._plain_weights[name])
            self._plain_weights[name] = [root]
            root = root.reshape(-1)
        return HeldoutRows(x, y, root) if x.shape[0] else None

    def target_energy(self, name: str, heldout: bool = False) -> float | None:
        """Mean ‖W x‖² per token of a target's dense output (bias removed), or None if never observed.

        In paired mode this is over the dense model's stream (‖W X_o‖²: refinement's ‖Y‖² and the
        denominator of the relative output error); ``heldout``: over the held-out sequences only.
        Read after `finalize`.
        """
        energy, counts = (self._energy_heldout, self._energy_heldout_tokens) if heldout else (self._energy, self._energy_tokens)
        if name not in energy or not counts.get(name):
            return None
        value = energy[name]
        return float(value if self._energy_normalized else value / counts[name])

    def groups(self) -> dict[str, list[str]]:
        """Leader name → all module names sharing its input (for reports and tests)."""
        out: dict[str, list[str]] = {}
        for name in self.targets:
            out.setdefault(self._group_of.get(name, name), []).append(name)
        return out
