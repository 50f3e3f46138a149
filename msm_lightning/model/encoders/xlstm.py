"""AxLSTM encoder: pre-LN mLSTM blocks (Vision-LSTM layout) built on the `xlstm` package's mLSTM layer.

The blocks hold the package's `mLSTMLayer` (so state dicts keep the package's names and shapes) but run
`mlstm_layer_forward`, which computes the same function with less work on a CPU: the parallel cell of
`mlstm_cell`, a channels-last causal conv, gates and q/k projections folded through the linear maps that
feed them, no concatenations or head-major copies, and in-place updates when no gradient is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from xlstm.blocks.mlstm.layer import mLSTMLayer, mLSTMLayerConfig
from xlstm.components.conv import CausalConv1d
from xlstm.components.linear_headwise import LinearHeadwiseExpand

from msm_lightning.model.encoders.mlstm_cell import parallel_mlstm


class HeadwiseProjection(nn.Module):
    """Block-diagonal q/k/v projection sharing the weight of an xlstm `LinearHeadwiseExpand`.

    The package's einsum multiplies 4x4 blocks one head at a time, which starves a CPU's matmul kernels.
    Here groups of up to 8 heads become one 32x32 block-diagonal matrix, so a single batched matmul does
    8x more (mostly zero) arithmetic yet runs about 2x faster forward and backward at AxLSTM-T shapes.
    """

    def __init__(self, source: LinearHeadwiseExpand, max_group: int = 8) -> None:
        super().__init__()
        self.weight = source.weight  # [heads, out_per_head, in_per_head], same parameter and name
        self.bias = source.bias
        heads = self.weight.shape[0]
        self.group = max(g for g in range(1, max_group + 1) if heads % g == 0)
        self.register_buffer("eye", torch.eye(self.group), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., heads * in_per_head] -> [..., heads * out_per_head]."""
        return self.project(x, self.weight, self.bias)

    def project(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Headwise projection of x by any weight shaped like this module's, e.g. one derived from it."""
        heads, out_w, in_w = weight.shape
        n_groups, g = heads // self.group, self.group
        w = weight.view(n_groups, g, out_w, in_w)
        # [n_groups, g * out_w, g * in_w], block-diagonal: block i of group k is head k * g + i.
        blocks = torch.einsum("kioj,il->kiolj", w, self.eye.to(w.dtype)).reshape(
            n_groups, g * out_w, g * in_w
        )
        xg = x.reshape(-1, n_groups, g * in_w).transpose(0, 1)  # [n_groups, tokens, g * in_w]
        y = torch.bmm(xg, blocks.transpose(1, 2).to(xg.dtype))  # [n_groups, tokens, g * out_w]
        y = y.transpose(0, 1).reshape(*x.shape[:-1], heads * out_w)
        return y if bias is None else y + bias


def _depthwise_conv_nwc(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    """Depthwise conv of x [batch, S, D] along S with weight [D, 1, K]; causal looks back, else ahead.

    Presented to conv2d as a channels-last [batch, D, 1, S] image, which is the memory of a contiguous
    [batch, S, D] tensor, so oneDNN works on it without the transposed copies of a [batch, D, S] conv1d.
    """
    seq, kernel = x.shape[1], weight.shape[-1]
    x4 = x.transpose(1, 2).unsqueeze(2).contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x4, weight.unsqueeze(2), bias, padding=(0, kernel - 1), groups=weight.shape[0])
    y = y[..., :seq] if causal else y[..., kernel - 1 :]
    return y.squeeze(2).transpose(1, 2)


class _CausalConv(torch.autograd.Function):
    """y_t = bias + sum_s weight[:, 0, K-1-s] x_{t-s}: the package's CausalConv1d in [batch, S, D] layout."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [batch, S, D], weight [D, 1, K], bias [D] or None -> [batch, S, D]."""
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _depthwise_conv_nwc(x, weight, bias, causal=True)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        """dx is the anti-causal conv of dy with the flipped kernel; dweight sums shifted products."""
        x, weight = ctx.saved_tensors
        seq, kernel = x.shape[1], weight.shape[-1]
        dy = dy.contiguous()
        dx = _depthwise_conv_nwc(dy, weight.flip(-1), None, causal=False)
        # oneDNN's depthwise weight gradient is slower here than K multiply-and-sum passes.
        dweight = weight.new_zeros(weight.shape)
        for shift in range(min(kernel, seq)):
            products = dy[:, shift:] * x[:, : seq - shift]
            dweight[:, 0, kernel - 1 - shift] = products.sum(dim=(0, 1), dtype=torch.float32)
        dbias = dy.sum(dim=(0, 1), dtype=torch.float32).to(dy.dtype) if ctx.has_bias else None
        return dx, dweight, dbias


def causal_conv(conv: CausalConv1d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` of the package's CausalConv1d (depthwise, no state) on x [batch, S, D]."""
    if conv.conv is None:  # kernel_size 0 is the package's no-op
        return x
    if conv.groups != x.shape[-1]:  # channel mixing: not the mLSTM's configuration, keep the package's path
        return conv(x)
    weight, bias = conv.conv.weight, conv.conv.bias
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # what autocast would run the conv in
        x = x.to(torch.get_autocast_dtype(device_type))
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    # The hand-written backward runs without autocast, so the forward must not mix dtypes either.
    with torch.autocast(device_type, enabled=False):
        return _CausalConv.apply(x, weight, bias)


def _gate_weights(layer: mLSTMLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input and forget gate weights moved through the q/k/v projections: (on conv_act, on x_mlstm, bias).

    The package computes gates = [q, k, v] W^T + b. As q = c Pq^T, k = c Pk^T and v = x_mlstm Pv^T are
    linear (c = conv_act), this is c (W_q Pq + W_k Pk)^T + x_mlstm (W_v Pv)^T + b: two [inner -> 2 * heads]
    products instead of concatenating q, k, v into a [3 * inner] input. Output columns: input, forget gates.
    """
    cell = layer.mlstm_cell
    weight = torch.cat([cell.igate.weight, cell.fgate.weight])  # [2 * heads, 3 * inner]
    bias = torch.cat([cell.igate.bias, cell.fgate.bias])
    moved = []
    for w, proj in zip(weight.chunk(3, dim=1), (layer.q_proj, layer.k_proj, layer.v_proj), strict=True):
        heads, out_w, _ = proj.weight.shape
        moved.append(torch.einsum("nho,hoi->nhi", w.view(-1, heads, out_w), proj.weight).reshape(len(w), -1))
        if proj.bias is not None:
            bias = bias + w @ proj.bias
    return moved[0] + moved[1], moved[2], bias


def mlstm_layer_forward(layer: mLSTMLayer, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for the package's `mLSTMLayer` (with `HeadwiseProjection`s), restructured to do less work.

    Same parameters and, up to float rounding, the same outputs and gradients as the package's forward.
    """
    config = layer.config
    heads, inner = config.num_heads, config._inner_embedding_dim
    head_dim = inner // heads
    batch, seq, _ = x.shape
    # Two products instead of one split output keep both halves contiguous for the conv and the SiLUs.
    w_mlstm, w_z = layer.proj_up.weight.split(inner)
    b_mlstm, b_z = (None, None) if layer.proj_up.bias is None else layer.proj_up.bias.split(inner)
    x_mlstm = F.linear(x, w_mlstm, b_mlstm)
    z = F.linear(x, w_z, b_z)
    conv_act = F.silu(causal_conv(layer.conv1d, x_mlstm))

    q_proj, k_proj = layer.q_proj, layer.k_proj
    if isinstance(q_proj, HeadwiseProjection) and q_proj.bias is None and k_proj.bias is None:
        # The cell uses q and k only through q k^T = c Pq^T Pk c^T (c = conv_act, Pq and Pk block-diagonal
        # with 4x4 blocks), so projecting c once by the blocks Pk_h^T Pq_h and pairing it with c itself
        # gives the same scores with one headwise projection instead of two; the blocks also absorb the
        # cell's 1 / sqrt(DH) score scale.
        qk_weight = torch.einsum("hoa,hob->hab", k_proj.weight, q_proj.weight) * head_dim**-0.5
        q, k, scale = q_proj.project(conv_act, qk_weight), conv_act, 1.0
    else:
        q, k, scale = q_proj(conv_act), k_proj(conv_act), None
    v = layer.v_proj(x_mlstm)
    w_conv, w_x, gate_bias = _gate_weights(layer)
    gates = torch.addmm(gate_bias, conv_act.view(-1, inner), w_conv.t())
    gates = torch.addmm(gates, x_mlstm.view(-1, inner), w_x.t()).view(batch, seq, 2 * heads)
    igate_preact, fgate_preact = gates.split(heads, dim=-1)
    split = (batch, seq, heads, head_dim)
    h = parallel_mlstm(q.view(split), k.view(split), v.view(split), igate_preact, fgate_preact, scale=scale)

    # The package's MultiHeadLayerNorm is a group norm with one group per head, i.e. a layer norm over
    # each head's features, which in this [batch, S, heads, DH] layout needs no transposes.
    norm = layer.mlstm_cell.outnorm
    h = F.layer_norm(h, (head_dim,), eps=norm.eps)
    weight = None if norm.weight is None else norm.weight_proxy.view(heads, head_dim)
    bias = None if norm.bias is None else norm.bias.view(heads, head_dim)
    if torch.is_grad_enabled():
        if weight is not None:
            h = h * weight
        if bias is not None:
            h = h + bias
        out = torch.addcmul(h.view(batch, seq, inner), layer.learnable_skip, conv_act) * F.silu(z)
    else:
        # Without autograd the fresh h and z are updated in place: every new [batch, S, inner] tensor
        # costs page faults on first touch, about as much as the elementwise op that fills it.
        if weight is not None:
            h.mul_(weight)
        if bias is not None:
            h.add_(bias)
        out = h.view(batch, seq, inner).addcmul_(layer.learnable_skip, conv_act).mul_(F.silu(z, inplace=True))
    return layer.dropout(layer.proj_down(out))


class MLSTMBlock(nn.Module):
    """x + mLSTM(LayerNorm(x)); `flip` runs the mixer over the reversed sequence."""

    def __init__(self, d_model: int, layer_config: mLSTMLayerConfig, flip: bool = False) -> None:
        super().__init__()
        self.flip = flip
        self.norm = nn.LayerNorm(d_model, bias=False)
        self.layer = mLSTMLayer(layer_config)
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self.layer, name, HeadwiseProjection(getattr(self.layer, name)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, d_model] -> [batch, seq, d_model]."""
        h = self.norm(x)
        if self.flip:
            return x + mlstm_layer_forward(self.layer, h.flip(1)).flip(1)
        return x + mlstm_layer_forward(self.layer, h)


class XLSTMEncoder(nn.Module):
    """A stack of `depth` mLSTM blocks and a final LayerNorm (bias-free unless `final_norm_bias`)."""

    def __init__(
        self,
        d_model: int,
        depth: int,
        max_tokens: int,
        proj_factor: float = 3.0,
        num_heads: int = 4,
        conv_kernel: int = 4,
        qkv_blocksize: int = 4,
        flip: bool = False,
        final_norm_bias: bool = False,
        final_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.max_tokens = max_tokens
        blocks = []
        for i in range(depth):
            config = mLSTMLayerConfig(
                embedding_dim=d_model,
                proj_factor=proj_factor,
                num_heads=num_heads,
                conv1d_kernel_size=conv_kernel,
                qkv_proj_blocksize=qkv_blocksize,
                bias=False,
                # The parallel mLSTM form keeps a [context, context] causal mask buffer.
                context_length=max_tokens,
                _num_blocks=depth,
            )
            # Vision-LSTM alternates direction: odd blocks read the sequence backwards.
            blocks.append(MLSTMBlock(d_model, config, flip=flip and i % 2 == 1))
        self.blocks = nn.ModuleList(blocks)
        # The AxLSTM authors' final norm has a bias and eps 1e-6 (their SSAST base class's); their
        # converted weights set both, models trained here keep the bias-free Vision-LSTM norm.
        self.norm = nn.LayerNorm(d_model, eps=final_norm_eps, bias=final_norm_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens in [batch, seq, d_model], tokens out [batch, seq, d_model]."""
        if x.shape[1] > self.max_tokens:
            raise ValueError(
                f"xLSTM encoder was built for at most {self.max_tokens} tokens, got {x.shape[1]}: "
                "chunk the input or build the model with a longer crop"
            )
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
