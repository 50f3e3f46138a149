"""The masked spectrogram model: front end, patch embedding, masking, encoder and reconstruction head.

A plain `nn.Module` with no Lightning dependency, so HEAR modules and exports load it without a trainer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from msm_lightning.model.families import build_encoder, preset
from msm_lightning.model.frontend import LogMelFrontend
from msm_lightning.model.patching import PatchEmbed, check_divisible, patchify, sincos_2d


class MaskedSpectrogramModel(nn.Module):
    """Log-mel patches -> encoder tokens; `masked_loss` is the MSM pretraining objective."""

    def __init__(
        self,
        family: str = "transformer",
        d_model: int = 192,
        depth: int = 12,
        patch_size: tuple[int, int] = (4, 16),
        crop_frames: int = 200,
        encoder_kwargs: dict[str, Any] | None = None,
        frontend_kwargs: dict[str, Any] | None = None,
        pos_embed_layout: str = "time_freq",
    ) -> None:
        super().__init__()
        self.family = family
        self.d_model = d_model
        self.depth = depth
        self.patch_size = (int(patch_size[0]), int(patch_size[1]))
        self.crop_frames = crop_frames
        self.encoder_kwargs = dict(encoder_kwargs or {})
        # Which half of the position channels encodes time; "freq_time" only for the authors' weights.
        self.pos_embed_layout = pos_embed_layout
        self.frontend = LogMelFrontend(**(frontend_kwargs or {}))
        self.grid = check_divisible((crop_frames, self.frontend.n_mels), self.patch_size)
        self.n_patches = self.grid[0] * self.grid[1]

        self.patch_embed = PatchEmbed(self.patch_size, d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d_model))
        pos_embed = sincos_2d(self.grid, d_model, pos_embed_layout)  # [n_patches, d]
        self.register_buffer("pos_embed", pos_embed, persistent=False)
        self.encoder = build_encoder(
            family, d_model=d_model, depth=depth, max_tokens=self.n_patches + 1, **self.encoder_kwargs
        )
        self.head = nn.Sequential(
            nn.Linear(d_model, d_model),
            nn.GELU(),
            nn.Linear(d_model, self.patch_size[0] * self.patch_size[1]),
        )
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def from_preset(cls, family: str, size: str, **overrides: Any) -> MaskedSpectrogramModel:
        """Build a named preset, e.g. `from_preset('mamba', 'tiny')`; overrides replace preset arguments."""
        kwargs = preset(family, size)
        kwargs["encoder_kwargs"] = {
            **kwargs["encoder_kwargs"],
            **(overrides.pop("encoder_kwargs", None) or {}),
        }
        return cls(**{**kwargs, **overrides})

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this model (stored in checkpoints and exports)."""
        return {
            "family": self.family,
            "d_model": self.d_model,
            "depth": self.depth,
            "patch_size": list(self.patch_size),
            "crop_frames": self.crop_frames,
            "encoder_kwargs": self.encoder_kwargs,
            "frontend_kwargs": self.frontend.config(),
            "pos_embed_layout": self.pos_embed_layout,
        }

    def spectrogram(self, audio: torch.Tensor) -> torch.Tensor:
        """[batch, samples] audio -> normalised log-mel [batch, 1, frames, n_mels] that patches exactly.

        A 2 s crop gives 201 centred STFT frames; the model takes whole patches of at most `crop_frames`
        frames (200), so the extra frame (and any partial patch of shorter audio) is dropped here, once.
        """
        spec = self.frontend(audio)  # [batch, 1, frames, n_mels]
        pt = self.patch_size[0]
        return spec[:, :, : min(self.crop_frames, spec.shape[2] // pt * pt)]

    def n_patches_of(self, spec: torch.Tensor) -> int:
        """Number of patches of a [batch, 1, frames, n_mels] spectrogram (frames a multiple of patch time)."""
        return check_divisible(spec.shape[-2:], self.patch_size)[0] * self.grid[1]

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """Positional embedding [gt * gf, d_model] of a patch grid (cached for the training grid)."""
        if grid == self.grid:
            return self.pos_embed
        return sincos_2d(grid, self.d_model, self.pos_embed_layout).to(self.pos_embed.device)

    def embed(self, spec: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, 1, time, freq] -> input tokens [batch, 1 + n_patches, d_model] (cls token first)."""
        tokens = self.patch_embed(spec)  # [batch, n_patches, d]
        grid = check_divisible(spec.shape[-2:], self.patch_size)
        if mask is not None:
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        # Positions are added after the mask token is substituted, so masked tokens still know where they are.
        tokens = tokens + self.positions(grid).to(tokens.dtype)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)  # position embedding zero
        return torch.cat([cls, tokens], dim=1)

    def forward_features(self, spec: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output after the final norm, [batch, 1 + n_patches, d_model] (cls token first)."""
        return self.encoder(self.embed(spec, mask))

    def forward(self, spec: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Inference: same as `forward_features`."""
        return self.forward_features(spec, mask)

    def reconstruct(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted patches [batch, n_patches, pt * pf] from encoder output (cls token dropped)."""
        return self.head(features[:, 1:])

    def masked_loss(self, spec: torch.Tensor, mask: torch.Tensor, norm_targets: bool = False) -> torch.Tensor:
        """MSE between predicted and input patches, averaged over masked patches only."""
        pred = self.reconstruct(self.forward_features(spec, mask)).float()
        target = patchify(spec, self.patch_size).float()
        if norm_targets:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = (pred - target).pow(2).mean(dim=-1)  # [batch, n_patches]
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)
