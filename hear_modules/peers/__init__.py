"""HEAR 2021 API over pretrained audio models from PyPI, as reference points for our encoders.

Each peer's weights ship inside its PyPI wheel, so nothing is downloaded at run time and the modules work
offline. They are an optional extra: `pip install 'msm-lightning[peers]'`. Every peer embeds on the same
40 ms timestamp grid as the msm-lightning models (see `hear_modules.logmel.grid_timestamps`).

- `hear_modules.peers.crepe`: CREPE pitch tracker (torchcrepe), penultimate layer.
- `hear_modules.peers.resemblyzer`: GE2E speaker encoder d-vectors (Resemblyzer).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from hear_modules.logmel import SAMPLE_RATE, stamps_for
from msm_lightning.hear.encoder import check_audio

INSTALL_HINT = "pip install 'msm-lightning[peers]'"


def missing_peer(package: str, cause: BaseException | None = None) -> ImportError:
    """The ImportError raised when a peer's package is not installed, saying how to install it."""
    error = ImportError(
        f"the '{package}' package is needed for this peer model; install it with: {INSTALL_HINT}"
    )
    error.__cause__ = cause
    return error


def import_peer(package: str) -> ModuleType:
    """Import a peer's package, or raise an ImportError naming the `peers` extra."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise missing_peer(package, exc) from exc


def peer_package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (its own imports may be broken)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise missing_peer(package)
    return Path(next(iter(spec.submodule_search_locations)))


class PeerModel(nn.Module):
    """HEAR plumbing shared by the peers: input checks, the 40 ms grid, devices, empty batches."""

    sample_rate: int = SAMPLE_RATE
    timestamp_embedding_size: int
    scene_embedding_size: int

    @property
    def device(self) -> torch.device:
        """Device of the model's weights."""
        return next(self.parameters()).device

    def embed_timestamps(self, audio: torch.Tensor) -> torch.Tensor:
        """Float32 audio [n, samples] on the model's device -> embeddings [n, T, D] on the 40 ms grid."""
        raise NotImplementedError

    def embed_scene(self, audio: torch.Tensor) -> torch.Tensor:
        """Float32 audio [n, samples] on the model's device -> [n, D]; by default the mean over time."""
        return self.embed_timestamps(audio).mean(dim=1)

    def timestamp_embeddings(self, audio: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio [n_sounds, n_samples] -> (embeddings [n, T, D], timestamps [n, T] ms), float32."""
        audio = check_audio(audio)
        stamps = stamps_for(audio)
        if audio.shape[0] == 0:
            return audio.new_zeros(0, stamps.shape[1], self.timestamp_embedding_size), stamps
        with torch.no_grad():
            emb = self.embed_timestamps(audio.to(self.device)).float()
        return emb.to(audio.device), stamps

    def scene_embeddings(self, audio: Any) -> torch.Tensor:
        """Audio [n_sounds, n_samples] -> scene embeddings [n_sounds, D], float32."""
        audio = check_audio(audio)
        if audio.shape[0] == 0:
            return audio.new_zeros(0, self.scene_embedding_size)
        with torch.no_grad():
            emb = self.embed_scene(audio.to(self.device)).float()
        return emb.to(audio.device)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Scene embeddings of a batch of audio (HEAR code calls the module functions instead)."""
        return self.scene_embeddings(audio)


def as_peer(model: Any, cls: type[PeerModel]) -> PeerModel:
    """`model` if it is a `cls` from the matching `load_model`, else a ValueError."""
    if not isinstance(model, cls):
        raise ValueError(
            f"model must come from this module's load_model (a {cls.__name__}), got {type(model).__name__}"
        )
    return model
