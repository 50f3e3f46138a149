"""The fast xLSTM path computes what the `xlstm` package computes: cell, layer, encoder, values, gradients.

Tolerances: float64 cell checks agree to 1e-10 of each tensor's scale (only rounding differs); float32 checks
(the Tiny model's shapes) to 1e-4 of each tensor's scale, where they typically agree to a few 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from xlstm.blocks.mlstm.backends import parallel_stabilized_simple
from xlstm.blocks.mlstm.layer import mLSTMLayer

from msm_lightning.model.encoders.mlstm_cell import parallel_mlstm, parallel_mlstm_backend
from msm_lightning.model.encoders.xlstm import XLSTMEncoder, mlstm_layer_forward

F32_TOL = 1e-4
F64_TOL = 1e-10


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, counting scales below 1e-3 (zero gradients) as 1e-3."""
    scale = max(expected.detach().abs().max().item(), 1e-3)
    return (actual.detach().double() - expected.detach().double()).abs().max().item() / scale


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "") -> None:
    """|actual - expected| <= tol * max|expected| everywhere."""
    err = scaled_error(actual, expected)
    assert err <= tol, f"{name}: error {err:.3g} of the scale, tolerance {tol:.3g}"


def package_cell(q, k, v, igate, fgate):
    """The package's parallel mLSTM on [batch, S, heads, DH] tensors and [batch, S, heads] gates."""
    h = parallel_stabilized_simple(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        igate.transpose(1, 2).unsqueeze(-1),
        fgate.transpose(1, 2).unsqueeze(-1),
    )
    return h.transpose(1, 2)


def cell_inputs(seq, heads, head_dim, dtype, strong_forgetting, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, seq, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    if strong_forgetting:  # log decays far below the clamp floor within a few steps, big input gates
        igate = 3 * torch.randn(batch, seq, heads, generator=gen, dtype=dtype)
        fgate = 2 * torch.randn(batch, seq, heads, generator=gen, dtype=dtype) - 2
    else:  # the package's initialisation range
        igate = 0.1 * torch.randn(batch, seq, heads, generator=gen, dtype=dtype)
        fgate = torch.linspace(3, 6, heads, dtype=dtype).expand(batch, seq, heads).clone()
    return [t.requires_grad_() for t in (q, k, v, igate, fgate)]


@pytest.mark.parametrize("strong_forgetting", [False, True])
@pytest.mark.parametrize(("seq", "block"), [(1, 64), (2, 1), (37, 8), (37, 64), (251, 64), (251, 100)])
def test_cell_matches_package_in_float64(seq, block, strong_forgetting):
    inputs = cell_inputs(seq, 3, 16, torch.float64, strong_forgetting)
    expected = package_cell(*inputs)
    actual = parallel_mlstm(*inputs, block=block)
    assert_scaled_close(actual, expected, F64_TOL, "h")
    with torch.no_grad():
        assert_scaled_close(parallel_mlstm(*inputs, block=block), expected, F64_TOL, "h without grad")
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    actual_grads = torch.autograd.grad(actual, inputs, grad_out)
    for name, a, e in zip(("q", "k", "v", "igate", "fgate"), actual_grads, expected_grads, strict=True):
        assert_scaled_close(a, e, F64_TOL, name)


@pytest.mark.parametrize("strong_forgetting", [False, True])
def test_cell_matches_package_in_float32_at_tiny_shapes(strong_forgetting):
    """Against the package's float64 result, at least as accurate as the package's own float32 result.

    Strongly forgetting heads with large input gates are ill-conditioned (tiny normalisers): there both
    float32 versions are about 1e-4 off the float64 values, so each is held to its float32 error budget.
    """
    exact_inputs = cell_inputs(251, 4, 144, torch.float64, strong_forgetting)
    inputs = [t.detach().float().requires_grad_() for t in exact_inputs]
    exact = package_cell(*exact_inputs)
    package, actual = package_cell(*inputs), parallel_mlstm(*inputs)
    grad_out = torch.randn_like(exact)
    exact_grads = torch.autograd.grad(exact, exact_inputs, grad_out)
    package_grads = torch.autograd.grad(package, inputs, grad_out.float())
    actual_grads = torch.autograd.grad(actual, inputs, grad_out.float())
    names = ("h", "q", "k", "v", "igate", "fgate")
    for name, a, p, e in zip(
        names, (actual, *actual_grads), (package, *package_grads), (exact, *exact_grads), strict=True
    ):
        assert torch.isfinite(a).all(), name
        assert_scaled_close(a, e, max(F32_TOL, 2 * scaled_error(p, e)), name)
        if not strong_forgetting:
            assert_scaled_close(a, p, F32_TOL, name)


def test_backend_is_a_drop_in_for_the_package_cell():
    torch.manual_seed(0)
    layer = mLSTMLayer(XLSTMEncoder(64, 1, 20).blocks[0].layer.config)
    x = torch.randn(2, 20, 64)
    expected = layer(x)
    layer.mlstm_cell.backend_fn = parallel_mlstm_backend
    assert_scaled_close(layer(x), expected, F32_TOL)


def perturbed_encoder(depth: int, max_tokens: int, flip: bool, seed: int = 0) -> XLSTMEncoder:
    """A Tiny-width encoder whose parameters all moved off their (partly zero) initial values."""
    torch.manual_seed(seed)
    encoder = XLSTMEncoder(192, depth, max_tokens, flip=flip)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return encoder


def package_layers(encoder: XLSTMEncoder) -> list[mLSTMLayer]:
    """Unmodified package layers holding copies of the encoder's layer weights."""
    layers = []
    for block in encoder.blocks:
        layer = mLSTMLayer(block.layer.config)
        layer.load_state_dict(block.layer.state_dict())  # strict: the same names and shapes
        layers.append(layer)
    return layers


def package_encoder_forward(encoder: XLSTMEncoder, layers: list[mLSTMLayer], x: torch.Tensor) -> torch.Tensor:
    """The encoder's forward with every mixer replaced by the package's own mLSTMLayer.forward."""
    for block, layer in zip(encoder.blocks, layers, strict=True):
        h = block.norm(x)
        x = x + (layer(h.flip(1)).flip(1) if block.flip else layer(h))
    return encoder.norm(x)


@pytest.mark.parametrize("seq", [7, 251])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_encoder_matches_package_layers(seq, mode):
    encoder = perturbed_encoder(depth=2, max_tokens=251, flip=True)
    layers = package_layers(encoder)
    encoder.train(mode == "train")
    for layer in layers:
        layer.train(mode == "train")
    x = torch.randn(2, seq, 192, requires_grad=True)
    expected = package_encoder_forward(encoder, layers, x)
    if mode == "eval":  # inference: no autograd, the in-place path
        with torch.no_grad():
            assert_scaled_close(encoder(x), expected, F32_TOL, "encoder output")
        return
    actual = encoder(x)
    assert_scaled_close(actual, expected, F32_TOL, "encoder output")
    grad_out = torch.randn_like(expected)
    shared = [p for n, p in encoder.named_parameters() if ".layer." not in n]  # norms, used by both
    fast = [p for n, p in encoder.named_parameters() if ".layer." in n]
    names = [n for n, _ in encoder.named_parameters() if ".layer." in n]
    reference = [p for layer in layers for p in layer.parameters()]
    assert len(reference) == len(fast)
    expected_grads = torch.autograd.grad(expected, [x, *shared, *reference], grad_out)
    actual_grads = torch.autograd.grad(actual, [x, *shared, *fast], grad_out)
    all_names = ["x"] + [n for n, _ in encoder.named_parameters() if ".layer." not in n] + names
    for name, a, e in zip(all_names, actual_grads, expected_grads, strict=True):
        assert_scaled_close(a, e, F32_TOL, name)


def test_layer_matches_package_with_strongly_forgetting_gates():
    """Decays far below exp(-60) (clamped here, denormal or zero in the package) change nothing visible."""
    encoder = perturbed_encoder(depth=1, max_tokens=251, flip=False)
    block = encoder.blocks[0]
    with torch.no_grad():
        block.layer.mlstm_cell.fgate.bias.copy_(torch.tensor([-4.0, -2.0, 0.0, 4.0]))
    (layer,) = package_layers(encoder)
    x = torch.randn(2, 251, 192, requires_grad=True)
    expected = layer(x)
    actual = mlstm_layer_forward(block.layer, x)
    assert_scaled_close(actual, expected, F32_TOL, "output")
    grad_out = torch.randn_like(expected)
    e_grads = torch.autograd.grad(expected, [x, *layer.parameters()], grad_out)
    a_grads = torch.autograd.grad(actual, [x, *block.layer.parameters()], grad_out)
    for name, a, e in zip(["x"] + [n for n, _ in layer.named_parameters()], a_grads, e_grads, strict=True):
        assert_scaled_close(a, e, F32_TOL, name)


def test_state_dicts_move_between_package_layer_and_fast_block():
    encoder = perturbed_encoder(depth=1, max_tokens=251, flip=False)
    block_layer = encoder.blocks[0].layer
    package = mLSTMLayer(block_layer.config)
    assert set(package.state_dict()) == set(block_layer.state_dict())
    package.load_state_dict(block_layer.state_dict())
    fresh = XLSTMEncoder(192, 1, 251)
    fresh.blocks[0].layer.load_state_dict(package.state_dict())
    for (name, a), b in zip(
        block_layer.state_dict().items(), fresh.blocks[0].layer.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_bfloat16_autocast_runs_and_stays_close():
    encoder = perturbed_encoder(depth=1, max_tokens=64, flip=False)
    layers = package_layers(encoder)
    x = torch.randn(2, 64, 192, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = package_encoder_forward(encoder, layers, x)
        actual = encoder(x)
        with torch.no_grad():
            inferred = encoder(x)
    assert_scaled_close(actual.float(), expected.float(), 0.05, "train output")
    assert_scaled_close(inferred.float(), expected.float(), 0.05, "inference output")
    actual.float().square().sum().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
