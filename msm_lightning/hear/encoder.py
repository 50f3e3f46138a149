"""The HEAR 2021 API over msm-lightning models (SPEC section 5), shared by every `hear_modules.*` module.

Embedding recipe: log-mel of the whole clip, standardised per clip over all of its frames, split into
`crop_frames` (2 s) chunks with the last one zero-padded, each chunk encoded without masking (last layer,
after the final norm), the cls token dropped and the frequency patches of each patch time step
concatenated, so embedding `t` is patch time step `t` of the clip (true time order), then the chunks
are concatenated and the padding is trimmed.

Timestamps. With hop 160 and centred STFT frames, a clip of `n` samples has `1 + n // 160` frames,
frame `i` centred at `10 i` ms. Patch step `t` spans frames `4t .. 4t+3`, so it gets the centre of those
frames, `40 t + 15` ms, and a clip has `ceil(n_frames / 4)` timestamps at a regular 40 ms hop. The last
patch may extend past the end of the audio; its timestamp is then clipped to the clip's duration (it is
still 25 to 40 ms after the previous one), so no timestamp lies beyond the audio.

Input policy. `audio` must be a torch.Tensor `[n_sounds, n_samples]` at 16 kHz with n_samples >= 1 and
only finite values. Any floating dtype is accepted and converted to float32 (float64 is what numpy
gives by default, and converting loses nothing that matters for audio); integer, bool and complex
tensors are refused, because integer PCM has no agreed scale. Outputs are float32 on the input's device;
the computation runs on the model's device (audio is moved there and results moved back), so moving the
model to a GPU is all it takes to use one.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msm_lightning.model.families import FAMILIES, get_family
from msm_lightning.model.msm import MaskedSpectrogramModel

DEFAULT_CHUNK_BATCH = 16  # chunks encoded at once: bounds memory for minutes-long audio and big batches
RANDOM_WEIGHTS_SEED = 0  # random-weight models are seeded, so every process builds the same one


SAMPLE_RATE = 16000
HOP_LENGTH = 160  # 10 ms frames, as in the SPEC front end
FRAMES_PER_STEP = 4  # one timestamp per 4 frames = 40 ms, the patch time step of our models


def grid_n_frames(n_samples: int, hop_length: int = HOP_LENGTH) -> int:
    """Centred STFT frames of a clip of `n_samples`: frame `i` is centred on sample `i * hop_length`."""
    return 1 + n_samples // hop_length


def grid_n_timestamps(
    n_samples: int, hop_length: int = HOP_LENGTH, frames_per_step: int = FRAMES_PER_STEP
) -> int:
    """Timestamps of a clip of `n_samples`: one per group of `frames_per_step` frames holding real frames."""
    return math.ceil(grid_n_frames(n_samples, hop_length) / frames_per_step)


def grid_timestamps(
    n_samples: int,
    sample_rate: int = SAMPLE_RATE,
    hop_length: int = HOP_LENGTH,
    frames_per_step: int = FRAMES_PER_STEP,
) -> torch.Tensor:
    """Timestamps [T] in ms (float32): centre of each frame group, clipped to the clip's duration."""
    frame_ms = 1000.0 * hop_length / sample_rate
    steps = torch.arange(grid_n_timestamps(n_samples, hop_length, frames_per_step), dtype=torch.float64)
    centres = (steps * frames_per_step + (frames_per_step - 1) / 2) * frame_ms
    duration_ms = 1000.0 * n_samples / sample_rate
    return centres.clamp(max=duration_ms).float()


class HearModel(nn.Module):
    """A MaskedSpectrogramModel with the HEAR attributes and the chunked embedding computation."""

    def __init__(
        self,
        model: MaskedSpectrogramModel,
        chunk_batch: int = DEFAULT_CHUNK_BATCH,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if chunk_batch < 1:
            raise ValueError(f"chunk_batch must be >= 1, got {chunk_batch}")
        self.model = model
        self.chunk_batch = int(chunk_batch)
        self.config = dict(config or {})
        frontend = model.frontend
        self.sample_rate = int(frontend.sample_rate)
        self.hop_length = int(frontend.hop_length)
        self.patch_frames = int(model.patch_size[0])
        self.freq_patches = int(model.grid[1])
        self.timestamp_embedding_size = int(self.freq_patches * model.d_model)
        self.scene_embedding_size = self.timestamp_embedding_size
        self.frame_ms = 1000.0 * self.hop_length / self.sample_rate
        self.hop_ms = self.patch_frames * self.frame_ms

    @property
    def device(self) -> torch.device:
        """Device of the model's weights."""
        return next(self.model.parameters()).device

    def n_frames(self, n_samples: int) -> int:
        """Log-mel frames of a clip of `n_samples` (centred STFT frames)."""
        return grid_n_frames(n_samples, self.hop_length)

    def n_timestamps(self, n_samples: int) -> int:
        """Embeddings per clip of `n_samples`: one per patch time step that holds real frames."""
        return grid_n_timestamps(n_samples, self.hop_length, self.patch_frames)

    def timestamps(self, n_samples: int) -> torch.Tensor:
        """Timestamps [n_timestamps] in ms: centre of each patch's frames, clipped to the clip's duration."""
        return grid_timestamps(n_samples, self.sample_rate, self.hop_length, self.patch_frames)

    def spectrogram(self, audio: torch.Tensor) -> torch.Tensor:
        """Per-clip normalised log-mel [n_sounds, n_frames, n_mels] of float32 audio on the model's device."""
        n_samples = audio.shape[1]
        frames = self.n_frames(n_samples)
        # The centred STFT reflect-pads n_fft // 2 samples, which needs a longer input; very short clips
        # are zero-padded for the transform only, and just their own frames are kept.
        min_samples = self.model.frontend.melspec.n_fft // 2 + 1
        if n_samples < min_samples:
            audio = F.pad(audio, (0, min_samples - n_samples))
        spec = self.model.frontend.log_mel(audio)[:, :frames]
        return self.model.frontend.normalise(spec)

    def encode(self, spec: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel [n_sounds, n_frames, n_mels] -> embeddings [n_sounds, n_timestamps, emb]."""
        n_sounds, frames, n_mels = spec.shape
        crop = self.model.crop_frames
        n_chunks = math.ceil(frames / crop)
        # Padding with zeros = the clip's mean after normalisation, the most neutral filler.
        spec = F.pad(spec, (0, 0, 0, n_chunks * crop - frames))
        chunks = spec.reshape(n_sounds * n_chunks, 1, crop, n_mels)  # chunk order = time order per sound
        dtype = next(self.model.parameters()).dtype
        steps = crop // self.patch_frames
        pieces = []
        for start in range(0, chunks.shape[0], self.chunk_batch):
            batch = chunks[start : start + self.chunk_batch].to(dtype)
            tokens = self.model.forward_features(batch)[:, 1:]  # drop cls: [n, steps * freq_patches, d]
            # Tokens are time-major (index = step * freq_patches + f), so this groups the freq patches
            # of one time step and concatenates them: position t of the result is time step t.
            pieces.append(tokens.reshape(tokens.shape[0], steps, self.timestamp_embedding_size).float())
        emb = torch.cat(pieces).reshape(n_sounds, n_chunks * steps, self.timestamp_embedding_size)
        return emb[:, : math.ceil(frames / self.patch_frames)]

    def timestamp_embeddings(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked audio [n_sounds, n_samples] -> (embeddings [n, T, emb], timestamps [n, T] ms), float32."""
        audio = check_audio(audio)
        n_sounds, n_samples = audio.shape
        stamps = self.timestamps(n_samples).to(audio.device).expand(n_sounds, -1).contiguous()
        if n_sounds == 0:
            return audio.new_zeros(0, stamps.shape[1], self.timestamp_embedding_size), stamps
        with torch.no_grad():
            emb = self.encode(self.spectrogram(audio.to(self.device)))
        return emb.to(audio.device), stamps

    def scene_embeddings(self, audio: torch.Tensor) -> torch.Tensor:
        """Checked audio [n_sounds, n_samples] -> scene embeddings [n_sounds, emb]: the mean over time."""
        emb, _ = self.timestamp_embeddings(audio)
        if emb.shape[0] == 0:
            return emb.new_zeros(0, self.scene_embedding_size)
        return emb.mean(dim=1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Scene embeddings of a batch of audio (HEAR code calls the module functions instead)."""
        return self.scene_embeddings(audio)


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
    finite = torch.isfinite(audio).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"audio contains NaN or infinite samples (sounds {bad[:10]})")
    return audio.float()


def random_model(family: str, size: str = "tiny") -> MaskedSpectrogramModel:
    """The `family`/`size` preset with random weights, the same in every process (seeded, global RNG kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        return MaskedSpectrogramModel.from_preset(family, size).eval()


def load_model(
    model_file_path: str = "",
    family: str = "transformer",
    size: str | None = None,
    chunk_batch: int = DEFAULT_CHUNK_BATCH,
) -> HearModel:
    """HEAR `load_model`: a bundle or checkpoint at `model_file_path`, else random `size` (tiny) weights."""
    entry = get_family(family)
    name = entry.paper_name
    if not model_file_path:
        size = size or "tiny"
        warnings.warn(
            f"no model file given: {name}-{size} ({family}) has RANDOM weights (seed {RANDOM_WEIGHTS_SEED}); "
            "pass the path of an `msm export` bundle or a Lightning checkpoint for a trained model",
            UserWarning,
            stacklevel=2,
        )
        model = random_model(family, size)
        config = {"family": family, "size": size, "random_weights": True}
        return HearModel(model, chunk_batch=chunk_batch, config=config).eval()

    from msm_lightning.model.bundle import load_model_file  # keeps `import hear` light for the API check

    model, config = load_model_file(model_file_path)
    if model.family != family:
        found = FAMILIES.get(model.family)
        raise ValueError(
            f"model file '{model_file_path}' holds a {found.paper_name if found else model.family} "
            f"({model.family}) model, but {entry.hear_module} loads {name} ({family}) models"
            + (f"; use {found.hear_module} for it" if found else "")
        )
    if size is not None and config.get("size") not in (None, size):
        raise ValueError(f"model file '{model_file_path}' holds a {config.get('size')} model, not {size}")
    return HearModel(model, chunk_batch=chunk_batch, config=config).eval()


def _as_hear_model(model: Any) -> HearModel:
    if not isinstance(model, HearModel):
        raise ValueError(f"model must come from load_model (a HearModel), got {type(model).__name__}")
    return model


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """HEAR: (embeddings [n_sounds, n_timestamps, emb], timestamps [n_sounds, n_timestamps] in ms)."""
    return _as_hear_model(model).timestamp_embeddings(audio)


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """HEAR: one embedding [n_sounds, emb] per clip, the mean of its timestamp embeddings."""
    return _as_hear_model(model).scene_embeddings(audio)
