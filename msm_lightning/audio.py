"""Reading audio files as mono tensors and listing the files of an audio corpus."""

from __future__ import annotations

import csv
import functools
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch
import torchaudio

AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")

# Native-rate context read on each side of a segment, so the resampling filter sees real signal
# instead of zero padding at the segment edges (its half-width is under 1 ms at any common rate).
_RESAMPLE_MARGIN_SECONDS = 0.005
_HEADER_CELLS = frozenset({"path", "paths", "file", "files", "filename", "filepath", "file_path", "audio"})


class AudioReadError(Exception):
    """An audio file could not be read into a usable waveform."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read audio file '{path}': {reason}")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        # The default pickling replays self.args (the message) into __init__, which needs two
        # arguments; errors must survive the trip from a DataLoader worker to the main process.
        return type(self), (self.path, self.reason)


class AudioInfo(NamedTuple):
    """Header facts of an audio file."""

    frames: int
    sample_rate: int
    channels: int


@functools.lru_cache(maxsize=16)
def _resampler(orig_rate: int, new_rate: int) -> torchaudio.transforms.Resample:
    # Bit-identical to torchaudio.functional.resample (same float32 sinc kernel), but the kernel is
    # built once per rate pair: building it costs more than filtering a whole clip.
    return torchaudio.transforms.Resample(orig_rate, new_rate, dtype=torch.float32)


def _open(path: Path) -> sf.SoundFile:
    if not path.exists():
        raise AudioReadError(path, "file does not exist")
    if not path.is_file():
        raise AudioReadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise AudioReadError(path, "file is empty (0 bytes)")
    try:
        return sf.SoundFile(str(path))
    except Exception as err:  # libsndfile reports every kind of bad file through assorted exceptions
        raise AudioReadError(path, f"not a readable audio file ({err})") from err


def audio_info(path: str | Path) -> AudioInfo:
    """Read the frame count, sample rate and channel count from a file's header."""
    path = Path(path)
    with _open(path) as f:
        info = AudioInfo(f.frames, f.samplerate, f.channels)
    if info.frames <= 0:
        raise AudioReadError(path, "file contains no samples")
    return info


def load_audio(
    path: str | Path, sample_rate: int = 16000, *, offset: float = 0.0, duration: float | None = None
) -> torch.Tensor:
    """Read an audio file, or `duration` seconds of it from `offset`, as mono float32 at `sample_rate`."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    path = Path(path)
    with _open(path) as f:
        native_rate, frames = f.samplerate, f.frames
        if frames <= 0:
            raise AudioReadError(path, "file contains no samples")
        # Work in output samples: `total` is what resampling the whole file yields.
        total = math.ceil(frames * sample_rate / native_rate)
        first = min(max(0, round(offset * sample_rate)), total)
        last = total if duration is None else min(total, first + round(duration * sample_rate))
        if first >= last:
            return torch.zeros(0)
        gcd = math.gcd(native_rate, sample_rate)
        step_in, step_out = native_rate // gcd, sample_rate // gcd
        margin = 0 if native_rate == sample_rate else math.ceil(_RESAMPLE_MARGIN_SECONDS * native_rate)
        # Start on a resampler block boundary (step_in input samples -> step_out output samples), so
        # a segment is sample-exact with the same stretch of the whole resampled file.
        lo_block = max(0, first // step_out - math.ceil(margin / step_in))
        lo = lo_block * step_in
        hi = min(frames, math.ceil(last * native_rate / sample_rate) + margin)
        try:
            f.seek(lo)
            data = f.read(hi - lo, dtype="float32", always_2d=True)
        except Exception as err:
            raise AudioReadError(path, f"decoding failed ({err})") from err
    if data.shape[0] == 0:
        raise AudioReadError(path, "no samples could be decoded")
    if not np.isfinite(data).all():
        raise AudioReadError(path, "contains NaN or infinite samples")
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    wav = torch.from_numpy(np.ascontiguousarray(mono))
    if native_rate != sample_rate:
        wav = _resampler(native_rate, sample_rate)(wav)
    skip = first - lo_block * step_out
    return wav[skip : skip + last - first]


def _list_folder(root: Path) -> list[Path]:
    if not root.is_dir():
        raise ValueError(f"audio folder '{root}' does not exist or is not a folder")
    found: list[Path] = []
    seen: set[str] = set()
    # os.walk with followlinks because corpora are often assembled from symlinked folders; the
    # realpath set stops symlink cycles.
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in names:
            # Dot files include macOS "._x.wav" resource forks, which are not audio.
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS:
                found.append(Path(folder) / name)
    if not found:
        raise ValueError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) found under folder '{root}'")
    return sorted(found)


def _manifest_entries(manifest: Path) -> list[str]:
    text = manifest.read_text(encoding="utf-8-sig")
    suffix = manifest.suffix.lower()
    if suffix not in (".csv", ".tsv"):
        return [line.strip() for line in text.splitlines()]
    rows = csv.reader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
    entries = [row[0].strip() for row in rows if row and row[0].strip()]
    entries = [e for e in entries if not e.startswith("#")]
    if entries and entries[0].lower() in _HEADER_CELLS:
        entries = entries[1:]
    return entries


def _read_manifest(manifest: Path) -> list[Path]:
    if not manifest.is_file():
        raise ValueError(f"manifest '{manifest}' does not exist or is not a file")
    base = manifest.absolute().parent
    entries = [e for e in _manifest_entries(manifest) if e and not e.startswith("#")]
    # wav2vec/fairseq .tsv manifests start with a line naming the folder the other paths are under.
    if manifest.suffix.lower() == ".tsv" and entries and (base / entries[0]).expanduser().is_dir():
        base, entries = (base / entries[0]).expanduser(), entries[1:]
    if not entries:
        raise ValueError(f"manifest '{manifest}' lists no audio files")
    return [base / Path(e).expanduser() for e in entries]


def list_audio_files(root: str | Path | None = None, manifest: str | Path | None = None) -> list[Path]:
    """List the audio files under a folder (recursively, sorted) or named in a manifest file."""
    if (root is None) == (manifest is None):
        raise ValueError("give exactly one of root (a folder of audio) or manifest (a file listing audio)")
    if root is not None:
        return _list_folder(Path(root))
    return _read_manifest(Path(manifest))
