"""HEAR 2021 API for Resemblyzer's GE2E speaker encoder (d-vectors), a pretrained speech peer model.

Weights: `resemblyzer/pretrained.pt`, shipped in the Resemblyzer wheel (no download). The encoder (3-layer
LSTM over 40-bin mel power spectra, 25 ms windows at a 10 ms hop, then linear + ReLU + L2 norm) embeds a
"partial utterance" of 160 frames (1.6 s) into a 256-dim unit vector.

Resemblyzer's package `__init__` imports webrtcvad and librosa for its preprocessing, and webrtcvad 2.0.10
imports `pkg_resources`, which current setuptools no longer has, so `import resemblyzer` fails on modern
environments. This module therefore never imports it: it locates the installed package, loads
`pretrained.pt`, and recomputes the same mel spectrogram in torchaudio (librosa's defaults: Slaney mel
scale and norm, zero-padded centred frames), checked against `VoiceEncoder.embed_utterance`. That also
makes it batched and able to run on a GPU.

Preprocessing: like `resemblyzer.preprocess_wav`, quiet clips are raised to -30 dBFS (never lowered; one
gain per clip). Its VAD-based silence trimming is not applied: it would shift the audio in time.

Timestamps (same 40 ms grid as the msm-lightning models): embedding `t` is the d-vector of the 1.6 s
partial utterance centred on `40 t + 15` ms, zero-padded beyond the clip (Resemblyzer pads the same way).
Scene: Resemblyzer's whole-utterance embedding, i.e. the L2-normalised mean of its partial utterances
at 1.3 per second with 75 % minimum coverage of the last one (`embed_utterance` defaults).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from hear_modules.peers import missing_peer, peer_package_dir
from msm_lightning.hear.base import HearModule, hear_functions
from msm_lightning.hear.grid import FRAMES_PER_STEP, SAMPLE_RATE

__all__ = ["DVectorEmbedder", "get_scene_embeddings", "get_timestamp_embeddings", "load_model"]

# Resemblyzer's hparams.py, restated because importing it runs the package's broken `__init__`.
MEL_WINDOW = 400  # 25 ms
MEL_HOP = 160  # 10 ms; also our log-mel hop, so mel frames line up with our timestamp grid
N_MELS = 40
PARTIAL_FRAMES = 160  # 1.6 s per partial utterance
HIDDEN = 256
N_LAYERS = 3
EMBEDDING = 256
TARGET_DBFS = -30.0
# `embed_utterance` defaults for the whole-utterance (scene) embedding.
SCENE_RATE = 1.3  # partial utterances per second
SCENE_MIN_COVERAGE = 0.75
DEFAULT_PARTIAL_BATCH = 256  # partial utterances per LSTM pass: bounds memory for long clips


def scene_partial_starts(
    n_samples: int, rate: float = SCENE_RATE, min_coverage: float = SCENE_MIN_COVERAGE
) -> list[int]:
    """First mel frame of each partial utterance of a clip, as `VoiceEncoder.compute_partial_slices`."""
    n_frames = (n_samples + MEL_HOP) // MEL_HOP  # = ceil((n_samples + 1) / hop), as Resemblyzer counts
    frame_step = round(SAMPLE_RATE / rate / MEL_HOP)
    starts = list(range(0, max(1, n_frames - PARTIAL_FRAMES + frame_step + 1), frame_step))
    coverage = (n_samples - starts[-1] * MEL_HOP) / (PARTIAL_FRAMES * MEL_HOP)
    if coverage < min_coverage and len(starts) > 1:
        starts.pop()  # a last partial mostly made of padding is dropped
    return starts


class DVectorEmbedder(HearModule):
    """Resemblyzer's pretrained GE2E speaker encoder with HEAR timestamp and scene embeddings."""

    def __init__(self, partial_batch: int = DEFAULT_PARTIAL_BATCH) -> None:
        super().__init__()
        if partial_batch < 1:
            raise ValueError(f"partial_batch must be >= 1, got {partial_batch}")
        weights = peer_package_dir("resemblyzer") / "pretrained.pt"
        if not weights.is_file():
            raise missing_peer("resemblyzer", FileNotFoundError(weights))
        # Same module names as resemblyzer.VoiceEncoder, so its state dict loads as is.
        self.lstm = nn.LSTM(N_MELS, HIDDEN, N_LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN, EMBEDDING)
        state = torch.load(weights, map_location="cpu", weights_only=True)["model_state"]
        # The checkpoint also holds the GE2E loss's similarity scale and bias, which inference never uses.
        self.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")})
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE,
            n_fft=MEL_WINDOW,
            win_length=MEL_WINDOW,
            hop_length=MEL_HOP,
            f_min=0.0,
            f_max=SAMPLE_RATE / 2,
            n_mels=N_MELS,
            power=2.0,
            norm="slaney",
            mel_scale="slaney",
            center=True,
            pad_mode="constant",  # librosa >= 0.10 pads centred frames with zeros
        )
        self.partial_batch = int(partial_batch)
        self.timestamp_embedding_size = EMBEDDING
        self.scene_embedding_size = EMBEDDING
        self.config: dict[str, Any] = {"peer": "resemblyzer", "embedding": "GE2E d-vector"}

    def normalise_volume(self, audio: torch.Tensor) -> torch.Tensor:
        """Raise each clip's RMS level to -30 dBFS if it is below (as `resemblyzer.normalize_volume`)."""
        rms = audio.double().pow(2).mean(dim=1, keepdim=True).sqrt()
        target = 10.0 ** (TARGET_DBFS / 20.0)
        # Silent clips (rms 0) keep gain 1: Resemblyzer would turn them into NaN.
        gain = torch.where(rms > 0, (target / rms.clamp(min=1e-300)).clamp(min=1.0), torch.ones_like(rms))
        return (audio.double() * gain).float()

    def mel(self, audio: torch.Tensor) -> torch.Tensor:
        """Mel power spectrogram [n, frames, 40] of [n, samples] audio (not log: the encoder takes power)."""
        return self.melspec(audio.float()).transpose(1, 2)

    def encode(self, mels: torch.Tensor) -> torch.Tensor:
        """Partial utterances [m, 160, 40] -> L2-normalised d-vectors [m, 256], `partial_batch` at a time."""
        dtype = next(self.parameters()).dtype
        out = []
        for start in range(0, mels.shape[0], self.partial_batch):
            _, (hidden, _) = self.lstm(mels[start : start + self.partial_batch].to(dtype))
            out.append(F.normalize(F.relu(self.linear(hidden[-1])), dim=1).float())
        return torch.cat(out)

    def embed_timestamps(self, audio: torch.Tensor) -> torch.Tensor:
        """Float32 audio [n, samples] -> d-vectors [n, T, 256] of 1.6 s windows centred on the timestamps."""
        n, n_samples = audio.shape
        steps = self.n_timestamps(n_samples)
        # With `lead` frames of zeros in front, padded mel frame j is clip frame j - lead, and the window
        # of 160 frames starting at 4 t is centred between clip frames 4 t + 1 and 4 t + 2, i.e. on
        # 40 t + 15 ms, the timestamp (a clip shorter than 15 ms has its one timestamp at its centre, a few
        # ms before).
        lead = PARTIAL_FRAMES // 2 - (FRAMES_PER_STEP // 2)
        total = MEL_HOP * (FRAMES_PER_STEP * (steps - 1) + PARTIAL_FRAMES - 1)
        padded = F.pad(self.normalise_volume(audio), (lead * MEL_HOP, total - lead * MEL_HOP - n_samples))
        windows = self.mel(padded).unfold(1, PARTIAL_FRAMES, FRAMES_PER_STEP)  # [n, steps, 40, 160]
        windows = windows[:, :steps].transpose(2, 3).reshape(n * steps, PARTIAL_FRAMES, N_MELS)
        return self.encode(windows).reshape(n, steps, EMBEDDING)

    def embed_scene(self, audio: torch.Tensor) -> torch.Tensor:
        """Float32 audio [n, samples] -> whole-utterance d-vectors [n, 256], as `embed_utterance`."""
        n, n_samples = audio.shape
        starts = scene_partial_starts(n_samples)
        end = (starts[-1] + PARTIAL_FRAMES) * MEL_HOP
        audio = self.normalise_volume(audio)
        if end >= n_samples:  # Resemblyzer zero-pads the waveform to the end of the last partial
            audio = F.pad(audio, (0, end - n_samples))
        mel = self.mel(audio)
        partials = torch.stack([mel[:, s : s + PARTIAL_FRAMES] for s in starts], dim=1)  # [n, S, 160, 40]
        emb = self.encode(partials.reshape(-1, PARTIAL_FRAMES, N_MELS)).reshape(n, len(starts), EMBEDDING)
        return F.normalize(emb.mean(dim=1), dim=1)


def _load(model_file_path: str = "", partial_batch: int = DEFAULT_PARTIAL_BATCH) -> DVectorEmbedder:
    """Resemblyzer's encoder with the `pretrained.pt` shipped in its wheel; takes no file."""
    if model_file_path:
        raise ValueError(
            f"Resemblyzer uses the weights shipped in its wheel and loads no file, got '{model_file_path}'"
        )
    return DVectorEmbedder(partial_batch)


load_model, get_scene_embeddings, get_timestamp_embeddings = hear_functions(__name__, DVectorEmbedder, _load)
