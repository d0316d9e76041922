"""Lightning callbacks (installed as ``adasvd_lightning.callbacks``)."""

from .compression import POINTS, SVDCompression
from .trainable import TRAINABLE_MODES, TrainableParameters

__all__ = ["POINTS", "SVDCompression", "TRAINABLE_MODES", "TrainableParameters"]
