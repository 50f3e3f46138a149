"""HEAR 2021 API for a no-learning log-mel baseline, the reference point every learned model must beat.

Like HEAR's naive baseline, but on the SPEC log-mel (`LogMelFrontend().log_mel`: 80 bins, 10 ms hop,
unnormalised, so absolute level is kept). Timestamp embeddings are the log-mel frames averaged over each
40 ms step (4 frames), on exactly the timestamp grid of the msm-lightning models (`msm_lightning.hear.encoder`):
a clip of `n` samples has `ceil((1 + n // 160) / 4)` timestamps at `40 t + 15` ms, the last clipped to the
clip's duration. The scene embedding is the mean and the standard deviation over time of the log-mel
frames (160 dims). Nothing is learned and `load_model()` takes no file.

The grid helpers here (`grid_timestamps`, `pool_frames`) are shared with the pretrained peer models in
`hear_modules.peers`, so that every baseline is scored on the same timestamps as our models.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The 40 ms grid lives with the model wrapper; re-exported here for the peers built on this baseline.
from msm_lightning.hear.encoder import (
    FRAMES_PER_STEP,
    HOP_LENGTH,
    SAMPLE_RATE,
    check_audio,
    grid_n_frames,
    grid_n_timestamps,
    grid_timestamps,
)
from msm_lightning.model.frontend import LogMelFrontend

__all__ = [
    "FRAMES_PER_STEP",
    "HOP_LENGTH",
    "SAMPLE_RATE",
    "LogMelBaseline",
    "get_scene_embeddings",
    "get_timestamp_embeddings",
    "grid_n_frames",
    "grid_n_timestamps",
    "grid_timestamps",
    "load_model",
    "pool_frames",
]


def pool_frames(frames: torch.Tensor, frames_per_step: int = FRAMES_PER_STEP) -> torch.Tensor:
    """Mean of each group of `frames_per_step` frames: [n, F, D] -> [n, ceil(F / frames_per_step), D]."""
    n, n_frames, dim = frames.shape
    steps = math.ceil(n_frames / frames_per_step)
    pad = steps * frames_per_step - n_frames
    # The last group may hold fewer real frames; it is averaged over those only, not over padding.
    sums = F.pad(frames, (0, 0, 0, pad)).reshape(n, steps, frames_per_step, dim).sum(dim=2)
    counts = torch.full((steps,), float(frames_per_step), dtype=frames.dtype, device=frames.device)
    counts[-1] = frames_per_step - pad
    return sums / counts[:, None]


def stamps_for(audio: torch.Tensor) -> torch.Tensor:
    """Timestamps [n_sounds, T] in ms for checked audio, on the audio's device."""
    n_sounds, n_samples = audio.shape
    return grid_timestamps(n_samples).to(audio.device).expand(n_sounds, -1).contiguous()


class LogMelBaseline(nn.Module):
    """Log-mel frames pooled to the 40 ms grid (timestamps) and their mean and std over time (scene)."""

    def __init__(self) -> None:
        super().__init__()
        self.frontend = LogMelFrontend()
        self.sample_rate = int(self.frontend.sample_rate)
        self.n_mels = int(self.frontend.n_mels)
        self.timestamp_embedding_size = self.n_mels
        self.scene_embedding_size = 2 * self.n_mels
        self.config: dict[str, Any] = {"baseline": "logmel", "n_mels": self.n_mels}

    @property
    def device(self) -> torch.device:
        """Device of the mel filterbank (the model has buffers, no parameters)."""
        return next(self.buffers()).device

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-mel [n_sounds, n_frames, n_mels] of float32 audio on the model's device."""
        n_samples = audio.shape[1]
        # As HearModel.spectrogram (msm_lightning/hear.py): the centred STFT reflect-pads n_fft // 2
        # samples, which needs a longer input, so very short clips are zero-padded for the transform
        # only and just their own frames are kept.
        min_samples = self.frontend.melspec.n_fft // 2 + 1
        if n_samples < min_samples:
            audio = F.pad(audio, (0, min_samples - n_samples))
        return self.frontend.log_mel(audio)[:, : grid_n_frames(n_samples, self.frontend.hop_length)]

    def timestamp_embeddings(self, audio: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio [n_sounds, n_samples] -> (embeddings [n, T, n_mels], timestamps [n, T] ms), float32."""
        audio = check_audio(audio)
        stamps = stamps_for(audio)
        if audio.shape[0] == 0:
            return audio.new_zeros(0, stamps.shape[1], self.timestamp_embedding_size), stamps
        with torch.no_grad():
            emb = pool_frames(self.log_mel(audio.to(self.device)))
        return emb.to(audio.device), stamps

    def scene_embeddings(self, audio: Any) -> torch.Tensor:
        """Audio [n_sounds, n_samples] -> [n_sounds, 2 * n_mels]: log-mel mean then std over time."""
        audio = check_audio(audio)
        if audio.shape[0] == 0:
            return audio.new_zeros(0, self.scene_embedding_size)
        with torch.no_grad():
            spec = self.log_mel(audio.to(self.device))
            # Population std (correction=0): a one-frame clip gets 0 rather than NaN.
            std, mean = torch.std_mean(spec, dim=1, correction=0)
        return torch.cat([mean, std], dim=1).to(audio.device)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Scene embeddings of a batch of audio (HEAR code calls the module functions instead)."""
        return self.scene_embeddings(audio)


def load_model(model_file_path: str = "", **kwargs: Any) -> LogMelBaseline:
    """The log-mel baseline; it has no weights, so `model_file_path` must be empty."""
    if model_file_path:
        raise ValueError(f"the log-mel baseline learns nothing and loads no file, got '{model_file_path}'")
    if kwargs:
        raise TypeError(f"the log-mel baseline takes no options, got {sorted(kwargs)}")
    return LogMelBaseline().eval()


def _as_baseline(model: Any) -> LogMelBaseline:
    if not isinstance(model, LogMelBaseline):
        raise ValueError(f"model must come from hear_modules.logmel.load_model, got {type(model).__name__}")
    return model


def get_timestamp_embeddings(audio: torch.Tensor, model: LogMelBaseline) -> tuple[torch.Tensor, torch.Tensor]:
    """HEAR: (log-mel pooled to 40 ms [n_sounds, T, 80], timestamps [n_sounds, T] in ms)."""
    return _as_baseline(model).timestamp_embeddings(audio)


def get_scene_embeddings(audio: torch.Tensor, model: LogMelBaseline) -> torch.Tensor:
    """HEAR: log-mel mean and std over time [n_sounds, 160]."""
    return _as_baseline(model).scene_embeddings(audio)
