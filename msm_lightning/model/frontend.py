"""Waveform to normalised log-mel spectrogram (docs/METHOD.md §1), batched, on any device.

Two numerical guards; ordinary audio gives the same result as without them, to float32 rounding:
- Clips loud enough for their float32 power spectrum to overflow (finite samples near 1e30, as a broken
  float WAV may hold) are transformed in float64, where no float32 input can overflow.
- The per-clip standardisation computes its mean and standard deviation in float64 and divides by at least
  `NORM_STD_FLOOR`. A silent or constant clip has a log-mel whose only spread is the rounding of a float32
  mean, which depends on how the reduction is split up and so on the batch the clip is in; dividing by that
  spread made such a clip's output (and its loss) explode and change with its batch-mates.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

# Smallest standard deviation (in nats of log-mel power, about 0.4 dB) the normalisation divides by. Log-mel
# spreads of real sound are around 1 and more (white noise far below full scale: 1.05); a clip whose log-mel
# varies by less than this is silence or a constant at the front end's floor (eps), and is mapped to values
# near 0 instead of to magnified rounding noise.
NORM_STD_FLOOR = 0.1


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
        # torchaudio reads a value of the filter bank while building it, which a build on the meta device (the
        # bundle loader's dry run, model/bundle.py) cannot; the front end is small, so it is built on the CPU.
        on_meta = torch.get_default_device().type == "meta"
        with torch.device("cpu") if on_meta else contextlib.nullcontext():
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

    def overflow_limit(self) -> float:
        """Largest sample magnitude whose float32 mel power spectrum cannot overflow."""
        window = self.melspec.spectrogram.window
        n_freqs = self.melspec.spectrogram.n_fft // 2 + 1
        # A bin's power is at most (peak x window sum)^2 and a mel band sums at most n_freqs bins (weights
        # <= 1); a factor 2 of margin for rounding.
        return math.sqrt(torch.finfo(torch.float32).max / n_freqs) / float(window.abs().sum()) / 2

    def _mel_power_float64(self, audio: torch.Tensor) -> torch.Tensor:
        """The mel power spectrum [batch, n_mels, time] computed in float64 (same settings as `melspec`)."""
        spec = self.melspec.spectrogram
        power = torchaudio.functional.spectrogram(
            audio.double(),
            spec.pad,
            spec.window.double(),
            spec.n_fft,
            spec.hop_length,
            spec.win_length,
            spec.power,
            spec.normalized,
            spec.center,
            spec.pad_mode,
            spec.onesided,
        )
        return torch.matmul(power.transpose(-1, -2), self.melspec.mel_scale.fb.double()).transpose(-1, -2)

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-mel [batch, time, n_mels] of [batch, samples] audio."""
        # The STFT runs in float32 even under autocast: log of bf16 power spectra loses the quiet bins.
        with torch.autocast(device_type=audio.device.type, enabled=False):
            audio = audio.float()
            out = torch.log(self.melspec(audio) + self.eps)  # [batch, n_mels, time]
            peaks = audio.abs().amax(dim=1) if audio.shape[1] else audio.new_zeros(audio.shape[0])
            loud = peaks > self.overflow_limit()
            if bool(loud.any()):
                # Only the loud clips are redone, so the others' values do not depend on their batch-mates.
                power = self._mel_power_float64(audio[loud])
                out[loud] = torch.log(power + self.eps).float()
            return out.transpose(1, 2)  # [batch, time, n_mels]

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
        """Per-clip standardisation over all time-frequency bins, as the released models do.

        The statistics are taken in float64, and the divisor is at least `NORM_STD_FLOOR`: a silent or
        constant clip maps to zeros (near-silent ones to values near 0) whatever clips share its batch.
        """
        dims = tuple(range(1, spec.dim()))
        wide = spec.double()
        mean = wide.mean(dim=dims, keepdim=True)
        std = wide.std(dim=dims, keepdim=True)
        return ((wide - mean) / std.clamp(min=NORM_STD_FLOOR)).to(spec.dtype)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """[batch, samples] waveform -> [batch, 1, time, n_mels] normalised log-mel."""
        if audio.dim() != 2:
            raise ValueError(f"audio must be [batch, samples], got shape {tuple(audio.shape)}")
        return self.normalise(self.log_mel(audio)).unsqueeze(1)
