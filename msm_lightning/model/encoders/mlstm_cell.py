"""Parallel (quadratic) mLSTM cell with a hand-written backward, equivalent to the `xlstm` package's.

The package's `parallel_stabilized_simple` materialises about ten [batch, heads, S, S] tensors (repeated
cumsums, a -inf causal mask, the row max, the stabilised exponent, the combination matrix and its normalised
copy) and autograd keeps most of them for the backward. This version computes the same function with:

- the row-wise stabiliser m_i = max_j<=i (F_i - F_j + i_j) as F_i + cummax_j<=i(i_j - F_j), an O(S) scan
  instead of an [S, S] max, so the stabilised log-gate matrix is just b_j - cummax(b)_i with b = i - F;
- one [S, S] exponent clamped below at `LOG_GATE_FLOOR` and zeroed above the diagonal afterwards, because
  exp of -inf (the package's masked entries) and of arguments below about -87 (strongly forgetting heads of
  trained models, whose results are float32 denormals) take slow paths that cost 5x to 80x a normal exp;
- the normaliser applied to the [S, DH] output instead of the [S, S] matrix;
- query blocks that meet only the keys up to their own end, so the [S, S] products and matrices are
  computed block-lower-triangularly (62 % of the square for S = 251 and blocks of 64);
- a backward whose gate gradients come from [S, DH] reductions (the row and column sums of dP * P are
  h . dh + r dr and v . dv + P^T dr), so only the decay matrix D and the combination matrix P are saved.

Every head is processed on strided [batch, S, DH] views of the [batch, S, heads, DH] projections, so no
head-major copies of q, k, v, h or their gradients are made.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# exp(-60) ~ 1e-26 is 26 orders of magnitude below the row maximum (exactly 1), so clamping there changes
# no float32 sum, while exp and the matmuls never see denormal numbers.
LOG_GATE_FLOOR = -60.0


def stabilised_gates(
    igate_preact: torch.Tensor, fgate_preact: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate pre-activations [batch, S, heads] -> (cummax(b), b, m), each [batch, heads, S], at least float32.

    b_j = i_j - F_j with F the cumulative log forget gate; the stabilised log decay is b_j - cummax(b)_i
    for j <= i, and m_i = F_i + cummax(b)_i is the package's row maximum of the unstabilised log decay.
    """
    # The cumulative sum spans the whole sequence, so it stays in float32 even when the caller runs bf16.
    dtype = torch.promote_types(fgate_preact.dtype, torch.float32)
    log_f = F.logsigmoid(fgate_preact.to(dtype)).transpose(1, 2)
    cum_f = log_f.cumsum(dim=-1)
    b = igate_preact.to(dtype).transpose(1, 2) - cum_f
    running_max = torch.cummax(b, dim=-1).values
    return running_max, b, cum_f + running_max


def _blocks(seq: int, block: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive blocks of `block` positions covering `seq`."""
    return [(start, min(start + block, seq)) for start in range(0, seq, block)]


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    running_max: torch.Tensor,
    b: torch.Tensor,
    m: torch.Tensor,
    eps: float,
    block: int,
    scale: float,
    keep: bool,
) -> tuple[torch.Tensor, ...]:
    """h and, with `keep`, per head the decay D and combination P = (scale q k^T) * D for the backward.

    Rows are processed in blocks of `block` queries against only the keys up to the block's end, so the
    [S, S] buffers are filled block-lower-triangularly; entries right of a block's end are never read.
    """
    batch, seq, heads, head_dim = q.shape
    q_scaled = q if scale == 1.0 else q * scale
    h = q.new_empty(batch, seq, heads, head_dim)
    # Without a backward one buffer pair serves every head in turn.
    decay = b.new_empty(heads if keep else 1, batch, seq, seq)
    comb = q.new_empty(heads if keep else 1, batch, seq, seq)
    row_sum = b.new_empty(batch, heads, seq)
    norm = torch.empty_like(row_sum)
    min_norm = torch.exp(-m)  # the package's lower bound exp(-max log D) of the normaliser
    for i in range(heads):
        q_i, k_i, v_i = q_scaled[:, :, i], k[:, :, i], v[:, :, i]
        decay_i, comb_i = decay[i if keep else 0], comb[i if keep else 0]
        for start, stop in _blocks(seq, block):
            d = decay_i[:, start:stop, :stop]
            torch.sub(b[:, i, None, :stop], running_max[:, i, start:stop, None], out=d)
            # Above the diagonal the difference can be large and positive; those entries are zeroed next.
            d.clamp_(min=LOG_GATE_FLOOR, max=0.0).exp_()
            d[:, :, start:].tril_()  # the diagonal block's future keys
            p = comb_i[:, start:stop, :stop]
            torch.bmm(q_i[:, start:stop], k_i[:, :stop].transpose(1, 2), out=p)
            p.mul_(d)
            rows = row_sum[:, i, start:stop]
            torch.sum(p, dim=-1, dtype=rows.dtype, out=rows)
            torch.bmm(p, v_i[:, :stop], out=h[:, start:stop, i])  # the numerator, normalised below
    torch.add(torch.maximum(row_sum.abs(), min_norm), eps, out=norm)
    h.div_(norm.transpose(1, 2).unsqueeze(-1).to(h.dtype))
    if not keep:
        return (h,)
    return h, q_scaled, decay, comb, row_sum, norm, min_norm


class _ParallelMLSTM(torch.autograd.Function):
    """h = ((scale q k^T * D) v) / (max(|row sums|, exp(-m)) + eps) with D_ij = exp(b_j - cummax(b)_i)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        running_max: torch.Tensor,
        b: torch.Tensor,
        m: torch.Tensor,
        eps: float,
        block: int,
        scale: float,
    ) -> torch.Tensor:
        """q, k, v [batch, S, heads, DH]; running_max, b, m [batch, heads, S] -> h [batch, S, heads, DH]."""
        h, q_scaled, decay, comb, row_sum, norm, min_norm = _forward(
            q, k, v, running_max, b, m, eps, block, scale, keep=True
        )
        ctx.block, ctx.scale = block, scale
        ctx.save_for_backward(h, q_scaled, k, v, decay, comb, row_sum, norm, min_norm)
        return h

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dh: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        """Gradients for q, k, v, running_max, b and m (none for eps, block and scale)."""
        h, q_scaled, k, v, decay, comb, row_sum, norm, min_norm = ctx.saved_tensors
        batch, seq, heads, _ = h.shape
        blocks = _blocks(seq, ctx.block)
        dh = dh.contiguous()
        # h = numerator / norm, so dnorm = -(dh . h) / norm and the row sums of dP * P equal dh . h + dr r.
        dh_dot_h = (dh * h).sum(dim=-1, dtype=norm.dtype).transpose(1, 2)  # [batch, heads, S]
        dnorm = -dh_dot_h / norm
        # torch.maximum's gradient rule: all to the larger argument, half each on a tie.
        abs_sum = row_sum.abs()
        to_sum = (abs_sum > min_norm).to(norm.dtype) + 0.5 * (abs_sum == min_norm).to(norm.dtype)
        d_row_sum = dnorm * to_sum * torch.sign(row_sum)
        dm = -dnorm * (1.0 - to_sum) * min_norm
        d_running_max = -(dh_dot_h + d_row_sum * row_sum)
        db = torch.empty_like(row_sum)
        d_numerator = dh / norm.transpose(1, 2).unsqueeze(-1).to(dh.dtype)  # [batch, S, heads, DH]
        dq = torch.empty_like(h)
        dk = torch.empty_like(h)
        dv = torch.empty_like(h)
        d_scores = h.new_empty(batch, seq, seq)  # reused by every head, block-lower-triangular like P
        for i in range(heads):
            q_i, k_i, v_i, dnum_i = q_scaled[:, :, i], k[:, :, i], v[:, :, i], d_numerator[:, :, i]
            d_row_i = d_row_sum[:, i].unsqueeze(-1).to(dh.dtype)  # [batch, S, 1]
            for start, stop in blocks:  # query blocks: dP = dnum v^T + dr, scores gradient dS = dP * D
                ds = d_scores[:, start:stop, :stop]
                torch.bmm(dnum_i[:, start:stop], v_i[:, :stop].transpose(1, 2), out=ds)
                ds.add_(d_row_i[:, start:stop]).mul_(decay[i][:, start:stop, :stop])
                torch.bmm(ds, k_i[:, :stop], out=dq[:, start:stop, i])
            for start, stop in blocks:  # key blocks: only queries from `start` on see these keys
                p = comb[i][:, start:, start:stop]
                torch.bmm(p.transpose(1, 2), dnum_i[:, start:], out=dv[:, start:stop, i])
                torch.bmm(
                    d_scores[:, start:, start:stop].transpose(1, 2), q_i[:, start:], out=dk[:, start:stop, i]
                )
                # db_j = v_j . dv_j + (P^T dr)_j; the matrix-vector product is faster as a multiply and sum.
                db[:, i, start:stop] = (v_i[:, start:stop] * dv[:, start:stop, i]).sum(dim=-1) + (
                    p * d_row_i[:, start:]
                ).sum(dim=1)
        if ctx.scale != 1.0:
            dq.mul_(ctx.scale)
        return dq, dk, dv, d_running_max, db, dm, None, None, None


def parallel_mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    igate_preact: torch.Tensor,
    fgate_preact: torch.Tensor,
    eps: float = 1e-6,
    block: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal mLSTM, parallel form: q, k, v [batch, S, heads, DH], gates [batch, S, heads] -> like q.

    The same function as the package's `parallel_stabilized_simple` (up to float rounding and decays below
    exp(LOG_GATE_FLOOR)), including the gradient that flows through the stabiliser. `scale` multiplies the
    scores q k^T (default 1 / sqrt(DH)); pass 1.0 when q is already scaled. `block` is the query block size.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    # The hand-written backward runs without autocast, so the forward must not mix dtypes either.
    with torch.autocast(device_type, enabled=False):
        running_max, b, m = stabilised_gates(igate_preact, fgate_preact)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, running_max, b, m))
        if not needs_grad:
            return _forward(q, k, v, running_max, b, m, eps, block, scale, keep=False)[0]
        return _ParallelMLSTM.apply(q, k, v, running_max, b, m, eps, block, scale)


def parallel_mlstm_backend(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    igate_preact: torch.Tensor,
    fgate_preact: torch.Tensor,
    lower_triangular_matrix: torch.Tensor | None = None,
    eps: float = 1e-6,
    **kwargs: object,
) -> torch.Tensor:
    """Drop-in for the package's `mLSTMCell.backend_fn`: [batch, heads, S, DH] in and out, gates [..., 1]."""
    h = parallel_mlstm(
        queries.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        igate_preact.squeeze(-1).transpose(1, 2),
        fgate_preact.squeeze(-1).transpose(1, 2),
        eps=eps,
    )
    return h.transpose(1, 2)
