"""The embedded reference model build path (at tiny size) and the embedded corpus."""

import json

import torch
from safetensors.torch import load_file

from adasvd_lightning import embedded_corpus_path, load_compressed, load_tokenizer
from adasvd_lightning.training.reference import TINY_REFERENCE, build_reference_model, reference_model_path


def test_embedded_corpus_is_shipped_with_attribution():
    train, test = embedded_corpus_path("train"), embedded_corpus_path("test")
    assert train.stat().st_size > 1_000_000 and test.stat().st_size > 1_000_000
    assert "CC BY-SA" in (train.parent / "README.md").read_text()


def test_reference_folder_is_a_standard_hf_model(tiny_reference):
    files = {p.name for p in tiny_reference.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    config = json.loads((tiny_reference / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    model = load_compressed(tiny_reference)
    tokenizer = load_tokenizer(tiny_reference)
    ids = tokenizer("The game was released in Japan .", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "The game was released in Japan ."
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_reference_is_cached_and_deterministic(tiny_reference, tmp_path):
    assert reference_model_path(TINY_REFERENCE) == tiny_reference  # cache hit, no retraining
    rebuilt = build_reference_model(TINY_REFERENCE, tmp_path / "again", show_progress=False)
    a = load_file(str(tiny_reference / "model.safetensors"))
    b = load_file(str(rebuilt / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_lowered_the_loss(tiny_reference):
    from adasvd_lightning import evaluate_perplexity, tokenize_text
    from adasvd_lightning.core.corpus import read_text

    tokenizer = load_tokenizer(tiny_reference)
    tokens = tokenize_text(tokenizer, read_text(embedded_corpus_path("test")))
    ppl = evaluate_perplexity(load_compressed(tiny_reference), tokens, seq_len=64, max_windows=30).perplexity
    assert ppl < 0.5 * len(tokenizer)  # better than a uniform guess after 20 steps


def _train_blocks(tmp_path, max_steps, *, ckpt_path=None, crash_at=None):
    """A tiny model trained on 12 blocks (6 batches per epoch), checkpointing every 4 steps."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from adasvd_lightning.core.blocks import ResumableShuffleLoader, TokenBlocks
    from adasvd_lightning.training.module import CausalLMModule
    from conftest import tiny_model

    class Crash(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == crash_at:
                raise RuntimeError("simulated crash")

    L.seed_everything(0, verbose=False)
    blocks = TokenBlocks(torch.randint(0, 128, (12 * 16,), generator=torch.Generator().manual_seed(3)), 16)
    module = CausalLMModule(tiny_model("llama").train(), learning_rate=1e-2, warmup_steps=1)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="last", every_n_train_steps=4,
                                                   save_top_k=1, enable_version_counter=False), Crash()])
    loader = ResumableShuffleLoader(blocks, batch_size=2, seed=5, steps=lambda: trainer.global_step)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path, weights_only=True)
    return module.model.state_dict()


def test_training_resumed_mid_epoch_matches_an_uninterrupted_run(tmp_path):
    # 15 steps = 2.5 epochs of 6 batches; the crash comes at step 10, mid-way through the second
    # epoch, after the checkpoint of step 8: resuming must redraw epoch 2's order and skip 2 batches.
    import pytest

    straight = _train_blocks(tmp_path / "a", 15)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train_blocks(tmp_path / "b", 15, crash_at=10)
    checkpoint = tmp_path / "b" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 8
    resumed = _train_blocks(tmp_path / "c", 15, ckpt_path=checkpoint)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# `adasvd reference` with the tiny spec as the default one, in a child process that can be interrupted.
_CHILD = """
import sys
from adasvd_lightning.display import quiet_libraries
quiet_libraries()  # what `main` does first; here it must precede the import of the reference module
from adasvd_lightning.training import reference
reference.DEFAULT_REFERENCE = reference.TINY_REFERENCE
from adasvd_lightning.cli import main
sys.exit(main(["reference"]))
"""


def test_ctrl_c_during_the_build_then_resume_gives_the_same_weights(tiny_reference, tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys

    from adasvd_lightning.training.reference import checkpoint_dir

    env = {**os.environ, "ADASVD_CACHE": str(tmp_path), "ADASVD_PROGRESS_INTERVAL": "0",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as the fixture's in-process build
    child = [sys.executable, "-c", _CHILD]
    proc = subprocess.Popen(child, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:  # plain progress lines: stderr is not a terminal
        lines.append(line.rstrip())
        step = re.search(r"train reference model: (\d+)/(\d+) steps", line)
        if step and int(step.group(1)) >= 5:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130, "\n".join(lines) + rest
    assert rest.strip().splitlines()[-1] == "adasvd: interrupted" and "Traceback" not in rest
    folder = tmp_path / tiny_reference.name
    assert not folder.exists() and (checkpoint_dir(folder) / "build.ckpt").is_file()

    resumed = subprocess.run(child, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    at = int(re.search(r"resumed the reference build at step (\d+) of 20", resumed.stderr).group(1))
    assert 4 <= at < 20 and at % 2 == 0  # a checkpoint every 2 steps of the tiny spec's 20
    assert f"train reference model: {at + 1}/20 steps" in resumed.stderr
    assert resumed.stdout.strip() == str(folder) and not checkpoint_dir(folder).exists()
    # nothing but our own lines: no GPU/TPU notices, tips, DeepSpeed fallback warning or library bars
    assert all(line.startswith("[adasvd] ") for line in resumed.stderr.splitlines()), resumed.stderr
    a = load_file(str(tiny_reference / "model.safetensors"))
    b = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
