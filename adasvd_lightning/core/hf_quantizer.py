"""The ``adasvd`` quantization config and quantizer registered with transformers.

transformers' quantizer hook is the one public place where a loader may change a model's modules
after the architecture is built on the meta device and before the checkpoint is streamed in. That
is all a compressed folder needs: the manifest names each factorized module with its shape and rank,
the quantizer puts an empty `LowRankLinear` / `ColumnPreservingLinear` there, and transformers then
loads ``…q_proj.up`` / ``…q_proj.down`` like any other parameter. Nothing is quantized in the
numerical sense; the weights keep their dtype.

Imported lazily by `hf_format` (this module imports transformers' model machinery).
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .hf_format import QUANT_METHOD

__all__ = ["AdaSVDQuantizationConfig", "AdaSVDHfQuantizer"]


class AdaSVDQuantizationConfig(QuantizationConfigMixin):
    """The manifest of a compressed model as transformers' ``quantization_config``.

    ``modules`` maps module names to their factorization (kind, shapes, rank, kept columns);
    ``base_model_type`` is the architecture the factorized layers live in. Other keys (the method,
    where the model was exported from, …) are provenance and round-trip unchanged.
    """

    def __init__(self, modules: dict | None = None, base_model_type: str | None = None,
                 format_version: int | None = None, **metadata: Any) -> None:
        metadata.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.base_model_type = base_model_type
        self.format_version = format_version
        self.modules = dict(modules or {})
        self.metadata = metadata

    def manifest(self) -> dict:
        """The manifest in the form `serialization.apply_manifest` reads."""
        return {"format_version": self.format_version, **self.metadata, "modules": self.modules}

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "base_model_type": self.base_model_type, **self.manifest()}


class AdaSVDHfQuantizer(HfQuantizer):
    """Gives the meta-device model the factorized structure the manifest describes."""

    # The factors come from a compression run, never from loading a dense checkpoint with this config.
    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        from .serialization import apply_manifest

        apply_manifest(model, self.quantization_config.manifest())
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # transformers marks the model quantized, which forbids `.half()` / `.float()` and fine-tuning
        # without adapters. Factorized weights are ordinary float parameters, so lift that; the
        # quantizer stays attached so that `save_pretrained` writes the manifest.
        model.is_quantized = False
        return model

    def get_state_dict_and_metadata(self, model):
        """Refresh the manifest from the live modules, so ``save_pretrained`` after re-compression is right."""
        from .serialization import build_manifest

        fresh = build_manifest(model)
        self.quantization_config.modules = fresh["modules"]
        self.quantization_config.format_version = fresh["format_version"]
        return None, {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return False
