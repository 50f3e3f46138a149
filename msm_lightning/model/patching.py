"""Spectrogram patches: patchify/unpatchify, the patch embedding and fixed 2-D sin-cos positions."""

from __future__ import annotations

import torch
from torch import nn


def check_divisible(spec_shape: tuple[int, int], patch_size: tuple[int, int]) -> tuple[int, int]:
    """Grid (time patches, frequency patches) of a [time, freq] spectrogram; error if not divisible."""
    (t, f), (pt, pf) = spec_shape, patch_size
    if t % pt or f % pf:
        raise ValueError(f"spectrogram of {t} frames x {f} bins is not divisible by patch size {patch_size}")
    return t // pt, f // pf


def patchify(spec: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """[batch, 1, time, freq] -> [batch, n_patches, pt * pf], patches in time-major order."""
    b = spec.shape[0]
    pt, pf = patch_size
    gt, gf = check_divisible(spec.shape[-2:], patch_size)
    x = spec.reshape(b, gt, pt, gf, pf)
    return x.permute(0, 1, 3, 2, 4).reshape(b, gt * gf, pt * pf)


def unpatchify(patches: torch.Tensor, patch_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of `patchify`: [batch, n_patches, pt * pf] -> [batch, 1, time, freq]."""
    b = patches.shape[0]
    (pt, pf), (gt, gf) = patch_size, grid
    x = patches.reshape(b, gt, gf, pt, pf).permute(0, 1, 3, 2, 4)
    return x.reshape(b, 1, gt * pt, gf * pf)


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sin-cos embedding [len(positions), dim] of (float) positions."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


POS_EMBED_LAYOUTS = ("time_freq", "freq_time")


def sincos_2d(grid: tuple[int, int], dim: int, layout: str = "time_freq") -> torch.Tensor:
    """Fixed 2-D positions [gt * gf, dim] in time-major order: half the channels time, half frequency.

    `layout` says which half comes first: "time_freq" (time in the first half) or "freq_time", the
    layout of MAE's `get_2d_sincos_pos_embed` on a [time, freq] grid, which the SSAM/AxLSTM authors' models
    were trained with (its first half encodes the grid's second axis).
    """
    if dim % 4:
        raise ValueError(f"d_model must be divisible by 4 for 2-D sin-cos positions, got {dim}")
    if layout not in POS_EMBED_LAYOUTS:
        raise ValueError(f"unknown position layout {layout!r}; choose one of {POS_EMBED_LAYOUTS}")
    gt, gf = grid
    t_idx = torch.arange(gt).repeat_interleave(gf)  # [gt * gf]: 0,0,0,0,0,1,1,...
    f_idx = torch.arange(gf).repeat(gt)  # [gt * gf]: 0,1,2,3,4,0,1,...
    halves = [sincos_1d(t_idx, dim // 2), sincos_1d(f_idx, dim // 2)]
    return torch.cat(halves if layout == "time_freq" else halves[::-1], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to `d_model` tokens with a strided convolution (a linear map per patch)."""

    def __init__(self, patch_size: tuple[int, int], d_model: int) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv2d(1, d_model, kernel_size=self.patch_size, stride=self.patch_size)
        # Same init as a linear layer on the flattened patch (MAE), so the conv is just a fast linear map.
        nn.init.xavier_uniform_(self.proj.weight.view(d_model, -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """[batch, 1, time, freq] -> [batch, gt * gf, d_model] in time-major order."""
        check_divisible(spec.shape[-2:], self.patch_size)
        x = self.proj(spec)  # [batch, d_model, gt, gf]
        return x.flatten(2).transpose(1, 2)
