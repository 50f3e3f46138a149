"""Unstructured random patch masking with an exact masked count per sample (SSAST-style)."""

from __future__ import annotations

import torch


def random_mask(
    batch: int,
    n_patches: int,
    ratio: float = 0.5,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean mask [batch, n_patches], True = masked, exactly round(ratio * n_patches) per row."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    n_masked = round(ratio * n_patches)
    # Ranking i.i.d. uniform scores draws a uniformly random subset of exactly n_masked patches.
    scores = torch.rand(
        batch, n_patches, generator=generator, device=generator.device if generator else device
    )
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < n_masked).to(device)
