"""HEAR 2021 API for SSAM (Mamba encoder) models, e.g. `heareval.embeddings.runner hear_modules.ssam`."""

from msm_lightning.hear.encoder import family_functions

__all__ = ["get_scene_embeddings", "get_timestamp_embeddings", "load_model"]

load_model, get_scene_embeddings, get_timestamp_embeddings = family_functions("mamba")
