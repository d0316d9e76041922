"""The embedded reference model: a small LLaMA-architecture LM trained on the shipped corpus.

Nothing can be downloaded from a model hub in our test and demo environments, so the project trains its
own model: a byte-level BPE tokenizer (`tokenizers`) and a `LlamaForCausalLM` built from a config,
trained with Lightning on the embedded WikiText-2 training split with a fixed seed. The result is a
standard Hugging Face folder (config, safetensors, tokenizer), so every other code path treats it
exactly like a user's local LLaMA/Qwen/Mistral folder.

Builds are cached under ``$ADASVD_CACHE`` (default ``~/.cache/adasvd-lightning``) in a folder whose name
hashes the spec and the corpus, so a changed spec never reuses a stale model; the folder appears
atomically when the build has finished. While it trains, the build checkpoints itself every few
minutes' worth of steps into ``<folder>.partial/``; an interrupted build resumes from there and ends
with the same weights as an uninterrupted one (the data order is restored too, see
`ResumableShuffleLoader`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..cache import cache_root
from ..core.blocks import block_loader
from ..core.corpus import embedded_corpus_path, read_text
from ..core.errors import InvalidInputError
from ..core.serialization import atomic_directory, check_model_folder
from ..display import quiet_lightning
from ..progress import ProgressDisplay, progress_display
from .module import CausalLMModule

__all__ = ["REFERENCE", "ReferenceSpec", "DEFAULT_REFERENCE", "TINY_REFERENCE", "cache_root", "checkpoint_dir",
           "reference_model_path", "resolve_model", "build_reference_model", "train_tokenizer"]

#: Model argument naming the embedded reference model.
REFERENCE = "reference"

_BUILD_VERSION = 1
_CHECKPOINT_NAME = "build"


@dataclass(frozen=True)
class ReferenceSpec:
    """Architecture and training schedule of the reference model (~0.8 M block parameters, ~6 min on 2 cores).

    Narrow and trained for many steps on purpose: a wider model trained for the same few minutes keeps
    most of what it learned in a handful of singular directions, so even plain SVD barely hurts it and
    it cannot tell compression methods apart. At this shape the block weights are used at full rank.
    """

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    seq_len: int = 256
    batch_size: int = 8
    max_steps: int = 2400
    learning_rate: float = 3e-3
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise InvalidInputError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
        if min(self.vocab_size, self.num_layers, self.max_steps, self.seq_len, self.batch_size) < 1:
            raise InvalidInputError("reference spec sizes must be positive")

    def fingerprint(self) -> str:
        corpus = hashlib.sha256(embedded_corpus_path("train").read_bytes()).hexdigest()
        payload = json.dumps({"spec": asdict(self), "corpus": corpus, "build": _BUILD_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


#: A seconds-scale spec for tests of the build path itself.
TINY_REFERENCE = ReferenceSpec(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
    seq_len=64, batch_size=8, max_steps=20, learning_rate=3e-3,
)


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE trained on ``text``, wrapped as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=eos, eos_token=eos, unk_token=None)


def _llama_config(spec: ReferenceSpec, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=max(2048, spec.seq_len),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )


class _BuildProgress(L.Callback):
    """Reports training steps (with the loss) to the shared progress display."""

    def __init__(self, display: ProgressDisplay | None) -> None:
        self.display = display

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.display is not None and trainer.global_step > 0:
            self.display.note(f"resumed the reference build at step {trainer.global_step} of {trainer.max_steps}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.display is not None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.display.update("train reference model", trainer.global_step, trainer.max_steps,
                                f"loss {float(loss):.3f}", unit="steps")


def checkpoint_dir(out_dir: str | Path) -> Path:
    """Where the build of ``out_dir`` keeps its resume checkpoint while it trains."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial")


def _resume_checkpoint(folder: Path, display: ProgressDisplay | None) -> Path | None:
    """The build's last checkpoint, if there is one that loads; an unreadable one is discarded (said)."""
    path = folder / f"{_CHECKPOINT_NAME}.ckpt"
    if not path.is_file():
        return None
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or from an incompatible version: start over, and say so
        if display is not None:
            display.note(f"discarding unreadable build checkpoint {path} ({type(exc).__name__}); starting over")
        path.unlink()
        return None
    return path


def build_reference_model(spec: ReferenceSpec, out_dir: str | Path, *, show_progress: bool = True,
                          checkpoint_every: int | None = None) -> Path:
    """Train tokenizer and model from scratch (or resume an interrupted build) and save them atomically.

    ``checkpoint_every``: steps between resume checkpoints (default: an eighth of the run, at most 100
    steps — about 15 s of training on an idle 2-core machine).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from transformers import LlamaForCausalLM

    every = checkpoint_every or max(1, min(100, spec.max_steps // 8))
    partial = checkpoint_dir(out_dir)
    with progress_display(show_progress) as display:
        resume = _resume_checkpoint(partial, display)
        if display is not None and resume is None:
            usual = " (≈ 6 min on 2 free CPU cores, longer on a busy machine)" if spec == ReferenceSpec() else ""
            display.note(f"training the reference model once: {spec.max_steps} steps{usual}, then cached in "
                         f"{out_dir}. Interrupting is safe: it checkpoints every {every} steps and the next run "
                         "resumes.")
        L.seed_everything(spec.seed, verbose=False)
        tokenizer = train_tokenizer(read_text(embedded_corpus_path("train")), spec.vocab_size)
        model = LlamaForCausalLM(_llama_config(spec, tokenizer))
        module = CausalLMModule(model, learning_rate=spec.learning_rate, warmup_steps=max(1, spec.max_steps // 20))
        checkpoint = ModelCheckpoint(dirpath=partial, filename=_CHECKPOINT_NAME, every_n_train_steps=every,
                                     save_top_k=1, enable_version_counter=False)
        with quiet_lightning(), warnings.catch_warnings():  # from construction: it logs the devices found
            warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
            warnings.filterwarnings("ignore", message=r".*have no `val_dataloader`.*")  # none, on purpose
            trainer = L.Trainer(
                accelerator="cpu",
                devices=1,
                max_steps=spec.max_steps,
                deterministic=True,
                logger=False,
                default_root_dir=partial,
                callbacks=[checkpoint, _BuildProgress(display)],
                enable_progress_bar=False,  # `_BuildProgress` draws (Lightning's bar shows "Epoch 6/-2" here)
                enable_model_summary=False,
                gradient_clip_val=1.0,
                limit_val_batches=0,
            )
            loader = block_loader(tokenizer, embedded_corpus_path("train"), seq_len=spec.seq_len,
                                  batch_size=spec.batch_size, seed=spec.seed, steps=lambda: trainer.global_step)
            trainer.fit(module, train_dataloaders=loader, ckpt_path=resume, weights_only=True)
    model.eval()
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "reference_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    shutil.rmtree(partial, ignore_errors=True)
    return Path(out_dir)


#: The spec ``reference_model_path()`` builds when given none (the model ``adasvd`` commands use).
DEFAULT_REFERENCE = ReferenceSpec()


def reference_model_path(spec: ReferenceSpec | None = None, *, show_progress: bool = True) -> Path:
    """Folder of the reference model for ``spec``, training it first if it is not cached."""
    spec = spec or DEFAULT_REFERENCE
    path = cache_root() / f"reference-{spec.fingerprint()}"
    if (path / "config.json").is_file():
        return path
    try:
        return build_reference_model(spec, path, show_progress=show_progress)
    except InvalidInputError:
        if (path / "config.json").is_file():  # another process finished the same build first
            return path
        raise


def resolve_model(value: str | Path | None, *, show_progress: bool = True) -> Path:
    """A model folder path; ``None``/``"reference"`` means the embedded reference model (trained once).

    Lives with the reference build (the Lightning layer): `workflows` takes folders only, so the
    layers below never reach up to train a model.
    """
    if value is None or str(value) == REFERENCE:
        return reference_model_path(show_progress=show_progress)
    path = Path(value).expanduser()
    check_model_folder(path)
    return path
