"""Small signal helpers: load as 16 kHz mono, trim silence, fix length, level, band-limit, write PCM wav."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from msm_lightning.audio import load_audio

SAMPLE_RATE = 16000


def load_mono(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A whole file as float32 mono at `sample_rate` (soundfile decodes wav/ogg/mp3; torchaudio resamples)."""
    return load_audio(path, sample_rate).numpy().astype(np.float32, copy=False)


def db_to_amplitude(db: float) -> float:
    """Amplitude ratio of a level in dB."""
    return float(10.0 ** (db / 20.0))


def rms(x: np.ndarray) -> float:
    """Root mean square of a signal (0 for an empty one)."""
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def active_bounds(
    x: np.ndarray, sample_rate: int = SAMPLE_RATE, threshold_db: float = -35.0
) -> tuple[int, int]:
    """First and last sample of the part louder than `threshold_db` below the peak (10 ms frames)."""
    frame = max(1, sample_rate // 100)
    n = len(x) // frame
    if n == 0:
        return 0, len(x)
    energy = np.sqrt(np.mean(np.square(x[: n * frame].reshape(n, frame), dtype=np.float64), axis=1))
    peak = energy.max()
    if peak <= 0:
        return 0, 0
    loud = np.flatnonzero(energy >= peak * db_to_amplitude(threshold_db))
    return int(loud[0] * frame), int(min(len(x), (loud[-1] + 1) * frame))


def trim(x: np.ndarray, sample_rate: int = SAMPLE_RATE, pad_seconds: float = 0.05) -> np.ndarray:
    """The signal without leading and trailing near-silence, keeping a short margin."""
    start, end = active_bounds(x, sample_rate)
    pad = int(pad_seconds * sample_rate)
    return x[max(0, start - pad) : min(len(x), end + pad)]


def fix_length(x: np.ndarray, n: int, offset: int = 0) -> np.ndarray:
    """Exactly n samples: `x` placed at `offset`, cut at the end, zero-padded (as hearpreprocess does)."""
    out = np.zeros(n, dtype=np.float32)
    seg = x[: max(0, n - offset)]
    out[offset : offset + len(seg)] = seg
    return out


def normalize_rms(x: np.ndarray, target_db: float = -20.0, peak: float = 0.95) -> np.ndarray:
    """Scale to a target RMS level, then down if the peak would exceed `peak` (no clipping)."""
    level = rms(x)
    if level <= 0:
        return x.astype(np.float32)
    y = x * (db_to_amplitude(target_db) / level)
    top = float(np.abs(y).max())
    if top > peak:
        y = y * (peak / top)
    return y.astype(np.float32)


def limit_peak(x: np.ndarray, peak: float = 0.95) -> np.ndarray:
    """Scale down only if the peak exceeds `peak`."""
    top = float(np.abs(x).max()) if x.size else 0.0
    return (x * (peak / top)).astype(np.float32) if top > peak else x.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _resampler(a: int, b: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(a, b, dtype=torch.float32)


def band_limit(x: np.ndarray, via_rate: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Down- then up-sample through `via_rate`: removes content above via_rate/2 (e.g. telephone band)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    y = _resampler(via_rate, sample_rate)(_resampler(sample_rate, via_rate)(t))
    return fix_length(y.numpy(), len(x))


def write_wav(path: Path, x: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM mono wav, written to a temporary name and renamed so a crash leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    sf.write(str(tmp), np.clip(x, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    tmp.replace(path)
