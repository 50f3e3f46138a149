"""HEAR 2021 API for a no-learning log-mel baseline, the reference point every learned model must beat.

Like HEAR's naive baseline, but on our front end's log-mel (`LogMelFrontend.log_mel_any_length`: 80 bins,
10 ms hop, unnormalised, so absolute level is kept). Timestamp embeddings are the log-mel frames averaged
over each 40 ms step (4 frames), on exactly the timestamp grid of the msm-lightning models
(`msm_lightning.hear.grid`: one timestamp per step centred within the clip, at `40 t + 15` ms). The scene
embedding is the mean and the standard deviation over time of all the clip's log-mel frames (160 dims).
Nothing is learned and `load_model()` takes no file.
"""

from __future__ import annotations

from typing import Any

import torch

from msm_lightning.hear.base import HearModule, hear_functions
from msm_lightning.hear.grid import pool_frames
from msm_lightning.model.frontend import LogMelFrontend

__all__ = ["LogMelBaseline", "get_scene_embeddings", "get_timestamp_embeddings", "load_model"]


class LogMelBaseline(HearModule):
    """Log-mel frames pooled to the 40 ms grid (timestamps) and their mean and std over time (scene)."""

    def __init__(self) -> None:
        super().__init__()
        self.frontend = LogMelFrontend()
        self.sample_rate = int(self.frontend.sample_rate)
        self.hop_length = int(self.frontend.hop_length)
        self.n_mels = int(self.frontend.n_mels)
        self.timestamp_embedding_size = self.n_mels
        self.scene_embedding_size = 2 * self.n_mels
        self.config: dict[str, Any] = {"baseline": "logmel", "n_mels": self.n_mels}

    def embed_timestamps(self, audio: torch.Tensor) -> torch.Tensor:
        """Float32 audio [n, samples] -> log-mel averaged per 40 ms step [n, steps, n_mels]."""
        return pool_frames(self.frontend.log_mel_any_length(audio), self.frames_per_step)

    def embed_scene(self, audio: torch.Tensor) -> torch.Tensor:
        """Float32 audio [n, samples] -> [n, 2 * n_mels]: log-mel mean then std over time."""
        # Population std (correction=0): a one-frame clip gets 0 rather than NaN.
        std, mean = torch.std_mean(self.frontend.log_mel_any_length(audio), dim=1, correction=0)
        return torch.cat([mean, std], dim=1)


def _load(model_file_path: str = "", **kwargs: Any) -> LogMelBaseline:
    """The log-mel baseline; it has no weights, so `model_file_path` must be empty."""
    if model_file_path:
        raise ValueError(f"the log-mel baseline learns nothing and loads no file, got '{model_file_path}'")
    if kwargs:
        raise TypeError(f"the log-mel baseline takes no options, got {sorted(kwargs)}")
    return LogMelBaseline()


load_model, get_scene_embeddings, get_timestamp_embeddings = hear_functions(__name__, LogMelBaseline, _load)
