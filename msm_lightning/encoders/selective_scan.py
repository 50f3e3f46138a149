"""Portable selective scan (the S6 recurrence of Mamba) in plain PyTorch, with a memory-lean backward.

Semantics follow mamba-ssm's `selective_scan_fn` for real A and input-dependent B, C:

    delta <- softplus(delta + delta_bias)                                (each part optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,  h_0 = 0  # [batch, d_inner, N]
    y_t    = sum_n C_t[n] * h_t[..., n] + D * u_t
    y     *= silu(z)                                                     (optional)

`selective_scan` walks the sequence in chunks of `CHUNK_SIZE` steps. Per chunk it builds exp(delta * A) and
delta * B * u for those steps only (a few MiB, so they stay in the last-level cache), runs one in-place
`addcmul` per step for the state and contracts the chunk's states with C in one batched matmul. Autograd
keeps only the (time-major, float32) inputs and the state at each chunk boundary; the backward recomputes a
chunk's states from its boundary, runs the adjoint recurrence backwards through the chunk and forms all
gradients with vectorised per-chunk products and reductions. Only exp of non-positive numbers (for A <= 0)
is ever taken, so long sequences and huge step sizes stay finite.

Layout: everything internal is time-major, [L, batch, channels], and the chunk tensors are
[steps, batch, N, d_inner] with d_inner innermost. Then every step and every chunk is one contiguous slab,
the contraction with C and the reductions over d_inner are batched row-vector products, and elementwise ops
never mix memory layouts (which makes PyTorch's CPU kernels several times slower).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["CHUNK_SIZE", "selective_scan", "selective_scan_reference"]

# Steps per chunk: large enough to amortise per-op overhead, small enough that the chunk buffers
# (3 x CHUNK_SIZE x batch x N x d_inner floats) stay in the last-level cache at Mamba-Tiny shapes.
CHUNK_SIZE = 8

# exp2 is about twice as fast as exp in PyTorch's CPU kernels, so the decays use exp2(delta * A * log2(e)).
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
    if A.is_complex():
        raise ValueError("complex A is not supported by the portable selective scan")
    batch, d_inner, seq = u.shape
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(f"A must be [d_inner={d_inner}, N], got {tuple(A.shape)}")
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


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    """Internal precision: float32, or float64 when the inputs are float64 (so gradcheck can run)."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


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
    cd = _compute_dtype(u)
    out_dtype = u.dtype
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


def _to_time_major(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, C, L] in any layout and dtype -> contiguous [L, batch, C] in `dtype` (one copy)."""
    out = torch.empty(x.shape[2], x.shape[0], x.shape[1], dtype=dtype, device=x.device)
    out.copy_(x.permute(2, 0, 1))
    return out  # [L, batch, C]


def _layout(x: torch.Tensor | None) -> tuple[torch.dtype, tuple[int, ...]] | None:
    """dtype and dimension order (outermost first, by stride) of a tensor, to lay out its gradient alike."""
    if x is None:
        return None
    order = sorted(range(x.dim()), key=lambda i: (-x.stride(i), i))
    return x.dtype, tuple(order)


def _from_time_major(x_t: torch.Tensor, layout: tuple[torch.dtype, tuple[int, ...]]) -> torch.Tensor:
    """[L, batch, C] -> dense [batch, C, L] with the given dtype and dimension order (one copy)."""
    dtype, order = layout
    shape = (x_t.shape[1], x_t.shape[2], x_t.shape[0])
    # Matching the caller's layout (typically a transposed [batch, L, C]) keeps its next ops fast.
    out = torch.empty([shape[i] for i in order], dtype=dtype, device=x_t.device)
    out = out.permute([order.index(i) for i in range(3)])
    out.copy_(x_t.permute(1, 2, 0))
    return out  # [batch, C, L]


def _scan_chunks(
    u_t: torch.Tensor,
    delta_t: torch.Tensor,
    A: torch.Tensor,
    B_t: torch.Tensor,
    C_t: torch.Tensor,
    chunk: int,
    keep_boundaries: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked forward scan on time-major inputs; returns y_t [L, batch, d_inner] and chunk-start states."""
    seq, batch, d_inner = u_t.shape
    n_state = A.shape[1]
    n_chunks = -(-seq // chunk)
    A2 = (A * _LOG2E).t().contiguous()  # [N, d_inner]

    k_max = min(chunk, seq)
    du_buf = u_t.new_empty(k_max, batch, d_inner)
    decay_buf = u_t.new_empty(k_max, batch, n_state, d_inner)
    state_buf = u_t.new_empty(k_max + 1, batch, n_state, d_inner)  # slot 0 holds the incoming state
    state_buf[0].zero_()
    # Per-step views made once: indexing inside the step loop costs as much as the step's arithmetic.
    decay_steps = decay_buf.unbind(0)
    state_steps = state_buf.unbind(0)
    y_t = u_t.new_empty(seq, batch, d_inner)
    boundaries = u_t.new_empty(n_chunks, batch, n_state, d_inner) if keep_boundaries else None

    for c in range(n_chunks):
        t0 = c * chunk
        t1 = min(t0 + chunk, seq)
        k = t1 - t0
        if boundaries is not None:
            boundaries[c].copy_(state_buf[0])
        decay = decay_buf[:k]  # [k, batch, N, d_inner]
        torch.mul(delta_t[t0:t1, :, None, :], A2, out=decay)
        torch.exp2(decay, out=decay)
        states = state_buf[: k + 1]  # [k + 1, batch, N, d_inner]
        du = torch.mul(delta_t[t0:t1], u_t[t0:t1], out=du_buf[:k])  # [k, batch, d_inner]
        # The rank-1 drive B_t (delta_t u_t)^T is added by a broadcast addcmul instead of being
        # materialised for the chunk: that saves writing and re-reading a full chunk-sized tensor.
        B_col = B_t[t0:t1, :, :, None]  # [k, batch, N, 1]
        du_row = du[:, :, None, :]  # [k, batch, 1, d_inner]
        for i in range(k):
            torch.mul(decay_steps[i], state_steps[i], out=state_steps[i + 1])
            state_steps[i + 1].addcmul_(B_col[i], du_row[i])
        # y_t = C_t^T h_t as a batch of [1, N] @ [N, d_inner] products
        rows = k * batch
        torch.bmm(
            C_t[t0:t1].view(rows, 1, n_state),
            states[1:].view(rows, n_state, d_inner),
            out=y_t[t0:t1].view(rows, 1, d_inner),
        )
        state_buf[0].copy_(states[k])
    return y_t, boundaries


def _scan_chunks_backward(
    gy_t: torch.Tensor,
    u_t: torch.Tensor,
    delta_t: torch.Tensor,
    A: torch.Tensor,
    B_t: torch.Tensor,
    C_t: torch.Tensor,
    boundaries: torch.Tensor,
    chunk: int,
    want_D: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of y_t w.r.t. u_t, delta_t, A, B_t, C_t (time-major) and, if asked, sum(gy_t * u_t)."""
    seq, batch, d_inner = u_t.shape
    n_state = A.shape[1]
    n_chunks = boundaries.shape[0]
    A_t = A.t().contiguous()  # [N, d_inner]
    A2 = A_t * _LOG2E  # [N, d_inner]

    k_max = min(chunk, seq)
    du_buf = u_t.new_empty(k_max, batch, d_inner)
    decay_buf = u_t.new_empty(k_max, batch, n_state, d_inner)
    state_buf = u_t.new_empty(k_max + 1, batch, n_state, d_inner)  # slot 0: state before the chunk
    adj_buf = u_t.new_empty(k_max, batch, n_state, d_inner)
    decay_steps = decay_buf.unbind(0)
    state_steps = state_buf.unbind(0)
    adj_steps = adj_buf.unbind(0)
    # exp(delta_{t+1} A) * g_{t+1} for the first step t + 1 of the chunk to the right
    carry = u_t.new_zeros(batch, n_state, d_inner)

    g_du_t = u_t.new_empty(seq, batch, d_inner)  # dL/d(delta * u)
    g_delta_t = u_t.new_empty(seq, batch, d_inner)  # dL/d(delta) through exp(delta * A)
    g_B_t = u_t.new_empty(seq, batch, n_state)
    g_C_t = u_t.new_empty(seq, batch, n_state)
    g_A_t = u_t.new_zeros(n_state, d_inner)
    g_D = u_t.new_zeros(d_inner) if want_D else None

    for c in reversed(range(n_chunks)):
        t0 = c * chunk
        t1 = min(t0 + chunk, seq)
        k = t1 - t0
        rows = k * batch
        # Recompute the chunk's decays and states from its boundary state.
        decay = decay_buf[:k]  # [k, batch, N, d_inner]
        torch.mul(delta_t[t0:t1, :, None, :], A2, out=decay)
        torch.exp2(decay, out=decay)
        states = state_buf[: k + 1]  # [k + 1, batch, N, d_inner]
        states[0].copy_(boundaries[c])
        du = torch.mul(delta_t[t0:t1], u_t[t0:t1], out=du_buf[:k])  # [k, batch, d_inner]
        B_col = B_t[t0:t1, :, :, None]  # [k, batch, N, 1]
        du_row = du[:, :, None, :]  # [k, batch, 1, d_inner]
        for i in range(k):
            torch.mul(decay_steps[i], state_steps[i], out=state_steps[i + 1])
            state_steps[i + 1].addcmul_(B_col[i], du_row[i])

        # Adjoint g_t = dL/dh_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}, backwards through the chunk.
        # Each product exp(delta_t A) g_t overwrites its decay: it is also the carry into the chunk to
        # the left and a factor of dL/d(delta_t A), and it is formed while g_t is still in cache.
        adj = adj_buf[:k]  # [k, batch, N, d_inner]
        C_col = C_t[t0:t1, :, :, None]  # [k, batch, N, 1]
        gy_row = gy_t[t0:t1, :, None, :]  # [k, batch, 1, d_inner]
        torch.addcmul(carry, C_col[k - 1], gy_row[k - 1], out=adj_steps[k - 1])
        for i in range(k - 1, 0, -1):
            torch.addcmul(
                decay_steps[i].mul_(adj_steps[i]), C_col[i - 1], gy_row[i - 1], out=adj_steps[i - 1]
            )
        carry.copy_(decay_steps[0].mul_(adj_steps[0]))

        # dL/dC_t = h_t dy_t ; dL/dB_t = g_t (delta_t u_t) ; dL/d(delta_t u_t) = B_t^T g_t
        adj_rows = adj.view(rows, n_state, d_inner)
        torch.bmm(
            gy_t[t0:t1].view(rows, 1, d_inner),
            states[1:].view(rows, n_state, d_inner).transpose(1, 2),
            out=g_C_t[t0:t1].view(rows, 1, n_state),
        )
        torch.bmm(
            du.view(rows, 1, d_inner),
            adj_rows.transpose(1, 2),
            out=g_B_t[t0:t1].view(rows, 1, n_state),
        )
        torch.bmm(B_t[t0:t1].view(rows, 1, n_state), adj_rows, out=g_du_t[t0:t1].view(rows, 1, d_inner))

        # X_t = dL/d(delta_t A) = exp(delta_t A) g_t * h_{t-1}, in decay_buf.
        decay.mul_(states[:k])
        torch.mul(decay, A_t, out=adj)  # adj_buf is free as well
        torch.sum(adj, dim=2, out=g_delta_t[t0:t1])
        torch.mul(decay, delta_t[t0:t1, :, None, :], out=adj)
        g_A_t += adj.view(rows, n_state, d_inner).sum(0)
        if g_D is not None:
            g_D += torch.mul(gy_t[t0:t1], u_t[t0:t1], out=du).sum(dim=(0, 1))

    g_delta_t.addcmul_(g_du_t, u_t)
    g_u_t = g_du_t.mul_(delta_t)
    return g_u_t, g_delta_t, g_A_t.t(), g_B_t, g_C_t, g_D


def _prepare(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Time-major compute-dtype copies: u_t, delta_t, softplus input (or None), A, B_t, C_t."""
    cd = _compute_dtype(u)
    u_t = _to_time_major(u, cd)  # [L, batch, d_inner]
    delta_t = _to_time_major(delta, cd)  # [L, batch, d_inner]
    if delta_bias is not None:
        delta_t += delta_bias.to(cd)
    pre_t = None
    if delta_softplus:
        pre_t = delta_t
        delta_t = F.softplus(pre_t)
    return u_t, delta_t, pre_t, A.to(cd), _to_time_major(B, cd), _to_time_major(C, cd)


def _epilogue(
    y_t: torch.Tensor, u_t: torch.Tensor, D: torch.Tensor | None, z_t: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the D skip in place and apply the SiLU(z) gate; returns (gated output, pre-gate y)."""
    if D is not None:
        y_t.addcmul_(u_t, D.to(y_t.dtype))
    if z_t is None:
        return y_t, y_t
    return F.silu(z_t).mul_(y_t), y_t


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
        """Run the chunked scan and save time-major inputs plus boundary states."""
        with torch.autocast(device_type=u.device.type, enabled=False):
            u_t, delta_t, pre_t, Af, B_t, C_t = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
            y_t, boundaries = _scan_chunks(u_t, delta_t, Af, B_t, C_t, chunk, keep_boundaries=True)
            z_t = _to_time_major(z, u_t.dtype) if z is not None else None
            out_t, y_t = _epilogue(y_t, u_t, D, z_t)
            out = _from_time_major(out_t, _layout(u))
        ctx.chunk = chunk
        ctx.has_bias = delta_bias is not None
        ctx.layouts = tuple(_layout(t) for t in (u, delta, A, B, C, D, z, delta_bias))
        ctx.save_for_backward(
            u_t, delta_t, pre_t, Af, B_t, C_t, D, z_t, y_t if z is not None else None, boundaries
        )
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:
        """Recompute chunk states from the saved boundaries and return gradients for every input."""
        u_t, delta_t, pre_t, Af, B_t, C_t, D, z_t, y_t, boundaries = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with torch.autocast(device_type=u_t.device.type, enabled=False):
            go_t = _to_time_major(grad_out, u_t.dtype)  # [L, batch, d_inner]
            g_z_t = None
            if z_t is not None:
                sig = torch.sigmoid(z_t)
                silu = z_t * sig
                if needs[6]:
                    # d silu / dz = sigmoid(z) * (1 + z * (1 - sigmoid(z))) = sig + silu - silu * sig
                    g_z_t = torch.addcmul(silu, silu, sig, value=-1).add_(sig).mul_(go_t).mul_(y_t)
                del sig
                gy_t = silu.mul_(go_t)
            else:
                gy_t = go_t
            g_u_t, g_delta_t, g_A, g_B_t, g_C_t, g_D = _scan_chunks_backward(
                gy_t, u_t, delta_t, Af, B_t, C_t, boundaries, ctx.chunk, want_D=D is not None
            )
            if D is not None:
                g_u_t.addcmul_(gy_t, D.to(gy_t.dtype))
            del gy_t
            if pre_t is not None:
                g_delta_t.mul_(torch.sigmoid(pre_t, out=go_t))  # softplus' = sigmoid; go_t is spent
            g_bias = g_delta_t.sum(dim=(0, 1)) if ctx.has_bias else None

        lay = ctx.layouts
        grads = (
            _from_time_major(g_u_t, lay[0]) if needs[0] else None,
            _from_time_major(g_delta_t, lay[1]) if needs[1] else None,
            g_A.to(lay[2][0]) if needs[2] else None,
            _from_time_major(g_B_t, lay[3]) if needs[3] else None,
            _from_time_major(g_C_t, lay[4]) if needs[4] else None,
            g_D.to(lay[5][0]) if needs[5] and g_D is not None else None,
            _from_time_major(g_z_t, lay[6]) if g_z_t is not None else None,
            g_bias.to(lay[7][0]) if needs[7] and g_bias is not None else None,
        )
        return (*grads, None, None)


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
        return torch.zeros_like(u)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _SelectiveScanFn.apply(*inputs, delta_softplus, chunk_size)
    # Inference: no boundary states and nothing saved.
    with torch.autocast(device_type=u.device.type, enabled=False):
        u_t, delta_t, _, Af, B_t, C_t = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
        y_t, _ = _scan_chunks(u_t, delta_t, Af, B_t, C_t, chunk_size, keep_boundaries=False)
        z_t = _to_time_major(z, u_t.dtype) if z is not None else None
        out_t, _ = _epilogue(y_t, u_t, D, z_t)
        return _from_time_major(out_t, _layout(u))


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
