"""Multi-process compression with 2 CPU processes (gloo): shards, all-reduced statistics, shared factors."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adasvd_lightning import CompressionConfig, compress_model
from adasvd_lightning.core.lowrank import FactorizedLinear
from conftest import tiny_model


def _batches():
    g = torch.Generator().manual_seed(11)
    return list(torch.randint(0, 128, (16, 32), generator=g).split(4))  # 4 batches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _force_form(form: str) -> None:
    """Keep every writer's held-out tokens as rows or as moments (`core.writer_heldout`), whatever their
    count: this tiny calibration set would pick rows, and moments are all-reduced, not gathered."""
    if form != "auto":
        from adasvd_lightning.core import statistics

        statistics.rows_are_smaller = lambda *args: form == "rows"


def _worker(rank: int, world: int, port: int, method: str, options: dict, out_dir: str, form: str = "auto",
            table: str | None = None, activation_dir: str | None = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _force_form(form)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_model("llama")
        shard = _batches()[rank::world]
        report = compress_model(model, CompressionConfig(method=method, ratio=0.5, method_options=options,
                                                         probe_table=table, activation_dir=activation_dir), shard)
        torch.save({"state": model.state_dict(), "tokens": report.calibration_tokens,
                    "ranks": [m.rank for m in report.modules],
                    "errors": [m.relative_error for m in report.modules],
                    "probes": [report.allocation.get("sensitivity_probes", 0),
                               report.allocation.get("sensitivity_rows_reused", 0)],
                    "sequences": dict(report.allocation.get("sensitivity_probe_sequences", {}))},
                   f"{out_dir}/rank{rank}.pt")
        # Both ranks leave together: tearing gloo down while the peer is still in a collective
        # aborts the process ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The results are on disk: leave without the interpreter's teardown, where gloo's threads can still
    # abort the process the same way (seen once in a full-suite run) and fail a run that succeeded.
    os._exit(0)


def _dense_weights(model_state: dict) -> dict[str, torch.Tensor]:
    """Factor products (sign-invariant) of every factorized module, keyed by module name."""
    out = {}
    for key in model_state:
        if key.endswith(".up"):
            name = key[: -len(".up")]
            out[name] = model_state[f"{name}.up"].double() @ model_state[f"{name}.down"].double()
    return out


# adasvd: adaComp's V-step solves against H_cc, near-singular at block 0 of this tiny model (256 tokens
# for 64 features), and used to amplify the round-off of the differently ordered distributed sums (4 %
# on o_proj's product). The held-out validation of the refinement's steps (same held-out sequences on
# every rank and in one process: content-hashed) no longer takes those steps.
# svd: factors built before the pass, errors measured in it on each rank's shard and all-reduced.
# asvd: down_proj's statistics are its outputs' Gram (no H), all-reduced like the others.
@pytest.mark.parametrize("method,options,form", [("svd-llm", {}, "auto"), ("adasvd", {}, "auto"),
                                                 ("svd-llm", {}, "moments"), ("svd", {}, "auto"),
                                                 ("asvd", {}, "auto")])
def test_two_processes_match_each_other_and_a_single_process_run(tmp_path, method, options, form, monkeypatch):
    # One case keeps both ranks' calibration activations in files of one shared folder.
    activations = tmp_path / "activations" if form == "moments" else None
    if activations is not None:
        activations.mkdir()
    mp.start_processes(_worker, args=(2, _free_port(), method, options, str(tmp_path), form, None,
                                      str(activations) if activations is not None else None), nprocs=2,
                       join=True, start_method="spawn")
    if activations is not None:
        assert list(activations.iterdir()) == []
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # Identical weights on both ranks (factors were computed once and broadcast).
    assert r0["state"].keys() == r1["state"].keys()
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert r0["tokens"] == r1["tokens"] == 16 * 32  # statistics of the union of the shards

    single = tiny_model("llama")
    if form != "auto":
        from adasvd_lightning.core import statistics

        monkeypatch.setattr(statistics, "rows_are_smaller", lambda *args: form == "rows")
    report = compress_model(single, CompressionConfig(method=method, ratio=0.5, method_options=options), _batches())
    assert [m.rank for m in report.modules] == r0["ranks"]
    # Every rank reports the errors over the union of the shards, those of one process.
    assert r0["errors"] == r1["errors"] and None not in r0["errors"]
    assert r0["errors"] == pytest.approx([m.relative_error for m in report.modules], rel=1e-5)
    expected = _dense_weights(single.state_dict())
    got = _dense_weights(r0["state"])
    assert expected.keys() == got.keys() and expected
    for name in expected:
        rel = (got[name] - expected[name]).norm() / expected[name].norm()
        assert rel < 1e-4, (name, float(rel))
    assert sum(isinstance(m, FactorizedLinear) for m in single.modules()) == len(expected)


def test_two_processes_resume_a_module_kl_allocation_from_one_probe_table(tmp_path):
    """Rank 0 writes the table; every rank fingerprints its own shard; on the second run both ranks take
    all rows from it (a rank that probed alone would hang the other's collectives) and build the model
    of the first run."""
    table = str(tmp_path / "probes.jsonl")
    options = {"allocation": "module-kl", "sensitivity_candidates": [0.4, 1.0]}
    runs = []
    for run in ("first", "again"):
        out = tmp_path / run
        out.mkdir()
        mp.start_processes(_worker, args=(2, _free_port(), "duo-svd", options, str(out), "auto", table), nprocs=2,
                           join=True, start_method="spawn")
        runs.append([torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)])
    (first0, first1), (again0, again1) = runs
    assert first0["probes"] == first1["probes"] == [14 * 2, 0]
    assert again0["probes"] == again1["probes"] == [0, 14]
    assert len(open(table).read().splitlines()) == 1 + 14  # rank 0 alone wrote: no row twice
    for a, b in ((first0, again0), (first0, first1), (again0, again1)):
        assert a["ranks"] == b["ranks"]
        assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])


@pytest.mark.parametrize("stop", [{"tail_tolerance": 0.0}, {"tail_tolerance": 1e9}, {"tail_sequences": 3}])
def test_two_processes_take_the_same_lazy_tail_probes(tmp_path, stop):
    """``duo-svd``'s tail probes under a process group: every step reads one sequence per process and
    all-reduces, so both processes stop at the same step (else one would hang in a collective), probe
    the same modules and build the same model — reading all sequences, stopping at a tolerance, or at
    a cap that is not a multiple of the processes."""
    options = {**stop, "sensitivity_candidates": [0.2, 0.6, 1.0]}
    mp.start_processes(_worker, args=(2, _free_port(), "duo-svd", options, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["probes"] == r1["probes"] and r0["probes"][0] > 0
    assert r0["sequences"] == r1["sequences"]
    if "tail_sequences" in stop:  # 3 sequences = 2 steps of one sequence per process
        assert set(r0["sequences"].values()) == {4}
    assert r0["ranks"] == r1["ranks"]
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])


def test_lightning_ddp_two_cpu_processes_end_with_identical_compressed_models(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "MASTER_PORT": str(_free_port()), "PL_DISABLE_FORK": "1"}
    proc = subprocess.run([sys.executable, str(tests / "scripts" / "ddp_compress.py"), str(tmp_path), str(tests)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["tokens"] == r1["tokens"] == 2 * 2 * 4 * 32  # 2 ranks × 2 batches × 4 × 32 tokens
    # DDP keeps the replicas in sync through training only if they started identical.
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    assert any(k.endswith(".up") for k in r0["state"])
    # Validation perplexity (torchmetrics, reduced across the 2 processes) is the token-weighted value
    # of the whole validation set, on both ranks.
    assert r0["val_ppl"] == pytest.approx(r0["expected_ppl"], rel=1e-5)
    assert r1["val_ppl"] == pytest.approx(r0["expected_ppl"], rel=1e-5)
