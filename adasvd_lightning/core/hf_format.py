"""How a compressed folder presents itself to the Hugging Face ecosystem.

A compressed model is a standard architecture (Llama, Qwen2, GPT-2, …) in which some linear layers
are factorized. Loaded by a tool that does not know that, the factor weights are "unexpected keys",
the dense weights "missing", and transformers fills them with random numbers and carries on — a
silently broken model. So a compressed folder's ``config.json`` says two things:

* ``"model_type": "adasvd_lightning"`` — a model type transformers (and vLLM, TGI, lm-eval, …) does
  not know. Without this package every Auto-class load stops at the config with transformers' own
  error, which names the model type and therefore the package: "The checkpoint you are trying to
  load has model type `adasvd_lightning` but Transformers does not recognize this architecture".
  transformers only *warns* about an unknown ``quant_method`` and then loads the random model, so
  the quantization config alone could not refuse loudly (checked against transformers 5.24,
  ``AutoHfQuantizer.supports_quant_method``).
* ``"quantization_config": {"quant_method": "adasvd", "base_model_type": "llama", "modules": …}`` —
  the manifest: which modules are factorized, with which rank and shape.

With the package imported the same folder opens through public extension points only:
``AutoConfig.register`` maps ``adasvd_lightning`` to a dispatcher that builds the base architecture's
config (as a subclass whose ``model_type`` keeps the marker, so ``save_pretrained`` writes a folder
that refuses loudly again); ``AutoModelForCausalLM.register`` maps that config to a subclass of the
base model class (only ``config_class`` differs); and ``register_quantization_config`` / ``register_quantizer`` install a quantizer that swaps in
empty factorized modules on the meta device before transformers streams the safetensors in. No
dense weight of a factorized layer is ever allocated, no code lives in the folder, nothing is
patched. One gap remains: an explicit class (``LlamaForCausalLM.from_pretrained(folder)``) bypasses
the model-type lookup, and transformers then only warns about the type mismatch — use the Auto
classes, as pipelines and evaluation harnesses do.

``import adasvd_lightning`` does not import transformers (seconds, and ``adasvd --help`` must stay
instant), so the config mapping is registered when transformers' ``configuration_auto`` module is
imported — by a one-shot post-import hook, or at once when transformers is already loaded. The
quantizer, which needs transformers' model machinery, registers the first time a compressed config is
read — always before transformers looks for the quantizer.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import json
import sys
from pathlib import Path
from typing import Any

from .errors import InvalidInputError

__all__ = [
    "MODEL_TYPE",
    "QUANT_METHOD",
    "register",
    "register_when_transformers_loads",
    "base_model_type",
    "manifest_of",
    "compressed_config_dict",
    "rewrite_config_file",
    "load_folder",
    "compressed_classes",
]

MODEL_TYPE = "adasvd_lightning"
QUANT_METHOD = "adasvd"
# The manifest's pre-transformers-integration location: a top-level "adasvd" key on a base config.
LEGACY_MANIFEST_KEY = "adasvd"


def register() -> None:
    """Teach transformers' AutoConfig the ``adasvd_lightning`` model type (idempotent, cheap)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, _dispatcher_class())


_AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"


def register_when_transformers_loads() -> None:
    """`register` now if transformers' AutoConfig module is loaded, else right after it is imported."""
    if _AUTO_CONFIG_MODULE in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds transformers' ``configuration_auto`` with the other finders and registers after it runs.

    One-shot: it removes itself from ``sys.meta_path`` on first use. Nothing of transformers is
    changed; the module executes exactly as it would, then `register` calls ``AutoConfig.register``.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO_CONFIG_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        register()


@functools.cache
def _dispatcher_class():
    """The class registered for ``adasvd_lightning``: it never instantiates itself, it builds the base's."""
    from transformers import PreTrainedConfig

    class AdaSVDCompressedConfig(PreTrainedConfig):
        """Reads a compressed folder's config as its base architecture's config (see module docstring)."""

        model_type = MODEL_TYPE

        @classmethod
        def from_dict(cls, config_dict: dict, **kwargs):
            base = _base_config_class(config_dict)
            config_class, _ = compressed_classes(base)
            return config_class.from_dict(config_dict, **kwargs)

    AdaSVDCompressedConfig.__module__ = __name__
    return AdaSVDCompressedConfig


def _base_config_class(config_dict: dict):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    quant = config_dict.get("quantization_config")
    quant = quant if isinstance(quant, dict) else {}
    base_type = quant.get("base_model_type")
    if quant.get("quant_method") != QUANT_METHOD or not base_type:
        raise InvalidInputError(
            f"config of model type {MODEL_TYPE!r} needs quantization_config with quant_method "
            f"{QUANT_METHOD!r} and base_model_type; got {quant!r:.200}"
        )
    if base_type == MODEL_TYPE or base_type not in CONFIG_MAPPING:
        raise InvalidInputError(f"compressed model's base_model_type {base_type!r} is unknown to this transformers")
    base = CONFIG_MAPPING[base_type]
    if base not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise InvalidInputError(f"compressed model's base_model_type {base_type!r} is not a causal language model")
    return base


@functools.cache
def compressed_classes(base_config_class: type) -> tuple[type, type]:
    """(config, model) classes of a compressed ``base_config_class`` model, registered with transformers.

    The config subclass differs from its base only in ``model_type`` (what ``save_pretrained`` writes);
    the model subclass only in ``config_class``, which ``AutoModelForCausalLM.register`` requires.
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    _register_quantizer()
    base_model_class = MODEL_FOR_CAUSAL_LM_MAPPING[base_config_class]
    config_class = type(f"AdaSVD{base_config_class.__name__}", (base_config_class,), {
        "model_type": MODEL_TYPE,
        "__module__": __name__,
        "__doc__": f"A {base_config_class.__name__} whose folder holds factorized layers (model_type {MODEL_TYPE!r}).",
    })
    model_class = type(f"AdaSVD{base_model_class.__name__}", (base_model_class,), {
        "config_class": config_class,
        "__module__": __name__,
        "__doc__": f"{base_model_class.__name__} loaded from a compressed folder (factorized layers).",
    })
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    return config_class, model_class


@functools.cache
def _register_quantizer() -> None:
    """Register the ``adasvd`` quantization config and quantizer (imports transformers' model code)."""
    from transformers.quantizers import register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from .hf_quantizer import AdaSVDHfQuantizer, AdaSVDQuantizationConfig

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(AdaSVDQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(AdaSVDHfQuantizer)


def load_folder(path: str | Path, *, device: Any = "cpu", dtype: Any = None):
    """Open a compressed folder with ``AutoModelForCausalLM.from_pretrained``, strictly.

    transformers builds the architecture on the meta device, the quantizer swaps in the factorized
    modules, and the safetensors are read straight into them: peak memory is about the folder's size,
    never the dense model's. Unlike a plain ``from_pretrained``, a folder whose weights do not match
    the manifest (an entry that does not fit the layer, a key missing or unexpected, a wrong shape) is
    refused before any weight is read, and NaN/Inf is refused after — each one `InvalidInputError`.
    transformers leaves the tensors mapped to the files; each is copied into process memory here (one
    at a time, so the peak stays about one folder), because a parameter still backed by the user's
    file would crash the process (SIGBUS) if that file were truncated or rewritten in place.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .serialization import _finite

    register()
    _check_weights_fit(Path(path))
    model, info = AutoModelForCausalLM.from_pretrained(
        Path(path), dtype=dtype or "auto", output_loading_info=True, trust_remote_code=False
    )
    problems = {kind: sorted(map(str, info.get(kind) or ()))[:5]
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:  # the check above makes this unreachable unless transformers changes its matching
        raise InvalidInputError(f"{path}: weights do not match the manifest: {problems}")
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not _finite(tensor):
                raise InvalidInputError(f"{path}: weight {name} holds NaN or infinite values")
            tensor.data = tensor.data.clone()
    return model.to(device=device).eval()


def _check_weights_fit(path: Path) -> None:
    """Compare the safetensors headers with the model the manifest describes, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from .serialization import _is_tied_alias, _weight_files, apply_manifest, check_model_folder, inspect_weights

    config = check_model_folder(path)
    found = {key: shape for key, (shape, _) in inspect_weights(_weight_files(path)).items()}
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    apply_manifest(skeleton, manifest_of(config))
    expected = {key: tuple(t.shape) for key, t in skeleton.state_dict().items()}
    for key, shape in found.items():
        if key in expected and shape != expected[key]:
            raise InvalidInputError(f"{path}: weight {key} has shape {shape}, the architecture expects {expected[key]}")
    unexpected = sorted(found.keys() - expected.keys())
    if unexpected:
        raise InvalidInputError(f"{path}: weights do not match the architecture, unexpected {unexpected[:5]}")
    missing = sorted(k for k in expected.keys() - found.keys() if not _is_tied_alias(skeleton, k, found))
    if missing:
        raise InvalidInputError(f"{path}: weights missing for {missing[:5]}")


def base_model_type(config: Any) -> str | None:
    """The architecture's model type: ``llama`` for a compressed Llama, whose own type is ours."""
    model_type = getattr(config, "model_type", None)
    if model_type != MODEL_TYPE:
        return model_type
    base = next((c for c in type(config).__mro__ if getattr(c, "model_type", MODEL_TYPE) != MODEL_TYPE), None)
    return base.model_type if base is not None else None


def manifest_of(config: Any) -> dict | None:
    """The factorization manifest a config carries, or None for a dense model.

    Reads ``quantization_config`` (this format) and the legacy top-level ``adasvd`` key, so folders
    written before the transformers integration still load with `load_compressed`.
    """
    quant = getattr(config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    if isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD:
        return {k: v for k, v in quant.items() if k not in ("quant_method", "base_model_type")}
    legacy = getattr(config, LEGACY_MANIFEST_KEY, None)
    return legacy or None


def compressed_config_dict(config_dict: dict, manifest: dict) -> dict:
    """``config_dict`` (as ``save_pretrained`` wrote it) in the compressed folder format.

    With factorized modules in ``manifest`` the model type becomes ``adasvd_lightning`` and the
    manifest moves into ``quantization_config``; without any, the config is the plain base config
    (a densified model is an ordinary Hugging Face folder again).
    """
    out = dict(config_dict)
    out.pop(LEGACY_MANIFEST_KEY, None)
    quant = out.get("quantization_config")
    ours = isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD
    base_type = quant["base_model_type"] if out.get("model_type") == MODEL_TYPE and ours else out["model_type"]
    if ours:
        del out["quantization_config"]
    out["model_type"] = base_type
    architectures = out.get("architectures") or []
    out["architectures"] = [a.removeprefix("AdaSVD") for a in architectures]
    if manifest.get("modules"):
        out["model_type"] = MODEL_TYPE
        out["quantization_config"] = {"quant_method": QUANT_METHOD, "base_model_type": base_type, **manifest}
    return out


def rewrite_config_file(path: str | Path, manifest: dict) -> None:
    """Rewrite a just-saved ``config.json`` into the compressed folder format (see above)."""
    path = Path(path)
    config_dict = json.loads(path.read_text())
    path.write_text(json.dumps(compressed_config_dict(config_dict, manifest), indent=2, sort_keys=True) + "\n")
