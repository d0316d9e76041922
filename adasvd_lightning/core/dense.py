"""Dense export of a compressed model folder, for tools that only take dense weights.

llama.cpp converters, serving stacks, anything that reads a plain Hugging Face folder: the factors are
multiplied back (`merging.densify`) and the result is saved as an ordinary folder of the base
architecture — model type ``llama`` (not ``adasvd_lightning``), no ``quantization_config``. It has the
compressed model's function (each dense matrix is the product the factorized layer applied), not its
size or speed.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InvalidInputError
from .lowrank import FactorizedLinear
from .merging import densify
from .output import check_destination

__all__ = ["export_dense"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def export_dense(folder: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a compressed model folder's dense equivalent to ``out`` (a plain Hugging Face folder).

    The tokenizer is copied when the folder has one. ``out`` is checked before the model is read and
    written atomically; ``overwrite`` replaces only a previous output of this project. Needs the dense
    model's memory (that is the point).
    """
    from .serialization import load_compressed, load_tokenizer, save_compressed

    folder = Path(folder).expanduser()
    check_destination(out, overwrite=overwrite, inputs=[folder])
    model = load_compressed(folder)
    if not any(isinstance(m, FactorizedLinear) for m in model.modules()):
        raise InvalidInputError(f"{folder} holds no factorized layers; it is already a dense model folder")
    densify(model)
    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = load_tokenizer(folder) if has_tokenizer else None
    return save_compressed(model, out, tokenizer=tokenizer, overwrite=overwrite, inputs=[folder])

