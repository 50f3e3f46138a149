"""Single MIDI notes rendered from General MIDI soundfonts with fluidsynth (MIDI files written in Python)."""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from msm_lightning.datasets.real.dsp import SAMPLE_RATE

# 480 ticks per quarter note at the default 120 bpm: one tick is 1/960 s.
_TICKS_PER_QUARTER = 480
_TICKS_PER_SECOND = 960


class RenderError(RuntimeError):
    """fluidsynth is missing or failed on a soundfont; the message names the soundfont."""


@dataclass(frozen=True)
class Note:
    """One note to render: General MIDI program (0-127), MIDI pitch and velocity."""

    program: int
    pitch: int
    velocity: int


def _vlq(value: int) -> bytes:
    """MIDI variable-length quantity."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(reversed(out))


def note_sequence_midi(notes: Sequence[Note], slot: float, hold: float, silence_after: float) -> bytes:
    """A type-0 MIDI file playing `notes` one at a time, note i starting at i*slot seconds.

    Each note is held `hold` seconds; at `silence_after` seconds into its slot an All Sound Off (CC 120)
    cuts any release tail, so every slot holds exactly one note however long the instrument rings. One
    file per soundfont instead of one per note: loading a compressed .sf3 takes seconds per process.
    """
    if not 0 < hold < silence_after < slot:
        raise ValueError(f"need 0 < hold ({hold}) < silence_after ({silence_after}) < slot ({slot})")
    events: list[tuple[int, int, bytes]] = []  # (tick, order within tick, message)
    for i, n in enumerate(notes):
        if not (0 <= n.program < 128 and 0 <= n.pitch < 128 and 1 <= n.velocity < 128):
            raise ValueError(f"note {i} out of MIDI range: {n}")
        t0 = round(i * slot * _TICKS_PER_SECOND)
        events.append((t0, 0, bytes([0xC0, n.program])))
        events.append((t0, 1, bytes([0x90, n.pitch, n.velocity])))
        events.append((t0 + round(hold * _TICKS_PER_SECOND), 0, bytes([0x80, n.pitch, 0])))
        events.append((t0 + round(silence_after * _TICKS_PER_SECOND), 1, bytes([0xB0, 120, 0])))
    end = round(len(notes) * slot * _TICKS_PER_SECOND)
    track, now = bytearray(), 0
    for tick, _, msg in sorted(events):
        track += _vlq(tick - now) + msg
        now = tick
    track += _vlq(end - now) + b"\xff\x2f\x00"  # end of track
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, _TICKS_PER_QUARTER)
    return header + b"MTrk" + struct.pack(">I", len(track)) + bytes(track)


def fluidsynth_path() -> str | None:
    """The fluidsynth executable, if installed."""
    return shutil.which("fluidsynth")


def render_midi(soundfont: Path, midi: Path, out_wav: Path, sample_rate: int = SAMPLE_RATE) -> None:
    """Render a MIDI file with fluidsynth: no reverb, no chorus, fixed gain, to a wav file."""
    exe = fluidsynth_path()
    if exe is None:
        raise RenderError("fluidsynth is not installed: apt-get install fluidsynth")
    # fluidsynth silently falls back to its default soundfont when the given one is missing.
    if not soundfont.is_file():
        raise RenderError(f"soundfont {soundfont} does not exist")
    tmp = out_wav.with_name(out_wav.name + ".part.wav")
    cmd = [
        exe,
        "-ni",
        "-q",
        "-R",
        "0",
        "-C",
        "0",
        "-g",
        "0.6",
        "-r",
        str(sample_rate),
        "-F",
        str(tmp),
        str(soundfont),
        str(midi),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or "error" in done.stderr.lower() or not tmp.is_file():
        raise RenderError(f"fluidsynth failed on {soundfont.name}: {done.stderr.strip()[-500:]}")
    tmp.replace(out_wav)


def render_notes(
    soundfont: Path,
    font_sha1: str,
    notes: Sequence[Note],
    cache_dir: Path,
    *,
    clip: float,
    hold: float,
    slot: float | None = None,
) -> list[np.ndarray]:
    """Each note as a mono float32 clip of `clip` seconds at 16 kHz (rendered once, cached by content)."""
    slot = slot if slot is not None else clip + 0.5
    midi = note_sequence_midi(notes, slot=slot, hold=hold, silence_after=clip + 0.1)
    key = hashlib.sha256(midi + font_sha1.encode() + b"fluidsynth -R0 -C0 -g0.6 16k").hexdigest()[:24]
    cache_dir.mkdir(parents=True, exist_ok=True)
    wav = cache_dir / f"{key}.wav"
    if not wav.is_file():
        mid = cache_dir / f"{key}.mid"
        mid.write_bytes(midi)
        render_midi(soundfont, mid, wav)
    data, rate = sf.read(str(wav), dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise RenderError(f"{wav}: fluidsynth wrote {rate} Hz, expected {SAMPLE_RATE}")
    mono = data.mean(axis=1)
    n = round(clip * SAMPLE_RATE)
    out = []
    for i in range(len(notes)):
        start = round(i * slot * SAMPLE_RATE)
        seg = np.zeros(n, dtype=np.float32)
        piece = mono[start : start + n]
        seg[: len(piece)] = piece
        out.append(seg)
    return out
