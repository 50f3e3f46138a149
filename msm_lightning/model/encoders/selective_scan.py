"""The selective scan (the S6 recurrence of Mamba): which implementation runs it, and its step-by-step oracle.

Semantics follow mamba-ssm's `selective_scan_fn` for real A and input-dependent B, C:

    delta <- softplus(delta + delta_bias)                                (each part optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,  h_0 = 0  # [batch, d_inner, N]
    y_t    = sum_n C_t[n] * h_t[..., n] + D * u_t
    y     *= silu(z)                                                     (optional)

Three implementations compute it, and the rules here choose between them:

- mamba-ssm's fused CUDA kernels (`fused_path`): tensors on a GPU and the `cuda` extra installed. They fuse
  the whole Mamba mixer around the scan, so `MambaMixer.forward` asks before it computes the scan's inputs.
- the compiled CPU kernel (`cpu_scan.py`, `kernel_applies`): CPU tensors other than float64, when a C
  compiler can build it.
- the chunked PyTorch scan (`torch_scan.py`): everywhere else (a GPU without mamba-ssm, float64 for
  gradcheck, no compiler, the switch off).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from msm_lightning.model.encoders.cpu_scan import ScanKernel, kernel_selective_scan, load_kernel
from msm_lightning.model.encoders.scan_inputs import ScanInputs, takes_arguments_of
from msm_lightning.model.encoders.torch_scan import chunked_selective_scan

__all__ = ["fused_path", "kernel_applies", "selective_scan", "selective_scan_reference"]

_warned_fallback = False


def fused_path(requested: bool, available: bool, device_type: str) -> bool:
    """Whether a call takes the fused mamba-ssm path: requested, kernels imported, tensors on a GPU."""
    global _warned_fallback
    if not (requested and device_type == "cuda"):
        return False
    if not available and not _warned_fallback:
        warnings.warn(
            "mamba-ssm kernels are not installed (pip install 'msm-lightning[cuda]'): "
            "the Mamba encoder runs the slower portable PyTorch scan on the GPU",
            stacklevel=3,
        )
        _warned_fallback = True
    return available


def kernel_applies(u: torch.Tensor, A: torch.Tensor, use_kernel: bool) -> ScanKernel | None:
    """The compiled CPU kernel if this call can use it: requested, CPU tensors, not float64, it builds."""
    if not use_kernel or u.device.type != "cpu" or u.dtype == torch.float64:
        return None
    kernel = load_kernel()
    return kernel if kernel is not None and A.shape[1] <= kernel.max_state else None


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    use_kernel: bool = True,
) -> torch.Tensor:
    """Selective scan with the semantics of mamba-ssm's `selective_scan_fn`, in u's dtype.

    On the CPU with `use_kernel`, the compiled kernel of `cpu_scan.py` runs the recurrence; otherwise (and
    when it cannot be built) the chunked, memory-lean PyTorch scan of `torch_scan.py` does.
    """
    x = ScanInputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    kernel = kernel_applies(u, A, use_kernel)
    if kernel is not None and x.seq > 0:
        return kernel_selective_scan(kernel, x)
    return chunked_selective_scan(x)


@takes_arguments_of(ScanInputs)
def selective_scan_reference(x: ScanInputs) -> torch.Tensor:
    """Step-by-step selective scan with plain autograd: slow and memory-hungry, but obviously correct.

    Called with the arguments of `selective_scan` but `use_kernel`.
    """
    cd = x.compute_dtype
    u, delta, A, B, C = (t.to(cd) for t in (x.u, x.delta, x.A, x.B, x.C))
    if x.delta_bias is not None:
        delta = delta + x.delta_bias.to(cd)[:, None]
    if x.delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(x.batch, x.d_inner, x.n_state)  # [batch, d_inner, N]
    ys = []
    for t in range(x.seq):
        decay = torch.exp(delta[:, :, t, None] * A)  # [batch, d_inner, N]
        drive = (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]  # [batch, d_inner, N]
        h = decay * h + drive
        ys.append((h * C[:, None, :, t]).sum(-1))  # [batch, d_inner]
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(x.batch, x.d_inner, 0)  # [batch, d_inner, L]
    if x.D is not None:
        y = y + x.D.to(cd)[:, None] * u
    if x.z is not None:
        y = y * F.silu(x.z.to(cd))
    return y.to(x.u.dtype)
