"""The model, in plain PyTorch (never imports Lightning): front end, patches, masking, families, bundles."""

from msm_lightning.model.frontend import LogMelFrontend
from msm_lightning.model.msm import MaskedSpectrogramModel

__all__ = ["LogMelFrontend", "MaskedSpectrogramModel"]
