"""Portable selective scan in plain PyTorch, chunk by chunk, with a memory-lean backward.

The semantics are those of `selective_scan.py`. `chunked_selective_scan` walks the sequence in chunks of a
few steps (`default_chunk_size`: 8 at Mamba-Tiny training shapes) and does all of its work chunk by chunk,
in a few chunk-sized buffers that are reused for every chunk (so they stay in the last-level cache):

- forward, per chunk: step sizes (bias, softplus), exp(delta A) for the chunk's steps in one vectorised op,
  then per step one multiply and one broadcast addcmul for h_t = exp(delta_t A) h_{t-1} + B_t (delta_t u_t),
  then the chunk's outputs C_t^T h_t in one batched matmul, D skip and SiLU gate, written straight into the
  output. Autograd keeps only the inputs themselves and the state entering each chunk.
- backward, chunks in reverse: recompute the chunk's decays and states from its entry state, run the adjoint
  g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1} backwards through the chunk (one multiply + one addcmul per
  step), then every gradient (u, delta through softplus and bias, A, B, C, D, z) with per-chunk batched
  matmuls, products and reductions, written straight into the gradient tensors.

Only exp of non-positive numbers (for A <= 0) is ever taken, and nothing is divided, so long sequences and
huge step sizes stay finite. No full-sequence temporaries are created: besides the outputs and gradients, a
call allocates only the chunk buffers and the boundary states.

Layout: internally time-major. [batch, C, L] inputs are read as [L, batch, C] views, and the chunk buffers
are [steps, batch, N, d_inner] with d_inner innermost, so every step is one contiguous slab, the contraction
with C and the reductions over d_inner are batched row-vector products, and reductions over N run across
rows. The output is [batch, d_inner, L] laid out as [batch, L, d_inner] in memory (what Mamba's out_proj
consumes after a transpose); gradients have the memory layout of their inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from msm_lightning.model.encoders.scan_inputs import (
    ScanInputs,
    empty_like_layout,
    empty_output,
    input_grads,
    needs_grad,
)

__all__ = ["chunked_selective_scan", "default_chunk_size"]

# Budget for the three [chunk, batch, N, d_inner] float32 work buffers. Chunks should be long enough to
# amortise the per-chunk op overhead but short enough that the buffers stay in the last-level cache: on a
# 2-core AVX2 VM with a shared 32 MiB L3, 8 steps at batch 8, N 24, d_inner 576 (10.1 MiB) measured best.
_CHUNK_BYTES = 11 * 2**20
_CHUNK_RANGE = (4, 64)

# exp2 is about twice as fast as exp in PyTorch's CPU kernels, so the decays use exp2(delta * A * log2(e)).
_LOG2E = 1.0 / math.log(2.0)


def default_chunk_size(batch: int, n_state: int, d_inner: int) -> int:
    """Steps per chunk such that the chunk work buffers fit the cache budget, clamped to [4, 64]."""
    per_step = 3 * batch * n_state * d_inner * 4  # bytes of one step in the three buffers
    return max(_CHUNK_RANGE[0], min(_CHUNK_RANGE[1], _CHUNK_BYTES // max(per_step, 1)))


def _to_time_major(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[batch, C, L] in any layout and dtype -> contiguous [L, batch, C] in `dtype` (one copy)."""
    out = torch.empty(x.shape[2], x.shape[0], x.shape[1], dtype=dtype, device=x.device)
    out.copy_(x.permute(2, 0, 1))
    return out  # [L, batch, C]


class _Buffers:
    """Chunk-sized, time-major work buffers, allocated once per call and reused by every chunk."""

    def __init__(self, k_max: int, batch: int, n_state: int, d_inner: int, like: torch.Tensor, adjoint: bool):
        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=like.dtype, device=like.device)

        rows = (k_max, batch, d_inner)
        # Contiguous compute-dtype copies of the chunk's slices of the caller's tensors, which may be
        # strided (e.g. u straight from the convolution) or bf16; every later op then reads contiguous rows.
        self.u, self.z = empty(*rows), empty(*rows)
        self.pre, self.delta = empty(*rows), empty(*rows)  # delta + bias; step sizes after softplus
        self.du, self.y = empty(*rows), empty(*rows)  # delta * u; C^T h + D u
        self.decay = empty(k_max, batch, n_state, d_inner)  # exp(delta A), later reused
        self.state = empty(k_max + 1, batch, n_state, d_inner)  # slot 0: the state entering the chunk
        if adjoint:
            self.go, self.gy, self.tmp = empty(*rows), empty(*rows), empty(*rows)  # dL/dout, dL/dy
            self.g_du, self.g_delta = empty(*rows), empty(*rows)
            self.adj = empty(k_max, batch, n_state, d_inner)  # dL/dh, later reused
            # exp(delta_{t+1} A) dL/dh_{t+1} for the first step t + 1 of the chunk to the right
            self.carry = torch.zeros(batch, n_state, d_inner, dtype=like.dtype, device=like.device)
            # Per-chunk sums of dL/dy * u (for dL/dD), reduced once at the end.
            self.acc_D = torch.zeros(*rows, dtype=like.dtype, device=like.device)
        self._views: dict[int, _ChunkViews] = {}

    def views(self, k: int) -> _ChunkViews:
        """The buffers cut to k steps, with per-step views; built once per distinct k (at most two)."""
        if k not in self._views:
            self._views[k] = _ChunkViews(self, k)
        return self._views[k]


class _ChunkViews:
    """Views of `_Buffers` for a chunk of k steps: slicing inside the loops costs as much as arithmetic."""

    def __init__(self, buf: _Buffers, k: int):
        for name, value in vars(buf).items():
            if isinstance(value, torch.Tensor) and name != "carry":
                setattr(self, name, value[: k + 1] if name == "state" else value[:k])
        self.decay_steps = self.decay.unbind(0)
        self.state_steps = self.state.unbind(0)
        self.du_rows = self.du[:, :, None, :].unbind(0)  # k x [batch, 1, d_inner]
        if hasattr(self, "adj"):
            self.adj_steps = self.adj.unbind(0)
            self.go_rows = self.go[:, :, None, :].unbind(0)
            self.gy_rows = self.gy[:, :, None, :].unbind(0)


class _ChunkedScan:
    """One call's inputs split into time-major chunks, small compute-dtype copies and the per-chunk steps."""

    def __init__(self, x: ScanInputs, chunk: int):
        cd = x.compute_dtype
        self.dtype = cd
        self.batch, self.d_inner, self.seq, self.n_state = x.batch, x.d_inner, x.seq, x.n_state
        self.k_max = min(chunk, self.seq)
        # [k, batch, C] views of the caller's tensors, one per chunk: read (and cast) chunk by chunk, no
        # full-sequence copies.
        self.u = x.u.permute(2, 0, 1).split(chunk)
        self.delta = x.delta.permute(2, 0, 1).split(chunk)
        self.z = x.z.permute(2, 0, 1).split(chunk) if x.z is not None else None
        B_t, C_t = _to_time_major(x.B, cd), _to_time_major(x.C, cd)  # [L, batch, N]
        self.B, self.C = B_t.split(chunk), C_t.split(chunk)  # [k, batch, N] each, contiguous
        # Per-step columns [batch, N, 1] for the broadcast products B_t x_t^T and C_t y_t^T.
        self.B_cols, self.C_cols = B_t[:, :, :, None].unbind(0), C_t[:, :, :, None].unbind(0)
        self.chunk = chunk
        self.A = x.A.to(cd).t().contiguous()  # [N, d_inner]
        self.A2 = self.A * _LOG2E  # exp2 is about twice as fast as exp in PyTorch's CPU kernels
        self.D = x.D.to(cd) if x.D is not None else None
        self.bias = x.delta_bias.to(cd) if x.delta_bias is not None else None
        self.softplus = x.delta_softplus
        self.n_chunks = len(self.u)

    def buffers(self, adjoint: bool) -> _Buffers:
        """Work buffers for this problem."""
        return _Buffers(self.k_max, self.batch, self.n_state, self.d_inner, self.A, adjoint)

    def step_sizes(self, v: _ChunkViews, c: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chunk step sizes [k, batch, d_inner] after bias and softplus, and the softplus input or None."""
        pre = v.pre if self.softplus else v.delta
        if self.bias is not None:
            torch.add(self.delta[c], self.bias, out=pre)
        else:
            pre.copy_(self.delta[c])
        if not self.softplus:
            return pre, None
        return torch.ops.aten.softplus.out(pre, 1, 20, out=v.delta), pre  # F.softplus, into a buffer

    def states(self, v: _ChunkViews, c: int, delta_c: torch.Tensor) -> None:
        """Fill v.decay with exp(delta A) and v.state[1:] with h_t, from v.state[0] and v.u."""
        torch.mul(delta_c[:, :, None, :], self.A2, out=v.decay)  # [k, batch, N, d_inner]
        torch.exp2(v.decay, out=v.decay)
        torch.mul(delta_c, v.u, out=v.du)  # [k, batch, d_inner]
        # The rank-1 drive B_t (delta_t u_t)^T is added by a broadcast addcmul rather than materialised for
        # the chunk: that saves writing and re-reading a chunk-sized tensor.
        B_cols, du_rows = self.B_cols[c * self.chunk :], v.du_rows
        steps, decays, mul = v.state_steps, v.decay_steps, torch.mul
        for i in range(len(decays)):
            mul(decays[i], steps[i], out=steps[i + 1]).addcmul_(B_cols[i], du_rows[i])

    def outputs(self, v: _ChunkViews, c: int) -> torch.Tensor:
        """y_t = C_t^T h_t + D u_t for a chunk whose states are in v.state, as [k, batch, d_inner]."""
        rows = v.y.shape[0] * self.batch
        # a batch of [1, N] @ [N, d_inner] products
        torch.bmm(
            self.C[c].view(rows, 1, self.n_state),
            v.state[1:].view(rows, self.n_state, self.d_inner),
            out=v.y.view(rows, 1, self.d_inner),
        )
        if self.D is not None:
            v.y.addcmul_(v.u, self.D)
        return v.y


def _scan_forward(x: _ChunkedScan, out: torch.Tensor, boundaries: torch.Tensor | None) -> None:
    """Write the gated scan output into out [batch, d_inner, L] and the chunk-entry states into boundaries."""
    buf = x.buffers(adjoint=False)
    buf.state[0].zero_()
    out_chunks = out.permute(2, 0, 1).split(x.k_max)  # [k, batch, d_inner] views
    for c in range(x.n_chunks):
        v = buf.views(len(x.u[c]))
        if boundaries is not None:
            boundaries[c].copy_(buf.state[0])
        delta_c, _ = x.step_sizes(v, c)
        v.u.copy_(x.u[c])
        x.states(v, c, delta_c)
        y = x.outputs(v, c)
        if x.z is not None:
            torch.mul(F.silu(v.z.copy_(x.z[c]), inplace=True), y, out=out_chunks[c])
        else:
            out_chunks[c].copy_(y)
        buf.state[0].copy_(v.state[-1])


def _scan_backward(
    x: _ChunkedScan,
    grad_out: torch.Tensor,
    boundaries: torch.Tensor,
    g_u: torch.Tensor,
    g_delta: torch.Tensor,
    g_z: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fill g_u, g_delta, g_z [batch, d_inner, L]; return dA, dB_t, dC_t (time-major) and dD."""
    seq, batch, n_state, d_inner = x.seq, x.batch, x.n_state, x.d_inner
    buf = x.buffers(adjoint=True)
    go = grad_out.permute(2, 0, 1).split(x.k_max)  # [k, batch, d_inner] views
    g_u_c = g_u.permute(2, 0, 1).split(x.k_max)
    g_delta_c = g_delta.permute(2, 0, 1).split(x.k_max)
    g_z_c = g_z.permute(2, 0, 1).split(x.k_max) if g_z is not None else None
    g_B_t = x.A.new_empty(seq, batch, n_state)
    g_C_t = x.A.new_empty(seq, batch, n_state)
    g_B_c, g_C_c = g_B_t.split(x.k_max), g_C_t.split(x.k_max)
    g_A_t = x.A.new_zeros(n_state, d_inner)
    carry = buf.carry

    for c in reversed(range(x.n_chunks)):
        v = buf.views(len(x.u[c]))
        rows = v.u.shape[0] * batch
        u_c = v.u.copy_(x.u[c])
        go_c = v.go.copy_(go[c])
        # Recompute the chunk's step sizes, decays and states from its entry state.
        delta_c, pre_c = x.step_sizes(v, c)
        v.state[0].copy_(boundaries[c])
        x.states(v, c, delta_c)

        # Gate: out = y * silu(z), so dL/dy = dout * silu(z) and dL/dz = dout * y * silu'(z).
        if x.z is not None:
            z_c = v.z.copy_(x.z[c])
            if g_z_c is not None:
                gy_y = torch.mul(go_c, x.outputs(v, c), out=v.tmp)
                torch.ops.aten.silu_backward.grad_input(gy_y, z_c, grad_input=g_z_c[c])
            gy, gy_rows = torch.mul(F.silu(z_c, inplace=True), go_c, out=v.gy), v.gy_rows
        else:
            gy, gy_rows = go_c, v.go_rows  # [k, batch, d_inner], k x [batch, 1, d_inner]
        if x.D is not None:
            v.acc_D.addcmul_(gy, u_c)

        # Adjoint g_t = dL/dh_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}, backwards through the chunk. Each
        # product exp(delta_t A) g_t overwrites its decay while g_t is still in cache: it is the next step's
        # addend, the carry into the chunk to the left and a factor of dL/d(delta_t A).
        C_cols = x.C_cols[c * x.chunk :]
        adjs, decays, addcmul = v.adj_steps, v.decay_steps, torch.addcmul
        last = len(adjs) - 1
        addcmul(carry, C_cols[last], gy_rows[last], out=adjs[last])
        for i in range(last, 0, -1):
            addcmul(decays[i].mul_(adjs[i]), C_cols[i - 1], gy_rows[i - 1], out=adjs[i - 1])
        carry.copy_(decays[0].mul_(adjs[0]))

        # dL/dC_t = h_t dy_t ; dL/dB_t = g_t (delta_t u_t) ; dL/d(delta_t u_t) = B_t^T g_t
        adj_rows = v.adj.view(rows, n_state, d_inner)
        states_rows = v.state[1:].view(rows, n_state, d_inner)
        torch.bmm(gy.view(rows, 1, d_inner), states_rows.transpose(1, 2), out=g_C_c[c].view(rows, 1, n_state))
        torch.bmm(v.du.view(rows, 1, d_inner), adj_rows.transpose(1, 2), out=g_B_c[c].view(rows, 1, n_state))
        torch.bmm(x.B[c].view(rows, 1, n_state), adj_rows, out=v.g_du.view(rows, 1, d_inner))

        # X_t = dL/d(delta_t A) = exp(delta_t A) g_t * h_{t-1}; then dL/ddelta_t = sum_n A X_t and
        # dL/dA = sum_{t, batch} delta_t X_t. v.adj is free to hold the weighted products.
        X = v.decay.mul_(v.state[:-1])
        torch.sum(torch.mul(X, x.A, out=v.adj), dim=2, out=v.g_delta)
        g_A_t += torch.mul(X, delta_c[:, :, None, :], out=v.adj).view(rows, n_state, d_inner).sum(0)

        # Chain through delta * u (and D u for u), then softplus and the bias for delta.
        if x.D is not None:
            torch.addcmul(torch.mul(v.g_du, delta_c, out=v.tmp), gy, x.D, out=g_u_c[c])
        else:
            torch.mul(v.g_du, delta_c, out=g_u_c[c])
        v.g_delta.addcmul_(v.g_du, u_c)
        if pre_c is not None:
            torch.ops.aten.softplus_backward.grad_input(v.g_delta, pre_c, 1, 20, grad_input=g_delta_c[c])
        else:
            g_delta_c[c].copy_(v.g_delta)
    g_D = buf.acc_D.sum(dim=(0, 1)) if x.D is not None else None
    return g_A_t.t(), g_B_t, g_C_t, g_D


def _from_time_major(x_t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[L, batch, C] -> [batch, C, L] with the dtype and memory layout of `like` (one copy)."""
    out = empty_like_layout(like)
    out.copy_(x_t.permute(1, 2, 0))
    return out


class _ChunkedScanFn(torch.autograd.Function):
    """Chunked selective scan whose backward keeps only the inputs and chunk-boundary states."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        chunk: int,
        delta_softplus: bool,
        *tensors: torch.Tensor | None,
    ) -> torch.Tensor:
        """Scan `ScanInputs(*tensors, delta_softplus)`; save the inputs and the state entering each chunk."""
        x = ScanInputs(*tensors, delta_softplus=delta_softplus)
        with torch.autocast(device_type=x.u.device.type, enabled=False):
            scan = _ChunkedScan(x, chunk)
            out = empty_output(x.u)
            boundaries = x.u.new_empty(scan.n_chunks, x.batch, x.n_state, x.d_inner, dtype=scan.dtype)
            _scan_forward(scan, out, boundaries)
        ctx.delta_softplus = delta_softplus
        ctx.chunk = chunk
        ctx.save_for_backward(*tensors, boundaries)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:
        """Recompute each chunk from its saved entry state and return gradients for every input."""
        *tensors, boundaries = ctx.saved_tensors
        x = ScanInputs(*tensors, delta_softplus=ctx.delta_softplus)
        with torch.autocast(device_type=x.u.device.type, enabled=False):
            scan = _ChunkedScan(x, ctx.chunk)
            g_u = empty_like_layout(x.u)
            g_delta = empty_like_layout(x.delta)
            need_z = x.z is not None and needs_grad(ctx.needs_input_grad, "z")
            g_z = empty_like_layout(x.z) if need_z else None
            g_A, g_B_t, g_C_t, g_D = _scan_backward(scan, grad_out, boundaries, g_u, g_delta, g_z)
            g_bias = g_delta.sum(dim=(0, 2), dtype=scan.dtype) if x.delta_bias is not None else None
            g_B, g_C = _from_time_major(g_B_t, x.B), _from_time_major(g_C_t, x.C)
            grads = (g_u, g_delta, g_A, g_B, g_C, g_D, g_z, g_bias)
            return input_grads(ctx.needs_input_grad, grads, x.dtypes())


def chunked_selective_scan(x: ScanInputs, chunk_size: int | None = None) -> torch.Tensor:
    """The scan of `x` in chunks of `chunk_size` steps (None: `default_chunk_size`); differentiable."""
    if chunk_size is None:
        chunk_size = default_chunk_size(x.batch, x.n_state, x.d_inner)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if x.seq == 0:
        return torch.zeros_like(x.u)
    if x.needs_autograd():
        return _ChunkedScanFn.apply(chunk_size, x.delta_softplus, *x.tensors())
    # Inference: no boundary states, nothing saved.
    with torch.autocast(device_type=x.u.device.type, enabled=False):
        out = empty_output(x.u)
        _scan_forward(_ChunkedScan(x, chunk_size), out, None)
    return out
