"""The nine model presets (SPEC section 3): family x size -> constructor arguments."""

from __future__ import annotations

from typing import Any

WIDTHS = {"tiny": 192, "small": 384, "base": 768}
DEPTH = 12

# Paper model name per family, as used by the HEAR modules and reports.
PAPER_NAMES = {"transformer": "SSAST", "mamba": "SSAM", "xlstm": "AxLSTM"}


def family_defaults(family: str, d_model: int) -> dict[str, Any]:
    """Family-specific encoder arguments of the paper models at width `d_model`."""
    if family == "transformer":
        return {"num_heads": d_model // 64, "mlp_ratio": 4.0}  # 3 / 6 / 12 heads
    if family == "mamba":
        return {"d_state": 24, "d_conv": 4, "expand": 3}
    if family == "xlstm":
        return {"proj_factor": 3.0, "num_heads": 4, "flip": False}  # the paper's best AxLSTM setting
    raise ValueError(f"unknown encoder family {family!r}; choose one of {sorted(PAPER_NAMES)}")


def preset(family: str, size: str) -> dict[str, Any]:
    """Constructor arguments of `MaskedSpectrogramModel` for a named preset such as ('mamba', 'tiny')."""
    if size not in WIDTHS:
        raise ValueError(f"unknown model size {size!r}; choose one of {list(WIDTHS)}")
    d_model = WIDTHS[size]
    return {
        "family": family,
        "d_model": d_model,
        "depth": DEPTH,
        "encoder_kwargs": family_defaults(family, d_model),
    }


def preset_names() -> list[str]:
    """All preset names, `{family}_{size}`."""
    return [f"{family}_{size}" for family in PAPER_NAMES for size in WIDTHS]
