"""The HEAR 2021 API over msm-lightning models, shared by the modules `hear_modules.{ssast,ssam,axlstm}`.

Embedding recipe: log-mel of the whole clip, standardised per clip over all of its frames, split into
`crop_frames` (2 s) chunks with the last one zero-padded, each chunk encoded without masking (last layer,
after the final norm), the cls token dropped and the frequency patches of each patch time step
concatenated, so embedding `t` is patch time step `t` of the clip (true time order), then the chunks
are concatenated and the padding is trimmed.

Timestamps: one per patch time step whose centre lies within the clip, at `40 t + 15` ms (the grid of
`msm_lightning.hear.grid`); input checks, devices and dtypes are those of `msm_lightning.hear.base`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from msm_lightning.hear.base import HearFunctions, HearModule, hear_functions
from msm_lightning.model.families import FAMILIES, get_family
from msm_lightning.model.msm import MaskedSpectrogramModel

DEFAULT_CHUNK_BATCH = 16  # chunks encoded at once: bounds memory for minutes-long audio and big batches
RANDOM_WEIGHTS_SEED = 0  # random-weight models are seeded, so every process builds the same one


class HearModel(HearModule):
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
        self.sample_rate = int(model.frontend.sample_rate)
        self.hop_length = int(model.frontend.hop_length)
        self.frames_per_step = int(model.patch_size[0])  # one timestamp per patch time step
        self.freq_patches = int(model.grid[1])
        self.timestamp_embedding_size = int(self.freq_patches * model.d_model)
        self.scene_embedding_size = self.timestamp_embedding_size

    def spectrogram(self, audio: torch.Tensor) -> torch.Tensor:
        """Per-clip normalised log-mel [n_sounds, n_frames, n_mels] of float32 audio on the model's device."""
        frontend = self.model.frontend
        return frontend.normalise(frontend.log_mel_any_length(audio))

    def encode(self, spec: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel [n_sounds, n_frames, n_mels] -> embeddings [n_sounds, n_steps, emb]."""
        n_sounds, frames, n_mels = spec.shape
        crop = self.model.crop_frames
        n_chunks = math.ceil(frames / crop)
        # Padding with zeros = the clip's mean after normalisation, the most neutral filler.
        spec = F.pad(spec, (0, 0, 0, n_chunks * crop - frames))
        chunks = spec.reshape(n_sounds * n_chunks, 1, crop, n_mels)  # chunk order = time order per sound
        dtype = next(self.model.parameters()).dtype
        steps = crop // self.frames_per_step
        pieces = []
        for start in range(0, chunks.shape[0], self.chunk_batch):
            batch = chunks[start : start + self.chunk_batch].to(dtype)
            tokens = self.model.forward_features(batch)[:, 1:]  # drop cls: [n, steps * freq_patches, d]
            # Tokens are time-major (index = step * freq_patches + f), so this groups the freq patches
            # of one time step and concatenates them: position t of the result is time step t.
            pieces.append(tokens.reshape(tokens.shape[0], steps, self.timestamp_embedding_size).float())
        emb = torch.cat(pieces).reshape(n_sounds, n_chunks * steps, self.timestamp_embedding_size)
        return emb[:, : math.ceil(frames / self.frames_per_step)]

    def embed_timestamps(self, audio: torch.Tensor) -> torch.Tensor:
        """Float32 audio [n, samples] on the model's device -> one embedding per patch time step."""
        return self.encode(self.spectrogram(audio))


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


# For any family's HearModel, as code that loads with an explicit `family` needs.
_, get_scene_embeddings, get_timestamp_embeddings = hear_functions(__name__, HearModel, load_model)


def family_functions(family: str) -> HearFunctions:
    """The HEAR functions of `family`'s module (`hear_modules.ssast`, ...), its models loaded as `family`."""
    entry = get_family(family)

    def load(
        model_file_path: str = "", size: str | None = None, chunk_batch: int = DEFAULT_CHUNK_BATCH
    ) -> HearModel:
        return load_model(model_file_path, family, size, chunk_batch)

    load.__doc__ = (
        f"{entry.paper_name} model from an `msm export` bundle or Lightning checkpoint; "
        "random Tiny weights without one."
    )
    return hear_functions(entry.hear_module, HearModel, load)
