"""HEAR 2021 API for SSAM (Mamba encoder) models, e.g. `heareval.embeddings.runner hear_modules.ssam`."""

from __future__ import annotations

from typing import Any

from msm_lightning.hear import encoder as hear
from msm_lightning.hear.encoder import HearModel, get_scene_embeddings, get_timestamp_embeddings

__all__ = ["get_scene_embeddings", "get_timestamp_embeddings", "load_model"]


def load_model(model_file_path: str = "", **kwargs: Any) -> HearModel:
    """SSAM model from an `msm export` bundle or Lightning checkpoint; random Tiny weights without one."""
    return hear.load_model(model_file_path, family="mamba", **kwargs)
