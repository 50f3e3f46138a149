"""The 40 ms timestamp grid of every HEAR module here: our models, the log-mel baseline and the peers.

Frames. With a 10 ms hop (160 samples at 16 kHz) and centred STFT frames, a clip of `n` samples has
`1 + n // 160` frames, frame `i` centred at `10 i` ms. Step `t` groups frames `4t .. 4t+3` (one patch
time step of our models), so its timestamp is the centre of those frames, `40 t + 15` ms.

Timestamps. A clip keeps exactly the steps whose timestamp lies within it (`40 t + 15 <= duration`):
the hop is then exactly 40 ms everywhere, the first timestamp is 15 ms, none lies beyond the audio and
the last one is less than one hop before its end. These are the HEAR validator's rules (hops within 1 ms
of their mean, nothing after the end, the last one within a hop and within 50 ms of the end, the first
within a hop of the start); clipping the last timestamp to the duration instead would break the first.
A clip shorter than 15 ms has no such step; it gets one timestamp, at its centre, for the one step that
holds all of its frames (the validator checks spacing and ends only when there are two or more).
Later steps, which hold at most the clip's last two frames, are computed by the encoders (a step is
what they work in) and dropped; the audio they hold still reaches the kept steps through the encoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
HOP_LENGTH = 160  # 10 ms frames
FRAMES_PER_STEP = 4  # one timestamp per 4 frames = 40 ms, the patch time step of our models


def grid_n_frames(n_samples: int, hop_length: int = HOP_LENGTH) -> int:
    """Centred STFT frames of a clip of `n_samples`: frame `i` is centred on sample `i * hop_length`."""
    return 1 + n_samples // hop_length


def grid_n_steps(n_samples: int, hop_length: int = HOP_LENGTH, frames_per_step: int = FRAMES_PER_STEP) -> int:
    """Steps holding at least one real frame: what frame-wise encoders compute, at least the timestamps."""
    return math.ceil(grid_n_frames(n_samples, hop_length) / frames_per_step)


def grid_n_timestamps(
    n_samples: int, hop_length: int = HOP_LENGTH, frames_per_step: int = FRAMES_PER_STEP
) -> int:
    """Timestamps of a clip of `n_samples`: the steps centred within the clip, and at least one."""
    # Twice the centre of step t in samples is hop * (2 fps t + fps - 1): integers, so no rounding at all.
    twice_first = hop_length * (frames_per_step - 1)
    if 2 * n_samples < twice_first:
        return 1
    return (2 * n_samples - twice_first) // (2 * hop_length * frames_per_step) + 1


def grid_timestamps(
    n_samples: int,
    sample_rate: int = SAMPLE_RATE,
    hop_length: int = HOP_LENGTH,
    frames_per_step: int = FRAMES_PER_STEP,
) -> torch.Tensor:
    """Timestamps [T] in ms (float32): the centre of each kept step, or the clip's centre if it has none."""
    frame_ms = 1000.0 * hop_length / sample_rate
    first_ms = frame_ms * (frames_per_step - 1) / 2
    duration_ms = 1000.0 * n_samples / sample_rate
    if duration_ms < first_ms:
        return torch.tensor([duration_ms / 2], dtype=torch.float32)
    steps = torch.arange(grid_n_timestamps(n_samples, hop_length, frames_per_step), dtype=torch.float64)
    return (first_ms + steps * frames_per_step * frame_ms).float()


def pool_frames(frames: torch.Tensor, frames_per_step: int = FRAMES_PER_STEP) -> torch.Tensor:
    """Mean of each group of `frames_per_step` frames: [n, F, D] -> [n, ceil(F / frames_per_step), D]."""
    n, n_frames, dim = frames.shape
    steps = math.ceil(n_frames / frames_per_step)
    pad = steps * frames_per_step - n_frames
    # The last group may hold fewer real frames; it is averaged over those only, not over padding.
    sums = F.pad(frames, (0, 0, 0, pad)).reshape(n, steps, frames_per_step, dim).sum(dim=2)
    counts = torch.full((steps,), float(frames_per_step), dtype=frames.dtype, device=frames.device)
    counts[-1] = frames_per_step - pad
    return sums / counts[:, None]
