"""Waveform to normalised log-mel spectrogram (docs/METHOD.md §1), batched, on any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn


class LogMelFrontend(nn.Module):
    """Mono 16 kHz waveform [batch, samples] -> per-clip normalised log-mel [batch, 1, time, n_mels]."""

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 400,
        win_length: int = 400,
        hop_length: int = 160,
        f_min: float = 50.0,
        f_max: float = 8000.0,
        n_mels: int = 80,
    ) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=n_fft,
            win_length=win_length,
            hop_length=hop_length,
            f_min=f_min,
            f_max=f_max,
            n_mels=n_mels,
            power=2.0,
        )
        self.eps = torch.finfo(torch.float32).eps

    def config(self) -> dict:
        """Settings needed to rebuild this front end (stored with exported models)."""
        mel = self.melspec
        return {
            "sample_rate": self.sample_rate,
            "n_fft": mel.n_fft,
            "win_length": mel.win_length,
            "hop_length": self.hop_length,
            "f_min": mel.f_min,
            "f_max": mel.f_max,
            "n_mels": self.n_mels,
        }

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-mel [batch, time, n_mels] of [batch, samples] audio."""
        # The STFT runs in float32 even under autocast: log of bf16 power spectra loses the quiet bins.
        with torch.autocast(device_type=audio.device.type, enabled=False):
            power = self.melspec(audio.float())  # [batch, n_mels, time]
            return torch.log(power + self.eps).transpose(1, 2)  # [batch, time, n_mels]

    def log_mel_any_length(self, audio: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-mel [batch, 1 + samples // hop, n_mels] of clips of any length (even 1 sample)."""
        n_samples = audio.shape[1]
        # The centred STFT reflect-pads n_fft // 2 samples, which needs a longer input; very short clips
        # are zero-padded for the transform only, and just their own frames are kept.
        min_samples = self.melspec.n_fft // 2 + 1
        if n_samples < min_samples:
            audio = F.pad(audio, (0, min_samples - n_samples))
        return self.log_mel(audio)[:, : 1 + n_samples // self.hop_length]

    @staticmethod
    def normalise(spec: torch.Tensor) -> torch.Tensor:
        """Per-clip standardisation over all time-frequency bins, as the released models do."""
        dims = tuple(range(1, spec.dim()))
        mean = spec.mean(dim=dims, keepdim=True)
        std = spec.std(dim=dims, keepdim=True)
        return (spec - mean) / (std + 1e-8)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """[batch, samples] waveform -> [batch, 1, time, n_mels] normalised log-mel."""
        if audio.dim() != 2:
            raise ValueError(f"audio must be [batch, samples], got shape {tuple(audio.shape)}")
        return self.normalise(self.log_mel(audio)).unsqueeze(1)
