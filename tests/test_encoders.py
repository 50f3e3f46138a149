"""Every preset builds, matches the paper's size, trains (forward + backward), and Mamba's two paths agree."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from msm_lightning.model.encoders import mamba as mamba_module
from msm_lightning.model.encoders import selective_scan as scan_module
from msm_lightning.model.encoders.mamba import MambaMixer, fused_path
from msm_lightning.model.encoders.selective_scan import selective_scan_reference
from msm_lightning.model.families import FAMILIES, WIDTHS
from msm_lightning.model.masking import random_mask
from msm_lightning.model.msm import MaskedSpectrogramModel

# docs/METHOD.md §3, millions of parameters including the reconstruction head.
REFERENCE_PARAMS = {
    ("transformer", "tiny"): 5.4,
    ("transformer", "small"): 21.5,
    ("transformer", "base"): 85.7,
    ("mamba", "tiny"): 4.8,
    ("mamba", "small"): 17.9,
    ("mamba", "base"): 69.3,
    ("xlstm", "tiny"): 4.3,
    ("xlstm", "small"): 16.7,
    ("xlstm", "base"): 65.6,
}
XLSTM_EF2 = {"tiny": 2.9, "small": 11.2, "base": 44.0}


def count(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize(("family", "size"), list(REFERENCE_PARAMS))
def test_parameter_count_matches_paper(family, size):
    model = MaskedSpectrogramModel.from_preset(family, size)
    assert count(model) == pytest.approx(REFERENCE_PARAMS[family, size], rel=0.03)


@pytest.mark.parametrize("size", list(WIDTHS))
def test_xlstm_expansion_2_matches_paper(size):
    model = MaskedSpectrogramModel.from_preset("xlstm", size, encoder_kwargs={"proj_factor": 2.0})
    assert count(model) == pytest.approx(XLSTM_EF2[size], rel=0.03)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_forward_backward_every_parameter_gets_a_gradient(family):
    torch.manual_seed(0)
    model = MaskedSpectrogramModel.from_preset(family, "tiny", depth=2)
    spec = torch.randn(2, 1, 200, 80)
    feats = model(spec)
    assert feats.shape == (2, 251, 192) and torch.isfinite(feats).all()
    loss = model.masked_loss(spec, random_mask(2, 250, 0.5))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_xlstm_flip_reverses_odd_blocks_and_changes_output():
    torch.manual_seed(0)
    plain = MaskedSpectrogramModel.from_preset("xlstm", "tiny", depth=2)
    flipped = MaskedSpectrogramModel.from_preset("xlstm", "tiny", depth=2, encoder_kwargs={"flip": True})
    flipped.load_state_dict(plain.state_dict())
    assert [b.flip for b in flipped.encoder.blocks] == [False, True]
    spec = torch.randn(1, 1, 200, 80)
    assert not torch.allclose(plain(spec), flipped(spec))


def test_unidirectional_encoders_are_causal():
    """Mamba and xLSTM read the sequence forwards: a late token cannot change an early output."""
    torch.manual_seed(0)
    for family in ("mamba", "xlstm"):
        enc = MaskedSpectrogramModel.from_preset(family, "tiny", depth=2).encoder
        x = torch.randn(1, 251, 192)
        y = x.clone()
        y[:, 200:] += 1.0
        torch.testing.assert_close(enc(x)[:, :200], enc(y)[:, :200], atol=1e-5, rtol=1e-5)


# Shapes of mamba_ssm.modules.mamba_simple.Mamba(d_model=192, d_state=24, d_conv=4, expand=3):
MAMBA_SIMPLE_SHAPES = {
    "in_proj.weight": (1152, 192),
    "conv1d.weight": (576, 1, 4),
    "conv1d.bias": (576,),
    "x_proj.weight": (12 + 2 * 24, 576),
    "dt_proj.weight": (576, 12),
    "dt_proj.bias": (576,),
    "A_log": (576, 24),
    "D": (576,),
    "out_proj.weight": (192, 576),
}


def test_mamba_mixer_state_dict_matches_mamba_ssm():
    mixer = MambaMixer(192, d_state=24, d_conv=4, expand=3)
    shapes = {k: tuple(v.shape) for k, v in mixer.state_dict().items()}
    assert shapes == MAMBA_SIMPLE_SHAPES
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6  # inverse-softplus dt init
    torch.testing.assert_close(-torch.exp(mixer.A_log[0]), -torch.arange(1.0, 25.0))


def test_fused_path_switch():
    assert not fused_path(True, True, "cpu")
    assert not fused_path(False, True, "cuda")
    assert fused_path(True, True, "cuda")
    scan_module._warned_fallback = False
    with pytest.warns(UserWarning, match="mamba-ssm kernels are not installed"):
        assert not fused_path(True, False, "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warns once only
        assert not fused_path(True, False, "cuda")


def reference_mamba_inner_fn(
    xz,
    conv1d_weight,
    conv1d_bias,
    x_proj_weight,
    delta_proj_weight,
    out_proj_weight,
    out_proj_bias,
    A,
    B=None,
    C=None,
    D=None,
    delta_bias=None,
    delta_softplus=True,
):
    """mamba-ssm's mamba_inner_fn semantics, in plain PyTorch, written from its documented behaviour."""
    seq = xz.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = F.silu(
        F.conv1d(x, conv1d_weight, conv1d_bias, padding=conv1d_weight.shape[-1] - 1, groups=x.shape[1])
    )
    x = x[..., :seq]
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)
    rank, n = delta_proj_weight.shape[1], A.shape[1]
    dt, B, C = x_dbl.split([rank, n, n], dim=-1)
    delta = F.linear(dt, delta_proj_weight).transpose(1, 2)
    y = selective_scan_reference(
        x,
        delta,
        A,
        B.transpose(1, 2),
        C.transpose(1, 2),
        D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
    )
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)


def test_fused_dispatch_passes_the_parameters_mamba_inner_fn_expects(monkeypatch):
    """The GPU path cannot run here: check that forward dispatches to it and hands it compatible arguments."""
    torch.manual_seed(0)
    mixer = MambaMixer(64, d_state=8, expand=2)
    x = torch.randn(2, 37, 64)
    portable = mixer(x)
    calls = []

    def fake_inner(*args, **kwargs):
        calls.append(1)
        return reference_mamba_inner_fn(*args, **kwargs)

    monkeypatch.setattr(mamba_module, "mamba_inner_fn", fake_inner)
    monkeypatch.setattr(mamba_module, "FUSED_KERNELS_AVAILABLE", True)
    monkeypatch.setattr(
        mamba_module, "fused_path", lambda requested, available, device: requested and available
    )
    fused = mixer(x)
    assert calls == [1]
    torch.testing.assert_close(fused, portable, atol=1e-5, rtol=1e-4)
    mixer.use_fused_kernels = False
    mixer(x)
    assert calls == [1]


def test_headwise_projection_matches_xlstm_package():
    from xlstm.components.linear_headwise import LinearHeadwiseExpand, LinearHeadwiseExpandConfig

    from msm_lightning.model.encoders.xlstm import HeadwiseProjection

    torch.manual_seed(0)
    ref = LinearHeadwiseExpand(LinearHeadwiseExpandConfig(in_features=48, num_heads=12, bias=True))
    torch.nn.init.normal_(ref.bias)
    fast = HeadwiseProjection(ref)
    x = torch.randn(2, 7, 48, requires_grad=True)
    torch.testing.assert_close(fast(x), ref(x))
    assert fast.weight is ref.weight
    g_ref = torch.autograd.grad(ref(x).square().sum(), (x, ref.weight))
    g_fast = torch.autograd.grad(fast(x).square().sum(), (x, fast.weight))
    for a, b in zip(g_ref, g_fast, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_xlstm_state_dict_keeps_package_names():
    model = MaskedSpectrogramModel.from_preset("xlstm", "tiny", depth=1)
    keys = set(model.encoder.state_dict())
    for name in (
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
        "proj_up.weight",
        "mlstm_cell.igate.weight",
    ):
        assert f"blocks.0.layer.{name}" in keys
