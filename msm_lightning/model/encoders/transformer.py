"""Pre-LN ViT encoder (the SSAST baseline): multi-head self-attention and an MLP per block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, d_model: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=qkv_bias)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, d_model] -> [batch, seq, d_model]."""
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [batch, heads, seq, head_dim]
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer GELU MLP."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, d_model] -> [batch, seq, d_model]."""
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=1e-6)
        self.attn = Attention(d_model, num_heads)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-6)
        self.mlp = Mlp(d_model, int(d_model * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, d_model] -> [batch, seq, d_model]."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """A stack of `depth` Transformer blocks and a final LayerNorm."""

    def __init__(self, d_model: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, max_tokens: int = 0):
        super().__init__()
        del max_tokens  # attention needs no length-dependent state
        self.blocks = nn.ModuleList(TransformerBlock(d_model, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(d_model, eps=1e-6)
        self.apply(_init_vit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens in [batch, seq, d_model], tokens out [batch, seq, d_model]."""
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _init_vit(module: nn.Module) -> None:
    """MAE/timm initialisation: xavier-uniform linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
