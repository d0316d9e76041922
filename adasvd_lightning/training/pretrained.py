"""`PretrainedCausalLMModule`: `CausalLMModule` over a model folder named by path (or ``reference``).

Separate from `module.py` because it resolves ``reference`` through the reference build, which itself
trains a `CausalLMModule`: the build sits between the two.
"""

from __future__ import annotations

import torch

from ..core.errors import InvalidInputError
from ..core.serialization import load_compressed
from .module import CausalLMModule
from .reference import resolve_model

__all__ = ["PretrainedCausalLMModule"]


class PretrainedCausalLMModule(CausalLMModule):
    """`CausalLMModule` built from a model folder, so a YAML recipe can name the model by path.

    Args:
        model_path: a Hugging Face causal-LM folder (dense or written by ``save_compressed``), or
            ``"reference"`` for the embedded reference model (trained once, then cached).
        dtype: weight dtype: ``auto`` (as saved), ``float32``, ``bfloat16`` or ``float16``.
        learning_rate / weight_decay / warmup_steps / betas: as `CausalLMModule`.

    The weights are read with safetensors and never run remote code (``trust_remote_code`` stays off).
    """

    def __init__(
        self,
        model_path: str = "reference",
        *,
        dtype: str = "auto",
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        betas: tuple[float, float] = (0.9, 0.95),
    ) -> None:
        dtypes = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise InvalidInputError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
        path = resolve_model(model_path)
        # load_compressed returns an eval-mode model; Lightning switches modes per loop from train mode.
        model = load_compressed(path, dtype=dtypes[dtype]).train()
        super().__init__(model, learning_rate=learning_rate, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, betas=betas)
        self.model_path = str(path)
        self.save_hyperparameters()
