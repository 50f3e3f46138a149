"""HEAR 2021 API for SSAST (Transformer) models, e.g. `heareval.embeddings.runner hear_modules.ssast`."""

from msm_lightning.hear.encoder import family_functions

__all__ = ["get_scene_embeddings", "get_timestamp_embeddings", "load_model"]

load_model, get_scene_embeddings, get_timestamp_embeddings = family_functions("transformer")
