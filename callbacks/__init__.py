"""Lightning callbacks (installed as ``adasvd_lightning.callbacks``)."""
