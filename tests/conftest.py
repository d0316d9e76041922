"""Shared fixtures: tiny random models of each family and a tiny trained reference folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_model(family: str, seed: int = 0):
    """A randomly initialised causal LM of ``family`` small enough for unit tests (~0.1 M params)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=128)
    if family == "llama":
        config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, **common)
        cls = tf.LlamaForCausalLM
    elif family == "mistral":
        config = tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=16, **common)
        cls = tf.MistralForCausalLM
    elif family == "qwen2":
        config = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, **common)
        cls = tf.Qwen2ForCausalLM
    elif family == "opt":
        config = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=64, max_position_embeddings=128, **common)
        cls = tf.OPTForCausalLM
    elif family == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0,
                               **common)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(family)
    return cls(config).eval()


FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt2")


# Fewer module-KL candidates than the preset's ten: the same code paths, a third of the probes.
FEW_CANDIDATES = {"sensitivity_candidates": [0.4, 0.7, 1.0]}


def compress_tiny(method: str, batches, **config):
    """(model, report) of the tiny Llama compressed at 40 % with ``method``, its warnings silenced. The
    module-KL presets probe 3 candidates instead of the preset's 10: the same code paths, fewer probes."""
    import warnings

    from adasvd_lightning import CompressionConfig, CompressionWarning, compress_model

    if method in ("duo-svd", "adasvd-duo"):
        config.setdefault("method_options", FEW_CANDIDATES)
    model = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressionWarning)
        report = compress_model(model, CompressionConfig(method=method, ratio=0.4, **config), batches)
    return model, report


def writer_token_weights(model, batches) -> dict[str, torch.Tensor]:
    """For a Llama-style model: each residual writer's per-token weight 1 / ms(dense residual after its
    addition) over ``batches`` (tokens × 1, float64) — o_proj: the post-attention norm's input,
    down_proj: the block's output — as the compensating refinements weight them (`core.residual`)."""
    from adasvd_lightning.core.residual import residual_weights

    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name, t):
        t = t[0] if isinstance(t, tuple) else t
        seen.setdefault(name, []).append(t.detach().reshape(-1, t.shape[-1]))

    handles = []
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, n=f"{prefix}.self_attn.o_proj": keep(n, a[0])))
        handles.append(layer.register_forward_hook(lambda m, a, o, n=f"{prefix}.mlp.down_proj": keep(n, o)))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for h in handles:
        h.remove()
    return {n: residual_weights(torch.cat(v)) for n, v in seen.items()}


@pytest.fixture
def token_batches():
    generator = torch.Generator().manual_seed(1)
    return list(torch.randint(0, 128, (8, 32), generator=generator).split(4))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adasvd-cache")
    os.environ["ADASVD_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_reference(cache_dir) -> Path:
    """A tiny reference model trained for a few steps (real tokenizer, real Lightning training)."""
    from adasvd_lightning.training.reference import TINY_REFERENCE, reference_model_path

    return reference_model_path(TINY_REFERENCE, show_progress=False)
