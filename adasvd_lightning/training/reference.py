"""The embedded reference model: a small LLaMA-architecture LM trained on the shipped corpus.

Nothing can be downloaded from a model hub in our test and demo environments, so the project trains its
own model: a byte-level BPE tokenizer (`tokenizers`) and a `LlamaForCausalLM` built from a config,
trained with Lightning on the embedded WikiText-2 training split with a fixed seed. The result is a
standard Hugging Face folder (config, safetensors, tokenizer), so every other code path treats it
exactly like a user's local LLaMA/Qwen/Mistral folder.

Builds are cached under ``$ADASVD_CACHE`` (default ``~/.cache/adasvd-lightning``) in a folder whose name
hashes the spec and the corpus, so a changed spec never reuses a stale model; the folder appears
atomically when the build has finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L

from ..cache import cache_root
from ..core.corpus import block_loader, embedded_corpus_path, read_text
from ..core.errors import InvalidInputError
from ..core.serialization import atomic_directory, check_model_folder
from .module import CausalLMModule

__all__ = ["REFERENCE", "ReferenceSpec", "TINY_REFERENCE", "cache_root", "reference_model_path", "resolve_model",
           "build_reference_model", "train_tokenizer"]

#: Model argument naming the embedded reference model.
REFERENCE = "reference"

_BUILD_VERSION = 1


@dataclass(frozen=True)
class ReferenceSpec:
    """Architecture and training schedule of the reference model (~0.9 M block parameters, ~8 min on 2 cores).

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


def build_reference_model(spec: ReferenceSpec, out_dir: str | Path, *, show_progress: bool = True) -> Path:
    """Train tokenizer and model from scratch and save them atomically to ``out_dir``."""
    from transformers import LlamaForCausalLM

    L.seed_everything(spec.seed, verbose=False)
    tokenizer = train_tokenizer(read_text(embedded_corpus_path("train")), spec.vocab_size)
    model = LlamaForCausalLM(_llama_config(spec, tokenizer))
    loader = block_loader(tokenizer, embedded_corpus_path("train"), seq_len=spec.seq_len, batch_size=spec.batch_size,
                          seed=spec.seed)
    module = CausalLMModule(model, learning_rate=spec.learning_rate, warmup_steps=max(1, spec.max_steps // 20))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=spec.max_steps,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=show_progress,
        enable_model_summary=False,
        gradient_clip_val=1.0,
    )
    trainer.fit(module, train_dataloaders=loader)
    model.eval()
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "reference_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return Path(out_dir)


def reference_model_path(spec: ReferenceSpec | None = None, *, show_progress: bool = True) -> Path:
    """Folder of the reference model for ``spec``, training it first if it is not cached."""
    spec = spec or ReferenceSpec()
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
