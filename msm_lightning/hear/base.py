"""What every HEAR 2021 module here shares: input checks, the timestamp grid, devices and the API functions.

A module's model subclasses `HearModule` and implements only the embedding computation, `embed_timestamps`
(and `embed_scene` when its scene embedding is not the mean over time); `hear_functions` then makes the
module's `load_model`, `get_scene_embeddings` and `get_timestamp_embeddings`.

Input policy. `audio` must be a torch.Tensor `[n_sounds, n_samples]` at the model's sample rate with
n_samples >= 1 and only finite values. Any floating dtype is accepted and converted to float32 (float64 is
what numpy gives by default, and converting loses nothing that matters for audio); integer, bool and complex
tensors are refused, because integer PCM has no agreed scale. Outputs are float32 on the input's device;
the computation runs on the model's device (audio is moved there and results moved back), so moving the
model to a GPU is all it takes to use one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn

from msm_lightning.hear.grid import (
    FRAMES_PER_STEP,
    HOP_LENGTH,
    SAMPLE_RATE,
    grid_n_timestamps,
    grid_timestamps,
)


def check_audio(audio: Any) -> torch.Tensor:
    """Validate HEAR input audio and return it as float32; raises ValueError saying what is wrong."""
    if not isinstance(audio, torch.Tensor):
        raise ValueError(f"audio must be a torch.Tensor [n_sounds, n_samples], got {type(audio).__name__}")
    if not audio.is_floating_point():
        raise ValueError(
            f"audio must be floating point (float32 samples in [-1, 1]), got dtype {audio.dtype}; "
            "convert integer PCM yourself, e.g. int16 / 32768"
        )
    if audio.dim() != 2:
        raise ValueError(
            f"audio must have shape [n_sounds, n_samples], got shape {tuple(audio.shape)}"
            + ("; use audio[None] for a single sound" if audio.dim() == 1 else "")
        )
    if audio.shape[1] == 0:
        raise ValueError("audio has zero samples per sound; HEAR clips need at least one sample")
    # Checked after the conversion: float64 samples beyond float32's range become infinite there.
    audio = audio.float()
    finite = torch.isfinite(audio).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(
            f"audio contains NaN or infinite samples (sounds {bad[:10]}); samples beyond float32's range "
            "count as infinite"
        )
    return audio


class HearModule(nn.Module):
    """A HEAR model: checked input, timestamps on the 40 ms grid, no gradients, float32 on the input's device.

    Subclasses set `timestamp_embedding_size` and `scene_embedding_size` (ints) and implement
    `embed_timestamps`; the grid's constants are class attributes a subclass may override.
    """

    sample_rate: int = SAMPLE_RATE
    hop_length: int = HOP_LENGTH
    frames_per_step: int = FRAMES_PER_STEP
    timestamp_embedding_size: int
    scene_embedding_size: int

    @property
    def device(self) -> torch.device:
        """Device of the model's weights (or buffers, for models without weights)."""
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        return torch.device("cpu") if tensor is None else tensor.device

    def n_timestamps(self, n_samples: int) -> int:
        """Timestamps (and timestamp embeddings) of a clip of `n_samples`."""
        return grid_n_timestamps(n_samples, self.hop_length, self.frames_per_step)

    def timestamps(self, n_samples: int) -> torch.Tensor:
        """Timestamps [n_timestamps] in ms (float32) of a clip of `n_samples`."""
        return grid_timestamps(n_samples, self.sample_rate, self.hop_length, self.frames_per_step)

    def embed_timestamps(self, audio: torch.Tensor) -> torch.Tensor:
        """Float32 audio [n, samples] on the model's device -> [n, S, D], step `t` at position `t`.

        S may exceed the clip's timestamps (steps past its end are dropped), never fall short of them.
        """
        raise NotImplementedError

    def embed_scene(self, audio: torch.Tensor) -> torch.Tensor:
        """Float32 audio [n, samples] on the model's device -> [n, D]; by default the mean over timestamps."""
        return self.grid_embeddings(audio).mean(dim=1)

    def grid_embeddings(self, audio: torch.Tensor) -> torch.Tensor:
        """Float32 audio [n, samples] on the model's device -> [n, T, D], one per timestamp."""
        emb = self.embed_timestamps(audio)
        n_stamps = self.n_timestamps(audio.shape[1])
        if emb.shape[1] < n_stamps:
            raise RuntimeError(
                f"{type(self).__name__}.embed_timestamps gave {emb.shape[1]} steps for {audio.shape[1]} "
                f"samples; the timestamp grid needs {n_stamps}"
            )
        return emb[:, :n_stamps]

    def timestamp_embeddings(self, audio: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio [n_sounds, n_samples] -> (embeddings [n, T, D], timestamps [n, T] in ms), float32."""
        audio = check_audio(audio)
        n_sounds, n_samples = audio.shape
        stamps = self.timestamps(n_samples).to(audio.device).expand(n_sounds, -1).contiguous()
        if n_sounds == 0:
            return audio.new_zeros(0, stamps.shape[1], self.timestamp_embedding_size), stamps
        with torch.no_grad():
            emb = self.grid_embeddings(audio.to(self.device))
        return emb.float().to(audio.device), stamps

    def scene_embeddings(self, audio: Any) -> torch.Tensor:
        """Audio [n_sounds, n_samples] -> scene embeddings [n_sounds, D], float32."""
        audio = check_audio(audio)
        if audio.shape[0] == 0:
            return audio.new_zeros(0, self.scene_embedding_size)
        with torch.no_grad():
            emb = self.embed_scene(audio.to(self.device))
        return emb.float().to(audio.device)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Scene embeddings of a batch of audio (HEAR code calls the module functions instead)."""
        return self.scene_embeddings(audio)


M = TypeVar("M", bound=HearModule)


class HearFunctions(NamedTuple):
    """A HEAR module's three API functions, in the order a module unpacks them."""

    load_model: Callable[..., HearModule]
    get_scene_embeddings: Callable[[torch.Tensor, Any], torch.Tensor]
    get_timestamp_embeddings: Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]


def hear_functions(module_name: str, model_type: type[M], load: Callable[..., M]) -> HearFunctions:
    """`load_model` (`load`, in eval mode) and the two embedding functions, which take only `model_type`."""

    def as_model(model: Any) -> M:
        if not isinstance(model, model_type):
            raise ValueError(
                f"model must come from {module_name}.load_model (a {model_type.__name__}), "
                f"got {type(model).__name__}"
            )
        return model

    def load_model(model_file_path: str = "", **options: Any) -> M:
        return load(model_file_path, **options).eval()

    def get_timestamp_embeddings(audio: torch.Tensor, model: M) -> tuple[torch.Tensor, torch.Tensor]:
        """HEAR: (embeddings [n_sounds, T, D], timestamps [n_sounds, T] in ms), on the 40 ms grid."""
        return as_model(model).timestamp_embeddings(audio)

    def get_scene_embeddings(audio: torch.Tensor, model: M) -> torch.Tensor:
        """HEAR: one embedding [n_sounds, D] per clip."""
        return as_model(model).scene_embeddings(audio)

    # The loader's documentation and signature (through __wrapped__) are what help() and inspect show.
    load_model.__doc__ = load.__doc__
    load_model.__wrapped__ = load  # type: ignore[attr-defined]
    functions = HearFunctions(load_model, get_scene_embeddings, get_timestamp_embeddings)
    for function in functions:
        function.__module__ = module_name
        function.__qualname__ = function.__name__
    return functions
