"""Portable selective scan (the S6 recurrence of Mamba) in plain PyTorch, with a memory-lean backward.

Semantics follow mamba-ssm's `selective_scan_fn` for real A and input-dependent B, C:

    delta <- softplus(delta + delta_bias)            (each part optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,   h_0 = 0     # [batch, d_inner, N]
    y_t    = sum_n C_t[n] * h_t[..., n] + D * u_t
    y     *= silu(z)                                  (optional)

`selective_scan` walks the sequence in chunks of `CHUNK_SIZE` steps. Per chunk it builds exp(delta * A) and
delta * B * u for those steps only (a few MiB, so they stay in the last-level cache), runs one in-place
`addcmul` per step for the state and contracts the chunk's states with C in one batched matmul. Autograd
state is only the inputs and the state at each chunk boundary; the backward recomputes a chunk's states from
its boundary, runs the adjoint recurrence backwards through the chunk and forms all gradients with
vectorised per-chunk products and reductions. Only exp of non-positive numbers (for A <= 0) is ever taken,
so long sequences and huge step sizes stay finite.

Internally the chunk tensors are laid out [steps, batch, N, d_inner] (d_inner innermost): the contraction
with C and the reductions over d_inner then become batched row-vector products, which are much faster on a
CPU than the [.., d_inner, N] layout where every reduction runs over a short trailing axis of size N.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["CHUNK_SIZE", "selective_scan", "selective_scan_reference"]

# Steps per chunk: large enough to amortise per-op overhead, small enough that the ~4 chunk buffers
# (4 x CHUNK_SIZE x batch x N x d_inner floats) stay in a 32 MiB L3 at Mamba-Tiny shapes.
CHUNK_SIZE = 16

_LOG2E = 1.0 / math.log(2.0)


def _check_shapes(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> None:
    """Raise a ValueError naming the first argument whose shape does not fit the others."""
    if u.dim() != 3:
        raise ValueError(f"u must be [batch, d_inner, L], got {tuple(u.shape)}")
    batch, d_inner, seq = u.shape
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(f"A must be [d_inner={d_inner}, N], got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported")
    n_state = A.shape[1]
    expected = {
        "delta": (delta, (batch, d_inner, seq)),
        "B": (B, (batch, n_state, seq)),
        "C": (C, (batch, n_state, seq)),
        "D": (D, (d_inner,)),
        "z": (z, (batch, d_inner, seq)),
        "delta_bias": (delta_bias, (d_inner,)),
    }
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Step-by-step selective scan with plain autograd: slow and memory-hungry, but obviously correct."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = u.dtype
    cd = _compute_dtype(u)
    u, delta, A, B, C = (t.to(cd) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d_inner, seq = u.shape
    h = u.new_zeros(batch, d_inner, A.shape[1])  # [batch, d_inner, N]
    ys = []
    for t in range(seq):
        decay = torch.exp(delta[:, :, t, None] * A)  # [batch, d_inner, N]
        drive = (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]  # [batch, d_inner, N]
        h = decay * h + drive
        ys.append((h * C[:, None, :, t]).sum(-1))  # [batch, d_inner]
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, d_inner, 0)  # [batch, d_inner, L]
    if D is not None:
        y = y + D.to(cd)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(out_dtype)


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    """Internal precision: float32, or float64 when the inputs are float64 (for gradcheck)."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _prepare_delta(
    delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool, cd: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Effective step sizes in dtype `cd` and, if softplus applies, its pre-activation (needed for the gradient)."""
    delta = delta.to(cd)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd)[:, None]
    if not delta_softplus:
        return delta, None
    return F.softplus(delta), delta


def _scan_forward(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk: int,
    keep_boundaries: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked forward scan on float32 inputs; returns y without D/z [batch, d_inner, L] and chunk states."""
    batch, d_inner, seq = u.shape
    n_state = A.shape[1]
    n_chunks = -(-seq // chunk)
    # Time-major copies so that every step and every chunk is one contiguous slab.
    delta_t = delta.permute(2, 0, 1).contiguous()  # [L, batch, d_inner]
    du_t = delta_t * u.permute(2, 0, 1)  # [L, batch, d_inner]
    B_t = B.permute(2, 0, 1).contiguous()  # [L, batch, N]
    C_t = C.permute(2, 0, 1).contiguous()  # [L, batch, N]
    A2 = (A * _LOG2E).t().contiguous()  # [N, d_inner]; exp2 is about twice as fast as exp on CPU

    k_max = min(chunk, seq)
    decay_buf = u.new_empty(k_max, batch, n_state, d_inner)
    state_buf = u.new_empty(k_max + 1, batch, n_state, d_inner)  # slot 0 holds the incoming state
    state_buf[0].zero_()
    # Per-step views made once: indexing inside the step loop costs as much as the step's arithmetic.
    decay_steps = list(decay_buf.unbind(0))
    state_steps = list(state_buf.unbind(0))
    y_t = u.new_empty(seq, batch, d_inner)  # [L, batch, d_inner]
    boundaries = u.new_empty(n_chunks, batch, n_state, d_inner) if keep_boundaries else None

    for c, t0 in enumerate(range(0, seq, chunk)):
        t1 = min(t0 + chunk, seq)
        k = t1 - t0
        if boundaries is not None:
            boundaries[c].copy_(state_buf[0])
        decay = decay_buf[:k]
        torch.mul(delta_t[t0:t1, :, None, :], A2, out=decay)  # [k, batch, N, d_inner]
        torch.exp2(decay, out=decay)
        states = state_buf[: k + 1]
        torch.mul(du_t[t0:t1, :, None, :], B_t[t0:t1, :, :, None], out=states[1:])  # drive term
        for i in range(k):
            torch.addcmul(state_steps[i + 1], decay_steps[i], state_steps[i], out=state_steps[i + 1])
        # y_t = C_t^T h_t as a batch of [1, N] @ [N, d_inner] products
        torch.bmm(
            C_t[t0:t1].view(k * batch, 1, n_state),
            states[1:].view(k * batch, n_state, d_inner),
            out=y_t[t0:t1].view(k * batch, 1, d_inner),
        )
        state_buf[0].copy_(states[k])
    return y_t.permute(1, 2, 0), boundaries  # [batch, d_inner, L]


def _scan_backward(
    grad_y: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    boundaries: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the plain scan (no D/z/bias/softplus) w.r.t. u, delta, A, B, C, all float32."""
    batch, d_inner, seq = u.shape
    n_state = A.shape[1]
    delta_t = delta.permute(2, 0, 1).contiguous()  # [L, batch, d_inner]
    u_t = u.permute(2, 0, 1).contiguous()  # [L, batch, d_inner]
    du_t = delta_t * u_t  # [L, batch, d_inner]
    B_t = B.permute(2, 0, 1).contiguous()  # [L, batch, N]
    C_t = C.permute(2, 0, 1).contiguous()  # [L, batch, N]
    gy_t = grad_y.permute(2, 0, 1).contiguous()  # [L, batch, d_inner]
    A_t = A.t().contiguous()  # [N, d_inner]
    A2 = A_t * _LOG2E  # [N, d_inner]

    k_max = min(chunk, seq)
    decay_buf = u.new_empty(k_max, batch, n_state, d_inner)
    state_buf = u.new_empty(k_max + 1, batch, n_state, d_inner)
    adj_buf = u.new_empty(k_max, batch, n_state, d_inner)
    decay_steps = list(decay_buf.unbind(0))
    state_steps = list(state_buf.unbind(0))
    adj_steps = list(adj_buf.unbind(0))
    # exp(delta_{t+1} A) * g_{t+1} from the first step of the chunk to the right
    carry = u.new_zeros(batch, n_state, d_inner)

    g_du_t = u.new_empty(seq, batch, d_inner)  # dL/d(delta * u)
    g_delta_t = u.new_empty(seq, batch, d_inner)  # dL/d(delta) through exp(delta * A) only
    g_B_t = u.new_empty(seq, batch, n_state)
    g_C_t = u.new_empty(seq, batch, n_state)
    g_A_t = u.new_zeros(n_state, d_inner)

    starts = list(range(0, seq, chunk))
    for c in reversed(range(len(starts))):
        t0 = starts[c]
        t1 = min(t0 + chunk, seq)
        k = t1 - t0
        rows = k * batch
        # Recompute the chunk's decays and states from its boundary state.
        decay = decay_buf[:k]
        torch.mul(delta_t[t0:t1, :, None, :], A2, out=decay)  # [k, batch, N, d_inner]
        torch.exp2(decay, out=decay)
        states = state_buf[: k + 1]
        states[0].copy_(boundaries[c])
        torch.mul(du_t[t0:t1, :, None, :], B_t[t0:t1, :, :, None], out=states[1:])
        for i in range(k):
            torch.addcmul(state_steps[i + 1], decay_steps[i], state_steps[i], out=state_steps[i + 1])

        # Adjoint g_t = dL/dh_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}, backwards through the chunk.
        adj = adj_buf[:k]
        torch.mul(gy_t[t0:t1, :, None, :], C_t[t0:t1, :, :, None], out=adj)  # [k, batch, N, d_inner]
        adj[k - 1].add_(carry)
        for i in range(k - 2, -1, -1):
            torch.addcmul(adj_steps[i], decay_steps[i + 1], adj_steps[i + 1], out=adj_steps[i])

        gy_rows = gy_t[t0:t1].view(rows, 1, d_inner)
        adj_rows = adj.view(rows, n_state, d_inner)
        # dL/dC_t = h_t dy_t ; dL/dB_t = g_t (delta_t u_t) ; dL/d(delta_t u_t) = B_t^T g_t
        torch.bmm(gy_rows, states[1:].view(rows, n_state, d_inner).transpose(1, 2),
                  out=g_C_t[t0:t1].view(rows, 1, n_state))  # fmt: skip
        torch.bmm(du_t[t0:t1].view(rows, 1, d_inner), adj_rows.transpose(1, 2),
                  out=g_B_t[t0:t1].view(rows, 1, n_state))  # fmt: skip
        torch.bmm(B_t[t0:t1].view(rows, 1, n_state), adj_rows, out=g_du_t[t0:t1].view(rows, 1, d_inner))

        # dL/d(delta_t A) = g_t * exp(delta_t A) * h_{t-1}; decay_buf is free to hold it now.
        torch.mul(decay, adj, out=decay)
        carry.copy_(decay[0])
        decay.mul_(states[:k])
        torch.mul(decay, A_t, out=adj)  # adj_buf is free as well
        torch.sum(adj, dim=2, out=g_delta_t[t0:t1])
        torch.mul(decay, delta_t[t0:t1, :, None, :], out=adj)
        g_A_t += adj.view(rows, n_state, d_inner).sum(0)

    g_u_t = g_du_t * delta_t
    g_delta_t.addcmul_(g_du_t, u_t)
    return (
        g_u_t.permute(1, 2, 0),  # [batch, d_inner, L]
        g_delta_t.permute(1, 2, 0),  # [batch, d_inner, L]
        g_A_t.t(),  # [d_inner, N]
        g_B_t.permute(1, 2, 0),  # [batch, N, L]
        g_C_t.permute(1, 2, 0),  # [batch, N, L]
    )


class _SelectiveScanFn(torch.autograd.Function):
    """Chunked selective scan whose backward keeps only chunk-boundary states."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None,
        z: torch.Tensor | None,
        delta_bias: torch.Tensor | None,
        delta_softplus: bool,
        chunk: int,
    ) -> torch.Tensor:
        """Run the chunked scan and save inputs plus boundary states."""
        cd = _compute_dtype(u)
        with torch.autocast(device_type=u.device.type, enabled=False):
            uf = u.to(cd)
            delta_eff, _ = _prepare_delta(delta, delta_bias, delta_softplus, cd)
            y, boundaries = _scan_forward(uf, delta_eff, A.to(cd), B.to(cd), C.to(cd), chunk, True)
            if D is not None:
                y = torch.addcmul(y, D.to(cd)[:, None], uf)
            out = y * F.silu(z.to(cd)) if z is not None else y
        ctx.delta_softplus = delta_softplus
        ctx.chunk = chunk
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, boundaries, y if z is not None else None)
        return out.to(u.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:
        """Recompute chunk states from the saved boundaries and return gradients for every input."""
        u, delta, A, B, C, D, z, delta_bias, boundaries, y = ctx.saved_tensors
        cd = _compute_dtype(u)
        with torch.autocast(device_type=u.device.type, enabled=False):
            uf = u.to(cd)
            grad_out = grad_out.to(cd)
            grad_z = None
            if z is not None:
                zf = z.to(cd)
                sig = torch.sigmoid(zf)
                grad_y = grad_out * zf * sig  # silu(z) = z * sigmoid(z)
                # d silu / dz = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
                grad_z = grad_out * y * sig * (1 + zf * (1 - sig))
            else:
                grad_y = grad_out
            grad_D = None
            if D is not None:
                grad_D = (grad_y * uf).sum(dim=(0, 2))
            delta_eff, pre_softplus = _prepare_delta(delta, delta_bias, ctx.delta_softplus, cd)
            g_u, g_delta, g_A, g_B, g_C = _scan_backward(
                grad_y, uf, delta_eff, A.to(cd), B.to(cd), C.to(cd), boundaries, ctx.chunk
            )
            if D is not None:
                g_u = torch.addcmul(g_u, grad_y, D.to(cd)[:, None])
            if pre_softplus is not None:
                g_delta = g_delta * torch.sigmoid(pre_softplus)
            grad_bias = g_delta.sum(dim=(0, 2)) if delta_bias is not None else None

        grads = (g_u, g_delta, g_A, g_B, g_C, grad_D, grad_z, grad_bias)
        cast = tuple(
            g.to(dtype) if g is not None and need else None
            for g, dtype, need in zip(grads, ctx.dtypes, ctx.needs_input_grad[:8], strict=True)
        )
        return (*cast, None, None)


def _selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """`selective_scan` with an explicit chunk size (for benchmarks and tests)."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if u.shape[-1] == 0:
        return u.new_zeros(u.shape)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _SelectiveScanFn.apply(*inputs, delta_softplus, chunk_size)
    # Inference: no boundary states, no saved tensors.
    cd = _compute_dtype(u)
    with torch.autocast(device_type=u.device.type, enabled=False):
        uf = u.to(cd)
        delta_eff, _ = _prepare_delta(delta, delta_bias, delta_softplus, cd)
        y, _ = _scan_forward(uf, delta_eff, A.to(cd), B.to(cd), C.to(cd), chunk_size, False)
        if D is not None:
            y = torch.addcmul(y, D.to(cd)[:, None], uf)
        if z is not None:
            y = y * F.silu(z.to(cd))
    return y.to(u.dtype)


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
) -> torch.Tensor:
    """Chunked, memory-lean selective scan with the semantics of mamba-ssm's `selective_scan_fn`."""
    return _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
