"""Deterministic synthetic audio: a small on-disk corpus and in-memory batches for tests and demos."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

SAMPLE_RATES: tuple[int, ...] = (8000, 16000, 22050, 44100)
# (extension, soundfile format, subtypes to rotate through)
_FORMATS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("wav", "WAV", ("PCM_16", "FLOAT", "PCM_24")),
    ("flac", "FLAC", ("PCM_16", "PCM_24")),
    ("ogg", "OGG", ("VORBIS",)),
)
_BAD_KINDS: tuple[str, ...] = (
    "empty.wav",
    "random.flac",
    "truncated.wav",
    "nosamples.wav",
    "nan.wav",
    "text.ogg",
    "huge.wav",
)


def _envelope(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    attack = max(1, int(sr * rng.uniform(0.005, 0.08)))
    release = max(1, int(sr * rng.uniform(0.02, 0.3)))
    env = np.ones(n)
    env[: min(attack, n)] = np.linspace(0.0, 1.0, attack)[: min(attack, n)]
    env[max(0, n - release) :] *= np.linspace(1.0, 0.0, release)[-min(release, n) :]
    return env


def _harmonic(t: np.ndarray, sr: int, f0: np.ndarray | float, rng: np.random.Generator) -> np.ndarray:
    phase = 2 * np.pi * np.cumsum(np.broadcast_to(f0, t.shape)) / sr
    out = np.zeros_like(t)
    tilt = rng.uniform(0.6, 1.6)
    for k in range(1, 13):
        # Harmonics above 0.45 * sr would alias at this file's rate.
        if np.max(f0) * k < 0.45 * sr:
            out += np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k**tilt
    return out


def _tone(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    f0 = rng.uniform(90, 700)
    vibrato = 1 + rng.uniform(0.005, 0.03) * np.sin(2 * np.pi * rng.uniform(4, 7) * t)
    return _harmonic(t, sr, f0 * vibrato, rng)


def _chord(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    root = rng.uniform(110, 440)
    intervals = ((0, 4, 7), (0, 3, 7), (0, 4, 7, 11), (0, 5, 9))[rng.integers(4)]
    return sum(_harmonic(t, sr, root * 2 ** (i / 12), rng) for i in intervals)


def _chirp(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    f_lo, f_hi = rng.uniform(80, 400), rng.uniform(0.15, 0.42) * sr
    f_start, f_end = (f_lo, f_hi) if rng.random() < 0.5 else (f_hi, f_lo)
    freq = f_start * (f_end / f_start) ** (t / max(t[-1], 1e-9))
    return np.sin(2 * np.pi * np.cumsum(freq) / sr)


def _noise(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(t.size))
    freqs = np.fft.rfftfreq(t.size, 1 / sr)
    # Power falls as 1/f^alpha: alpha 0 is white, 1 pink, 2 brown.
    spectrum *= np.maximum(freqs, 20.0) ** (-rng.uniform(0, 2) / 2)
    noise = np.fft.irfft(spectrum, n=t.size)
    return noise * (0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(0.5, 12) * t + rng.uniform(0, 2 * np.pi)))


def _clicks(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros_like(t)
    ring = np.arange(int(0.03 * sr)) / sr
    click = np.sin(2 * np.pi * rng.uniform(300, 0.4 * sr) * ring) * np.exp(-ring * rng.uniform(80, 400))
    period = int(sr / rng.uniform(2, 25))
    for start in range(int(rng.integers(period)), t.size, period):
        seg = click[: t.size - start]
        out[start : start + seg.size] += seg * rng.uniform(0.5, 1.0)
    return out


_KINDS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "tone": _tone,
    "chord": _chord,
    "chirp": _chirp,
    "noise": _noise,
    "clicks": _clicks,
}


def _signal(kind: str, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / sr
    if kind == "mix":
        a, b = rng.choice(list(_KINDS), size=2, replace=False)
        parts = [_KINDS[a](t, sr, rng), _KINDS[b](t, sr, rng) * rng.uniform(0.3, 1.0)]
        x = sum(p / (np.max(np.abs(p)) + 1e-9) for p in parts)
    else:
        x = _KINDS[kind](t, sr, rng)
    x = x * _envelope(n, sr, rng)
    return x / (np.max(np.abs(x)) + 1e-9) * rng.uniform(0.2, 0.9)


def _write(path: Path, x: np.ndarray, sr: int, fmt: str, subtype: str) -> None:
    sf.write(path, x, sr, format=fmt, subtype=subtype)
    if fmt == "WAV" and subtype in ("FLOAT", "DOUBLE"):
        # libsndfile stamps float WAVs with a PEAK chunk holding the wall-clock time; zero it so the
        # same seed gives identical bytes.
        data = bytearray(path.read_bytes())
        at = data.find(b"PEAK", 12, 200)
        if at >= 0:
            data[at + 12 : at + 16] = bytes(4)
            path.write_bytes(bytes(data))


def _write_bad(path: Path, kind: str, rng: np.random.Generator) -> None:
    if kind == "empty.wav":
        path.write_bytes(b"")
    elif kind == "random.flac":
        path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "truncated.wav":
        sf.write(path, np.zeros(1600, dtype=np.float32), 16000, subtype="PCM_16")
        path.write_bytes(path.read_bytes()[:20])
    elif kind == "nosamples.wav":
        sf.write(path, np.zeros((0, 1), dtype=np.float32), 16000, subtype="PCM_16")
    elif kind == "nan.wav":
        x = np.sin(np.linspace(0, 200, 16000)).astype(np.float32)
        x[5000:5100] = np.nan
        _write(path, x, 16000, "WAV", "FLOAT")
    elif kind == "huge.wav":  # finite float samples near 1e30: no audio at any scale
        _write(
            path,
            np.sin(np.linspace(0, 200, 16000)).astype(np.float32) * np.float32(1e30),
            16000,
            "WAV",
            "FLOAT",
        )
    else:
        path.write_text("this is not audio\n")


def make_corpus(
    out_dir: str | Path,
    n_files: int = 48,
    seed: int = 0,
    n_corrupt: int = 0,
    min_seconds: float = 0.5,
    max_seconds: float = 6.0,
) -> Path:
    """Write a varied synthetic audio corpus (plus `n_corrupt` broken files) and return its manifest."""
    if not 0 < min_seconds <= max_seconds:
        raise ValueError(f"need 0 < min_seconds <= max_seconds, got {min_seconds}, {max_seconds}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    kinds = [*_KINDS, "mix"]
    rel_paths: list[str] = []
    for i in range(n_files):
        sr = SAMPLE_RATES[i % len(SAMPLE_RATES)]
        ext, fmt, subtypes = _FORMATS[(i // len(SAMPLE_RATES)) % len(_FORMATS)]
        channels = 1 + (i // 2) % 2
        kind = kinds[i % len(kinds)]
        # Every fourth clip is kept under 2 s so crop tiling always gets exercised.
        hi = min(max_seconds, 1.9) if i % 4 == 0 and min_seconds < 1.9 else max_seconds
        n = max(1, int(rng.uniform(min_seconds, hi) * sr))
        x = _signal(kind, n, sr, rng)
        if channels == 2:
            # A delayed, rescaled copy plus a little noise: a plausible stereo image that averages cleanly.
            right = np.roll(x, int(rng.integers(1, 40))) * rng.uniform(0.6, 1.0)
            x = np.stack([x, right + 0.01 * rng.standard_normal(n)], axis=1)
        rel = Path(f"part{i % 3}") / f"{i:03d}_{kind}_{sr}hz_{channels}ch.{ext}"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        subtype = subtypes[(i // 12) % len(subtypes)]
        _write(out / rel, x.astype(np.float32), sr, fmt, subtype)
        rel_paths.append(rel.as_posix())
    for j in range(n_corrupt):
        kind = _BAD_KINDS[j % len(_BAD_KINDS)]
        rel = Path("bad") / f"bad_{j:03d}_{kind}"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        _write_bad(out / rel, kind, rng)
        rel_paths.append(rel.as_posix())
    manifest = out / "manifest.txt"
    header = f"# synthetic corpus: seed={seed}, {n_files} files, {n_corrupt} corrupt\n"
    manifest.write_text(header + "".join(p + "\n" for p in rel_paths))
    return manifest


def fixed_batch(n: int, seconds: float = 2.0, seed: int = 0, *, sample_rate: int = 16000) -> torch.Tensor:
    """Return an [n, samples] float32 batch of synthetic signals like those in `make_corpus`."""
    rng = np.random.default_rng(seed)
    kinds = [*_KINDS, "mix"]
    samples = round(seconds * sample_rate)
    batch = np.zeros((n, samples), dtype=np.float32)
    for i in range(n):
        batch[i] = _signal(kinds[i % len(kinds)], samples, sample_rate, rng)
    return torch.from_numpy(batch)
