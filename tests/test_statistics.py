import pytest
import torch

from adasvd_lightning.core.statistics import BlockStatistics, InputStatistics
from adasvd_lightning.core.surgery import find_targets
from conftest import tiny_model


def test_gram_accumulation_matches_direct_product():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(7, 5, generator=g) for _ in range(3)]
    stats = InputStatistics.empty(5)
    for c in chunks:
        stats.add(c)
    x = torch.cat(chunks).double()
    assert stats.tokens == 21
    assert torch.allclose(stats.gram, x.T @ x / 21)
    assert torch.allclose(stats.mean_abs, x.abs().mean(0))


def test_shared_inputs_are_grouped_and_counted_once(token_batches):
    model = tiny_model("llama")
    [(_, _, targets), *_] = find_targets(model)
    block = model.model.layers[0]
    captured = {}
    block.self_attn.q_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("attn", []).append(a[0]))
    block.mlp.gate_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("mlp", []).append(a[0]))
    with BlockStatistics(targets) as stats, torch.no_grad():
        for batch in token_batches:
            model(batch)
    groups = {tuple(sorted(n.rsplit(".", 1)[-1] for n in v)) for v in stats.groups().values()}
    assert groups == {("k_proj", "q_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)}
    q = stats.for_module("model.layers.0.self_attn.q_proj")
    assert q is stats.for_module("model.layers.0.self_attn.v_proj")
    x = torch.cat([t.reshape(-1, 64) for t in captured["attn"]]).double()
    assert q.tokens == x.shape[0] == 256
    assert torch.allclose(q.gram, x.T @ x / x.shape[0])
    assert stats.for_module("model.layers.0.mlp.up_proj").tokens == 256


def test_token_mask_excludes_padding(token_batches):
    model = tiny_model("llama")
    [(_, _, targets), *_] = find_targets(model)
    mask = torch.ones(4, 32, dtype=torch.long)
    mask[:, 20:] = 0
    with BlockStatistics(targets) as stats, torch.no_grad():
        with stats.masked(mask):
            model(token_batches[0], attention_mask=mask)
    assert stats.for_module("model.layers.0.self_attn.q_proj").tokens == 4 * 20


def test_one_calibration_batch_leaves_no_activation_alive_after_finalize(token_batches):
    """The first batch's inputs are kept to find which modules share one (q/k/v, gate/up); the second
    batch ends that. With a single batch they must go at `finalize`, or every distinct input of the
    block stays alive through the factorization (182 MB at Llama-7B width, 8 × 256 tokens)."""
    import gc
    import weakref

    model = tiny_model("llama")
    [(_, _, targets), *_] = find_targets(model)
    held = []
    for module in targets.values():
        module.register_forward_pre_hook(lambda m, a: held.append(weakref.ref(a[0])))
    with BlockStatistics(targets) as stats, torch.no_grad():
        model(token_batches[0])
    gc.collect()
    alive = {id(r()) for r in held if r() is not None}
    assert len(alive) == 4  # the attention, o_proj, MLP and down_proj inputs, before finalize
    stats.finalize()
    gc.collect()
    assert all(r() is None for r in held)
    groups = {tuple(sorted(n.rsplit(".", 1)[-1] for n in v)) for v in stats.groups().values()}
    assert groups == {("k_proj", "q_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)}


def test_target_energy_is_the_dense_output_energy_without_bias(token_batches):
    """‖W x‖² per token read off the outputs equals tr(W H Wᵀ) from the Gram matrix (masked, bias removed)."""
    model = tiny_model("qwen2")  # q/k/v carry biases
    [(_, _, targets), *_] = find_targets(model)
    mask = torch.ones(4, 32, dtype=torch.long)
    mask[:, 20:] = 0
    with BlockStatistics(targets) as stats, torch.no_grad():
        for batch in token_batches:
            with stats.masked(mask):
                model(batch, attention_mask=mask)
    stats.finalize()
    for name, module in targets.items():
        w = module.weight.detach().double()
        expected = float((w @ stats.for_module(name).gram * w).sum())
        assert stats.target_energy(name) == pytest.approx(expected, rel=1e-5), name
    assert stats.for_module("model.layers.0.self_attn.q_proj").tokens == 2 * 4 * 20


def _paired_pass(lin, xo, xc, mask=None, rows=None) -> BlockStatistics:
    """Paired statistics of one linear: the dense stream (xo) first, then the compressed one (xc)."""
    with BlockStatistics({"lin": lin}, holdout=rows is not None) as stats, torch.no_grad(), stats.masked(mask, rows):
        stats.mode = "original"
        lin(xo)
        stats.mode = "compressed"
        lin(xc)
    stats.finalize()
    return stats


def test_paired_mode_measures_energy_on_the_dense_stream_only():
    """In paired mode ‖W X_o‖² comes from the "original" pass; the compressed-stream pass adds nothing."""
    lin = torch.nn.Linear(6, 4)
    g = torch.Generator().manual_seed(2)
    xo, xc = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
    stats = _paired_pass(lin, xo, xc)
    s = stats.for_module("lin")
    w = lin.weight.detach().double()
    assert s.tokens == 10
    assert torch.allclose(s.gram, xc.double().T @ xc.double() / 10)
    assert torch.allclose(s.grams().h_oc, xo.double().T @ xc.double() / 10)
    assert s.grams().h_oo is None  # never accumulated: the energy replaces it
    assert stats.target_energy("lin") == pytest.approx(float((xo.double() @ w.T).square().sum() / 10), rel=1e-6)


def test_block_lower_gram_matches_full_product():
    """The symmetric blocked update computes the same entries as xᵀx, for widths that do and do not divide."""
    from adasvd_lightning.core.statistics import accumulate_gram, mirror_lower

    g = torch.Generator().manual_seed(3)
    for n, block in [(10, 4), (12, 4), (7, 16)]:
        h = torch.zeros(n, n, dtype=torch.float64)
        chunks = [torch.randn(9, n, generator=g, dtype=torch.float64) for _ in range(3)]
        for c in chunks:
            accumulate_gram(h, c, block=block)
        mirror_lower(h, block=block)
        x = torch.cat(chunks)
        torch.testing.assert_close(h, x.T @ x, rtol=1e-13, atol=1e-13)
    # Through InputStatistics at a width above the default block, reading the Gram between batches.
    stats = InputStatistics.empty(700)
    x = torch.randn(40, 700, generator=g)
    stats.add(x[:20])
    first = stats.gram.clone()
    stats.add(x[20:])
    stats.finalize()
    x64 = x.double()
    torch.testing.assert_close(first, x64[:20].T @ x64[:20] / 20, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.gram, x64.T @ x64 / 40, rtol=1e-12, atol=1e-12)


# -- float32 products (CompressionConfig.statistics_dtype) ------------------------------------------------

OUTLIERS = [3, 100, 250]  # channels 100× the rest, as in LLM activations


def _activations(tokens: int, n: int, g: torch.Generator, decay: float = -3.0) -> torch.Tensor:
    """float32 activations with a decaying spectrum (condition ~1e6 before outliers) and outlier channels."""
    spectrum = torch.logspace(0, decay, n, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    x = (torch.randn(tokens, n, generator=g, dtype=torch.float64) * spectrum) @ q.T
    x[:, OUTLIERS] *= 100
    return x.float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _bulk(h: torch.Tensor) -> torch.Tensor:
    """H without the outlier rows and columns: the entries an outlier-dominated norm would hide."""
    keep = [i for i in range(h.shape[0]) if i not in OUTLIERS]
    return h[keep][:, keep]


def test_float32_products_match_float64_statistics():
    """float32 chunk products agree with float64 to ~1e-7 (bf16 products would be ~1e-3) yet ran."""
    g = torch.Generator().manual_seed(4)
    n = 700  # above GRAM_BLOCK: the block lower triangle with float32 row-block scratches
    batches = [_activations(512, n, g) for _ in range(3)]
    s64, s32 = InputStatistics.empty(n), InputStatistics.empty(n, product_dtype=torch.float32)
    for b in batches:
        s64.add(b)
        s32.add(b)
    s64.finalize()
    s32.finalize()
    assert s32.gram_sum.dtype == s32.abs_sum.dtype == torch.float64
    assert _relative(s32.gram, s64.gram) < 1e-5
    assert _relative(_bulk(s32.gram), _bulk(s64.gram)) < 1e-5
    assert _relative(s32.mean_abs, s64.mean_abs) < 1e-6
    assert not torch.equal(s32.gram, s64.gram)  # the float32 path really ran
    torch.testing.assert_close(s32.gram, s32.gram.T, rtol=0, atol=0)  # mirrored like the float64 path


def test_float32_paired_statistics_match_float64():
    g = torch.Generator().manual_seed(5)
    n = 520
    pairs = [(_activations(384, n, g), _activations(384, n, g)) for _ in range(2)]
    s64, s32 = InputStatistics.empty(n), InputStatistics.empty(n, product_dtype=torch.float32)
    for xo, xc in pairs:
        s64.add_pair(xo, xc)
        s32.add_pair(xo, xc)
    g64, g32 = s64.grams(), s32.grams()
    assert s32.cross_sum.dtype == torch.float64
    for ours, reference in [(g32.h_cc, g64.h_cc), (g32.h_oc, g64.h_oc)]:
        assert _relative(ours, reference) < 1e-5
        assert _relative(_bulk(ours), _bulk(reference)) < 1e-5
        assert not torch.equal(ours, reference)


def test_float32_products_accumulate_in_float64_across_batches():
    """One huge token, then 1000 small batches: a float32 running sum would drop every small one."""
    s = InputStatistics.empty(1, product_dtype=torch.float32)
    s.add(torch.tensor([[1e4]]))
    for _ in range(1000):
        s.add(torch.ones(1, 1))
    assert s.gram_sum.item() == 1e8 + 1000  # float32: 1e8 + 1 rounds back to 1e8 (its spacing is 8)


def test_float32_statistics_keep_the_whitened_truncation_error():
    """‖(W − W′)X‖/‖WX‖ from float32-product statistics equals the float64 one (outlier-heavy X).

    The whitened optimum is stationary in H, so H's round-off enters the error at second order: measured
    ~1e-15 relative; bfloat16 products give 1.5e-6, so the bound below still catches a precision bug.
    """
    from adasvd_lightning.core.factorization import factorize
    from adasvd_lightning.core.whitening import compute_whitening

    g = torch.Generator().manual_seed(0)
    n, m, rank = 300, 200, 60
    batches = [_activations(1024, n, g) for _ in range(4)]
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.cat(batches).double()
    errors = {}
    for dtype in (torch.float64, torch.float32):
        stats = InputStatistics.empty(n, product_dtype=dtype)
        for b in batches:
            stats.add(b)
        factors = factorize(w, rank, compute_whitening(stats.gram))
        errors[dtype] = float(torch.linalg.norm((w - factors.dense()) @ x.T) / torch.linalg.norm(w @ x.T))
    assert 0.01 < errors[torch.float64] < 0.1  # a real truncation, not a trivial one
    assert abs(errors[torch.float32] - errors[torch.float64]) / errors[torch.float64] < 1e-9


def test_unsupported_product_dtype_is_refused():
    with pytest.raises(ValueError, match="product_dtype"):
        InputStatistics.empty(4, product_dtype=torch.bfloat16)


# svd-llm-v2: a dense planning pass with statistics, then the compression pass; svd-llm: paired statistics.
# (Not adasvd: adaComp's V-step amplifies the float32 round-off on near-singular staged o_proj statistics —
# the open defect pinned by test_distributed's strict xfail — which is about the refinement, not about
# whether the dtype reaches every pass.)
@pytest.mark.parametrize("method,passes", [("svd-llm-v2", 2), ("svd-llm", 1)])
def test_statistics_dtype_reaches_every_statistics_pass(method, passes, token_batches, monkeypatch):
    """Every InputStatistics a run creates uses the configured products; the result stays close."""
    import warnings

    from adasvd_lightning import CompressionConfig, CompressionWarning, compress_model

    created: list[torch.dtype] = []
    empty = InputStatistics.empty.__func__

    def recording(cls, width, device="cpu", product_dtype=torch.float64, heldout=False):
        created.append(product_dtype)
        return empty(cls, width, device, product_dtype, heldout)

    monkeypatch.setattr(InputStatistics, "empty", classmethod(recording))
    logits, counts = {}, {}
    for dtype in ("float64", "float32"):
        created.clear()
        model = tiny_model("llama")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompressionWarning)
            compress_model(model, CompressionConfig(method=method, ratio=0.4, statistics_dtype=dtype), token_batches)
        counts[dtype] = list(created)
        with torch.no_grad():
            logits[dtype] = torch.cat([model(batch).logits for batch in token_batches]).double()
    assert len(counts["float32"]) == len(counts["float64"]) == passes * 2 * 4  # × 2 blocks × 4 distinct inputs
    assert set(counts["float64"]) == {torch.float64} and set(counts["float32"]) == {torch.float32}
    assert _relative(logits["float32"], logits["float64"]) < 1e-4
    assert not torch.equal(logits["float32"], logits["float64"])


def test_heldout_sequences_are_summed_apart_and_still_count_in_the_whole():
    """Paired statistics with held-out rows: the child sums are exactly the held-out sequences' Grams
    (masked tokens excluded) and energy; the parent still holds every token."""
    lin = torch.nn.Linear(6, 4)
    g = torch.Generator().manual_seed(3)
    xo, xc = torch.randn(5, 7, 6, generator=g), torch.randn(5, 7, 6, generator=g)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[1, 5:] = False  # padding in a held-out row
    rows = torch.tensor([False, True, False, True, False])
    stats = _paired_pass(lin, xo, xc, mask, rows)
    s = stats.for_module("lin")
    held_mask = mask & rows[:, None]
    ho, hc = xo[held_mask].double(), xc[held_mask].double()
    assert s.tokens == int(mask.sum()) and s.heldout.tokens == int(held_mask.sum()) == 12
    assert torch.allclose(s.gram, xc[mask].double().T @ xc[mask].double() / s.tokens)
    assert torch.allclose(s.heldout.gram, hc.T @ hc / 12)
    assert torch.allclose(s.heldout.grams().h_oc, ho.T @ hc / 12)
    w = lin.weight.detach().double()  # the bias is taken off the output: energy of W x alone
    expected = float((ho @ w.T).square().sum() / 12)
    assert stats.target_energy("lin", heldout=True) == pytest.approx(expected, rel=1e-6)


def test_heldout_tokens_are_multiplied_once_and_merged_on_read(monkeypatch):
    """Held-out rows are summed apart, not twice: every token's Gram and cross products are formed once
    (a fifth less work at a quarter held out), and the first read adds them into the whole."""
    from adasvd_lightning.core import statistics as module

    counted = {"gram": 0, "cross": 0}
    gram, cross = module.accumulate_gram, module.accumulate_cross

    def counting_gram(h, x, *args, **kwargs):
        counted["gram"] += x.shape[0]
        return gram(h, x, *args, **kwargs)

    def counting_cross(h, xo, xc, *args, **kwargs):
        counted["cross"] += xc.shape[0]
        return cross(h, xo, xc, *args, **kwargs)

    monkeypatch.setattr(module, "accumulate_gram", counting_gram)
    monkeypatch.setattr(module, "accumulate_cross", counting_cross)
    lin = torch.nn.Linear(6, 4)
    g = torch.Generator().manual_seed(5)
    xo, xc = torch.randn(4, 5, 6, generator=g), torch.randn(4, 5, 6, generator=g)
    rows = torch.tensor([True, False, False, True])
    with BlockStatistics({"lin": lin}, holdout=True) as stats, torch.no_grad(), stats.masked(None, rows):
        stats.mode = "original"
        lin(xo)
        stats.mode = "compressed"
        lin(xc)
    assert counted == {"gram": 20, "cross": 20}  # 4 × 5 tokens, 10 of them held out
    s = stats.for_module("lin")
    whole = xc.reshape(-1, 6).double()
    assert torch.allclose(s.gram, whole.T @ whole / 20)  # read before finalize: merged, all 20 tokens
    assert torch.allclose(s.grams().h_oc, xo.reshape(-1, 6).double().T @ whole / 20)
    assert s.tokens == 20 and s.heldout.tokens == 10
    with pytest.raises(RuntimeError, match="merged"):
        s.add_pair(xo[0], xc[0])


class _SharedInput(torch.nn.Module):
    """Two linears reading one tensor, in the given order: a wide one (m < n) and a tall one."""

    def __init__(self, wide_first: bool) -> None:
        super().__init__()
        self.wide, self.tall = torch.nn.Linear(12, 5), torch.nn.Linear(12, 20, bias=False)
        self.wide_first = wide_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wide_first:
            return self.wide(x).sum() + self.tall(x).sum()
        return self.tall(x).sum() + self.wide(x).sum()


def test_a_wide_target_reading_its_input_alone_keeps_its_outputs_gram(token_batches):
    """``output_gram`` targets (left projections: only ‖(I − P)Y‖² is needed) keep Σ y yᵀ (m×m) instead
    of their input's H (n×n) when m < n and no earlier target read the same input. In the tiny Llama
    only down_proj qualifies (q/k/v/o are square, gate/up tall); everything else is what a run
    without the option collects, bit for bit."""
    model = tiny_model("llama")
    [(_, _, targets), *_] = find_targets(model)
    down = "model.layers.0.mlp.down_proj"
    outputs = []
    model.get_submodule(down).register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
    runs = {}
    for option in ((), list(targets)):
        with BlockStatistics(targets, output_gram=option) as stats, torch.no_grad():
            for batch in token_batches:
                model(batch)
        stats.finalize()
        runs[bool(option)] = stats
    plain, kept = runs[False], runs[True]
    assert kept.groups() == plain.groups()
    for name in targets:
        if name == down:
            continue
        a, b = plain.for_module(name), kept.for_module(name)
        assert b.output_sum is None and torch.equal(a.gram, b.gram) and torch.equal(a.mean_abs, b.mean_abs)
    a, b = plain.for_module(down), kept.for_module(down)
    assert b.gram_sum is None and b.tokens == a.tokens == 256
    with pytest.raises(RuntimeError, match="output Gram, not H"):
        b.gram
    torch.testing.assert_close(b.mean_abs, a.mean_abs, rtol=0, atol=0)
    y = torch.cat([o.reshape(-1, 64) for o in outputs[len(token_batches):]]).double()
    assert b.output_gram.shape == (64, 64)
    torch.testing.assert_close(b.output_gram, y.T @ y / y.shape[0], rtol=1e-12, atol=1e-12)
    assert kept.target_energy(down) == plain.target_energy(down)


@pytest.mark.parametrize("wide_first", [True, False])
def test_an_input_read_by_another_target_still_gets_its_gram(wide_first):
    """A wide candidate that reads an input first leads no group: the later reader of the same tensor
    collects H itself. Read second, the candidate joins the first reader's group and keeps no outputs."""
    net = _SharedInput(wide_first)
    targets = {"wide": net.wide, "tall": net.tall}
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(3, 7, 12, generator=g) for _ in range(2)]
    with BlockStatistics(targets, output_gram=["wide"]) as stats, torch.no_grad():
        for x in xs:
            net(x)
    stats.finalize()
    x = torch.cat(xs).reshape(-1, 12).double()
    tall, wide = stats.for_module("tall"), stats.for_module("wide")
    torch.testing.assert_close(tall.gram, x.T @ x / 42, rtol=1e-12, atol=1e-12)
    if wide_first:
        assert stats.leader("tall") == "tall" and wide.gram_sum is None
        y = x @ net.wide.weight.detach().double().T  # the bias is taken off: y = W x
        torch.testing.assert_close(wide.output_gram, y.T @ y / 42, rtol=1e-6, atol=1e-7)
    else:
        assert wide is tall and wide.output_sum is None


def test_output_statistics_are_refused_where_they_cannot_hold():
    stats = InputStatistics.empty(6)
    with pytest.raises(RuntimeError, match="keep H"):
        stats.add_output(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="hold nothing out"):
        InputStatistics.empty(6, output_width=3, heldout=True)


def test_pairs_of_different_widths_split_into_the_same_rows(monkeypatch):
    """Token batches are converted a chunk of rows at a time, the rows sized by the width. Outputs
    (m wide) paired with inputs (n wide) must split alike: at Llama-7B width a batch of 16 k tokens made
    1,524-row input chunks and 4,096-row output chunks, and the pairing failed. With chunks of 300 rows
    and 1,000 tokens here, W·H_oc and a writer's held-out moments equal the whole products."""
    from adasvd_lightning.core import gram
    from adasvd_lightning.core.writer_heldout import HeldoutMoments

    monkeypatch.setattr(gram, "CHUNK_BYTES", 300 * 40 * 8)  # 300 rows of 40 float64 columns
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 40, generator=g, dtype=torch.float64)
    y = torch.randn(1000, 12, generator=g, dtype=torch.float64)
    root = torch.rand(1000, generator=g, dtype=torch.float64)
    assert len(gram.token_chunks(x)) == 4 and len(gram.token_chunks(y)) == 1  # the widths alone differ
    s = InputStatistics.empty(40)
    s.add_output_pair(y, x)
    s.finalize()
    torch.testing.assert_close(s.grams().w_h_oc, y.T @ x / 1000, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.gram, x.T @ x / 1000, rtol=1e-12, atol=1e-12)
    moments = HeldoutMoments.empty(40, 12, product_dtype=torch.float64)
    moments.add(x, y, root)
    assert moments.tokens == 1000
    torch.testing.assert_close(moments.c_weighted, (y * root[:, None] ** 2).T @ x, rtol=1e-12, atol=1e-10)
