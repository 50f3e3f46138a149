"""Reading audio files as mono tensors and listing the files of an audio corpus."""

from __future__ import annotations

import csv
import functools
import io
import math
import os
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import soundfile as sf
import torch
import torchaudio

AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")

# Native-rate context read on each side of a segment, so the resampling filter sees real signal
# instead of zero padding at the segment edges (its half-width is under 1 ms at any common rate).
_RESAMPLE_MARGIN_SECONDS = 0.005
# torchaudio's sinc filter (Hann window over 6 zero crossings, cut-off 0.99 of the lower Nyquist rate);
# both resampling paths below compute it.
_LOWPASS_WIDTH = 6
_ROLLOFF = 0.99
# The polyphase kernel of a rate pair has (new / gcd) x (orig / gcd + 2 x half-width) taps: small for common
# rates (44100 -> 16000: 76 k), but 256 M (1 GB, 4.8 GB while built) for 16001 -> 16000. Above this many
# taps the same filter is evaluated per output sample instead, in blocks of at most _BLOCK_TAPS values.
_MAX_KERNEL_TAPS = 1 << 20
_BLOCK_TAPS = 1 << 20
# Float files hold samples in [-1, 1], or at most at some integer PCM scale (a float WAV written with int16
# or int32 values); larger ones (a broken float WAV around 1e30) are no audio and are refused like an
# unreadable file.
MAX_SAMPLE_MAGNITUDE = 2.0**31
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


def _half_width(orig_rate: int, new_rate: int) -> int:
    """Input samples on each side of an output sample that the resampling filter reaches."""
    return math.ceil(_LOWPASS_WIDTH * orig_rate / (min(orig_rate, new_rate) * _ROLLOFF))


def _kernel_taps(orig_rate: int, new_rate: int) -> int:
    gcd = math.gcd(orig_rate, new_rate)
    return new_rate // gcd * (orig_rate // gcd + 2 * _half_width(orig_rate, new_rate))


def _resample_blocks(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """torchaudio's sinc resampling evaluated per output sample, a block at a time (any rate pair)."""
    length = wav.numel()
    n_out = math.ceil(new_rate * length / orig_rate)
    width = _half_width(orig_rate, new_rate)
    cutoff = min(orig_rate, new_rate) * _ROLLOFF / orig_rate  # filter cut-off in cycles per input sample
    offsets = torch.arange(-width, width + 2)
    rows = max(1, _BLOCK_TAPS // offsets.numel())
    # Zero beyond both ends, as torchaudio pads; the filter reaches `width` samples past them.
    padded = torch.nn.functional.pad(wav.float(), (width, width + 2 + math.ceil(orig_rate / new_rate)))
    out = torch.empty(n_out, dtype=torch.float32)
    for start in range(0, n_out, rows):
        n = torch.arange(start, min(start + rows, n_out))
        # Output n lies at input time n * orig / new = whole + frac; the integer parts stay exact.
        whole = n * orig_rate // new_rate
        frac = (n * orig_rate - whole * new_rate).double() / new_rate
        t = ((offsets[None, :] - frac[:, None]) * cutoff).float().clamp(-_LOWPASS_WIDTH, _LOWPASS_WIDTH)
        taps = torch.sinc(t) * torch.cos(t * (math.pi / _LOWPASS_WIDTH / 2)) ** 2 * cutoff
        x = padded[(whole + width)[:, None] + offsets]  # input samples whole - width .. whole + width + 1
        out[start : start + n.numel()] = (taps * x).sum(dim=1)
    return out


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Resample mono float32 audio with torchaudio's sinc filter, in bounded memory for any rate pair."""
    if orig_rate == new_rate:
        return wav
    if _kernel_taps(orig_rate, new_rate) <= _MAX_KERNEL_TAPS:
        return _resampler(orig_rate, new_rate)(wav)
    return _resample_blocks(wav, orig_rate, new_rate)


def _out_of_memory(err: BaseException) -> bool:
    """Whether an exception is a failed allocation (numpy's MemoryError, torch's allocator errors)."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and "allocate" in str(err)


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
        margin = 0
        if native_rate != sample_rate:
            margin = max(
                math.ceil(_RESAMPLE_MARGIN_SECONDS * native_rate), _half_width(native_rate, sample_rate) + 1
            )
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
    peak = float(max(data.max(), -data.min()))  # without an |data| copy
    if peak > MAX_SAMPLE_MAGNITUDE:
        raise AudioReadError(
            path, f"samples reach {peak:.3g}, beyond any audio scale (at most {MAX_SAMPLE_MAGNITUDE:.3g})"
        )
    try:
        mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
        wav = resample(torch.from_numpy(np.ascontiguousarray(mono)), native_rate, sample_rate)
    except Exception as err:
        if not _out_of_memory(err):
            raise
        # A file that needs more memory than there is cannot be read here, like any unreadable file.
        raise AudioReadError(path, f"not enough memory to decode and resample it ({err})") from err
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


# Shard records (`msm data shard` writes them, `data.shards` reads them): 16 kHz mono audio quantised to
# 16 bits, stored as raw little-endian PCM or as FLAC, with its sample count and a CRC-32 of the bytes.
RECORD_CODECS: tuple[str, ...] = ("pcm16", "flac")


class CorruptRecordError(Exception):
    """A shard record whose audio cannot be decoded or fails its checksum."""


def encode_record_audio(audio: np.ndarray, codec: str, sample_rate: int) -> bytes:
    """Quantise float audio in [-1, 1] to 16-bit and encode it as raw little-endian PCM or as FLAC."""
    if codec not in RECORD_CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(RECORD_CODECS)}")
    pcm = np.clip(np.round(np.asarray(audio, dtype=np.float64) * 32768.0), -32768, 32767).astype("<i2")
    if codec == "pcm16":
        return pcm.tobytes()
    buf = io.BytesIO()
    sf.write(buf, pcm, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_record_audio(record: dict[str, Any]) -> np.ndarray:
    """The float32 audio of a shard record, checked against its CRC-32 and sample count."""
    try:
        codec = next(c for c in RECORD_CODECS if c in record)
        payload = record[codec]
        if zlib.crc32(payload) != record["crc32"]:
            raise CorruptRecordError("checksum mismatch")
        if codec == "pcm16":
            if len(payload) % 2:
                raise CorruptRecordError("odd number of PCM bytes")
            pcm = np.frombuffer(payload, dtype="<i2")
        else:
            pcm = sf.read(io.BytesIO(bytes(payload)), dtype="int16", always_2d=False)[0]
        if pcm.ndim != 1 or pcm.size != record["samples"] or pcm.size == 0:
            raise CorruptRecordError(f"{pcm.size} samples decoded, {record['samples']} recorded")
    except CorruptRecordError:
        raise
    except StopIteration:
        raise CorruptRecordError(f"no audio field (expected one of {', '.join(RECORD_CODECS)})") from None
    except Exception as err:  # a damaged record can fail in the deserialiser or the decoder in many ways
        raise CorruptRecordError(f"{type(err).__name__}: {err}") from err
    # Scaling by 1/32768 in float32 is exact, so both codecs give bit-identical audio.
    return pcm.astype(np.float32) * np.float32(1.0 / 32768.0)
