"""Lightning callbacks (installed as ``adasvd_lightning.callbacks``)."""

from .compression import SVDCompression

__all__ = ["SVDCompression"]
