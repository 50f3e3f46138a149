"""Encoder families behind one contract: tokens [batch, seq, d_model] in, tokens out (after a final norm)."""

from __future__ import annotations

import importlib

from torch import nn

# Family name -> "module:Class"; imported lazily so one family's dependencies never block another.
ENCODERS: dict[str, str] = {
    "transformer": "msm_lightning.encoders.transformer:TransformerEncoder",
    "mamba": "msm_lightning.encoders.mamba:MambaEncoder",
    "xlstm": "msm_lightning.encoders.xlstm:XLSTMEncoder",
}


def build_encoder(family: str, d_model: int, depth: int, max_tokens: int, **kwargs: object) -> nn.Module:
    """Instantiate the encoder of `family` with family-specific keyword arguments."""
    if family not in ENCODERS:
        raise ValueError(f"unknown encoder family {family!r}; choose one of {sorted(ENCODERS)}")
    module_name, class_name = ENCODERS[family].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(d_model=d_model, depth=depth, max_tokens=max_tokens, **kwargs)
