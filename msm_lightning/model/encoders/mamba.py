"""SSAM encoder: residual Mamba blocks with a portable PyTorch mixer and optional fused CUDA kernels.

The mixer keeps the parameter names and shapes of `mamba_ssm.modules.mamba_simple.Mamba`, so a state
dict moves between the fused path (mamba-ssm installed, tensors on a GPU) and the portable path unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from msm_lightning.model.encoders.selective_scan import fused_path, selective_scan
from msm_lightning.model.triton_guard import refuse_triton_beside_tensorflow

refuse_triton_beside_tensorflow()
try:  # The fused kernels import only where CUDA and the `cuda` extra are installed.
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
except Exception:
    causal_conv1d_fn = mamba_inner_fn = None

# mamba_inner_fn runs its convolution through causal-conv1d, so the fused path needs both packages.
FUSED_KERNELS_AVAILABLE = mamba_inner_fn is not None and causal_conv1d_fn is not None


class MambaMixer(nn.Module):
    """Selective state-space mixer (Mamba-1) with `forward` choosing the fused or the portable path."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 24,
        d_conv: int = 4,
        expand: int = 3,
        dt_rank: int | None = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        use_fused_kernels: bool = True,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        # The one switch for the CUDA-only path; it is taken only when the kernels import and x is on a GPU.
        self.use_fused_kernels = use_fused_kernels

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        # Consumed by the optimiser set-up: the SSM's A and D are not weight-decayed (as in mamba-ssm).
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.reset_parameters(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def reset_parameters(
        self, dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4
    ) -> None:
        """Mamba initialisation: S4D-real A, unit D, and step sizes log-uniform in [dt_min, dt_max]."""
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        # Bias is softplus^-1(dt), so that softplus(dt_proj(...) + bias) starts at dt.
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_log.copy_(torch.log(a).expand(self.d_inner, -1))
        self.D.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, d_model] -> [batch, seq, d_model]."""
        xz = self.in_proj(x)  # [batch, seq, 2 * d_inner]
        if fused_path(self.use_fused_kernels, FUSED_KERNELS_AVAILABLE, x.device.type):
            return self.forward_fused(xz.transpose(1, 2))
        return self.forward_portable(xz)

    def forward_fused(self, xz: torch.Tensor) -> torch.Tensor:
        """Fused CUDA path: conv, projections, scan and gating in mamba-ssm's kernels."""
        A = -torch.exp(self.A_log.float())  # [d_inner, d_state]
        out = mamba_inner_fn(
            xz,
            self.conv1d.weight,
            self.conv1d.bias,
            self.x_proj.weight,
            self.dt_proj.weight,
            self.out_proj.weight,
            self.out_proj.bias,
            A,
            None,  # B and C come from x_proj (input-dependent)
            None,
            self.D.float(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return out  # [batch, seq, d_model]

    def forward_portable(self, xz: torch.Tensor) -> torch.Tensor:
        """Portable PyTorch path on in_proj's output [batch, seq, 2 * d_inner]: what `forward_fused` computes.

        Everything stays time-major ([batch, seq, channels] in memory): the linear layers read and write
        that layout, and the scan takes [batch, channels, seq] views of it, so nothing is transposed.
        """
        x, z = xz.chunk(2, dim=-1)  # [batch, seq, d_inner] each
        # 1. causal depthwise convolution and SiLU
        x = F.silu(causal_depthwise_conv(x, self.conv1d.weight, self.conv1d.bias))
        # 2. input-dependent step size, B and C
        x_dbl = self.x_proj(x)  # [batch, seq, dt_rank + 2 * d_state]
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ self.dt_proj.weight.t()  # [batch, seq, d_inner], bias added in the scan
        # 3. selective scan with D skip and SiLU(z) gate
        A = -torch.exp(self.A_log.float())  # [d_inner, d_state]
        y = selective_scan(
            x.transpose(1, 2),  # [batch, d_inner, seq] views from here on
            dt.transpose(1, 2),
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            self.D.float(),
            z=z.transpose(1, 2),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            use_kernel=self.use_fused_kernels,
        )  # [batch, d_inner, seq]
        # 4. output projection
        return self.out_proj(y.transpose(1, 2))


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise convolution of time-major x [batch, seq, channels]; Conv1d weight [channels, 1, k].

    out[t] = bias + sum_j weight[:, 0, j] * x[t - (k - 1) + j], with zeros before the start: the first `seq`
    outputs of `nn.Conv1d(groups=channels, padding=k - 1)`. A few shifted multiply-adds on the time-major
    layout are several times faster on a CPU than the depthwise Conv1d on the transposed one.
    """
    k = weight.shape[-1]
    seq = x.shape[1]
    w = weight[:, 0, :].t()  # [k, channels]
    padded = F.pad(x, (0, 0, k - 1, 0))  # [batch, k - 1 + seq, channels]
    out = padded[:, k - 1 :] * w[k - 1]
    if bias is not None:
        out = out + bias
    for j in range(k - 1):
        out = torch.addcmul(out, padded[:, j : j + seq], w[j])
    return out


class MambaBlock(nn.Module):
    """Residual block: x + mixer(LayerNorm(x)), no MLP."""

    def __init__(self, d_model: int, norm_eps: float = 1e-5, **mixer_kwargs: object) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.mixer = MambaMixer(d_model, **mixer_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, d_model] -> [batch, seq, d_model]."""
        return x + self.mixer(self.norm(x))


class MambaEncoder(nn.Module):
    """A stack of `depth` unidirectional Mamba blocks and a final LayerNorm."""

    def __init__(
        self,
        d_model: int,
        depth: int,
        d_state: int = 24,
        d_conv: int = 4,
        expand: int = 3,
        use_fused_kernels: bool = True,
        max_tokens: int = 0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        del max_tokens  # recurrent: any length
        # LayerNorm eps of the blocks and the final norm: torch's 1e-5 here, 1e-6 in the SSAM authors'
        # code, which their converted weights (msm convert) set.
        self.blocks = nn.ModuleList(
            MambaBlock(
                d_model,
                norm_eps,
                d_state=d_state,
                d_conv=d_conv,
                expand=expand,
                use_fused_kernels=use_fused_kernels,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d_model, eps=norm_eps)
        self._rescale_out_proj(depth)

    @torch.no_grad()
    def _rescale_out_proj(self, depth: int) -> None:
        """GPT-2 style: shrink each residual branch's output projection by 1/sqrt(depth) at init."""
        for block in self.blocks:
            nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
            block.mixer.out_proj.weight /= math.sqrt(depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens in [batch, seq, d_model], tokens out [batch, seq, d_model]."""
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
