"""The family registry: one entry per encoder family, and the nine size presets built from it.

Adding a family is one `Family` entry here plus its encoder module (tokens in, tokens out) and a
three-line `hear_modules/<name>.py`; everything else (presets, configs' `model.family`, bundles, HEAR
loading, the pipelines, the registry-driven tests) reads this table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

WIDTHS = {"tiny": 192, "small": 384, "base": 768}
DEPTH = 12


@dataclass(frozen=True)
class Family:
    """One encoder family: its names, its encoder class and its paper defaults."""

    name: str  # the config name (`model.family`)
    paper_name: str  # the paper's model name, used in reports and HEAR messages
    encoder: str  # "module:Class"; imported lazily so one family's dependencies never block another
    hear_module: str  # the `hear_modules.*` module that loads this family's bundles
    defaults: Callable[[int], dict[str, Any]]  # encoder keyword arguments of the paper model at a width

    def encoder_class(self) -> type[nn.Module]:
        """The encoder class (imported on first use)."""
        module_name, class_name = self.encoder.split(":")
        return getattr(importlib.import_module(module_name), class_name)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="transformer",
            paper_name="SSAST",
            encoder="msm_lightning.model.encoders.transformer:TransformerEncoder",
            hear_module="hear_modules.ssast",
            defaults=lambda d: {"num_heads": d // 64, "mlp_ratio": 4.0},  # 3 / 6 / 12 heads
        ),
        Family(
            name="mamba",
            paper_name="SSAM",
            encoder="msm_lightning.model.encoders.mamba:MambaEncoder",
            hear_module="hear_modules.ssam",
            defaults=lambda d: {"d_state": 24, "d_conv": 4, "expand": 3},
        ),
        Family(
            name="xlstm",
            paper_name="AxLSTM",
            encoder="msm_lightning.model.encoders.xlstm:XLSTMEncoder",
            hear_module="hear_modules.axlstm",
            # The paper's best AxLSTM setting: expansion factor 3, no flip.
            defaults=lambda d: {"proj_factor": 3.0, "num_heads": 4, "flip": False},
        ),
    )
}


def get_family(name: str) -> Family:
    """The registry entry of `name`, or a ValueError listing the known families."""
    if name not in FAMILIES:
        raise ValueError(f"unknown encoder family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def build_encoder(family: str, d_model: int, depth: int, max_tokens: int, **kwargs: Any) -> nn.Module:
    """Instantiate the encoder of `family` with family-specific keyword arguments."""
    return get_family(family).encoder_class()(d_model=d_model, depth=depth, max_tokens=max_tokens, **kwargs)


def preset(family: str, size: str) -> dict[str, Any]:
    """Constructor arguments of `MaskedSpectrogramModel` for a named preset such as ('mamba', 'tiny')."""
    entry = get_family(family)
    if size not in WIDTHS:
        raise ValueError(f"unknown model size {size!r}; choose one of {list(WIDTHS)}")
    d_model = WIDTHS[size]
    return {"family": family, "d_model": d_model, "depth": DEPTH, "encoder_kwargs": entry.defaults(d_model)}


def preset_names() -> list[str]:
    """All preset names, `{family}_{size}`."""
    return [f"{family}_{size}" for family in FAMILIES for size in WIDTHS]
