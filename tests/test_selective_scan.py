"""The portable selective scan against its step-by-step oracle: outputs, all gradients, edge cases."""

from __future__ import annotations

import itertools

import pytest
import torch

from msm_lightning.model.encoders.scan_inputs import ScanInputs
from msm_lightning.model.encoders.selective_scan import selective_scan, selective_scan_reference
from msm_lightning.model.encoders.torch_scan import chunked_selective_scan, default_chunk_size

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(
    batch: int,
    d_inner: int,
    n_state: int,
    seq: int,
    *,
    with_D: bool = True,
    with_z: bool = True,
    with_bias: bool = True,
    softplus: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Mamba-like inputs; u, delta, z, B, C are transposed views of [batch, L, C] like in the mixer."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def seq_major(channels: int) -> torch.Tensor:
        return randn(batch, seq, channels).transpose(1, 2)  # [batch, channels, L], non-contiguous

    # S4D-real style A = -(1..N) with per-channel jitter; step sizes in Mamba's initial range.
    A = -(torch.arange(1, n_state + 1, dtype=torch.float64) * (0.5 + torch.rand(d_inner, 1, generator=g)))
    if softplus:
        delta = seq_major(d_inner) * 0.5 - 3.0  # softplus(.) ~ 0.002 .. 0.3
    else:
        delta = 0.01 + 0.3 * torch.rand(batch, seq, d_inner, generator=g, dtype=torch.float64).transpose(1, 2)
    inputs = {
        "u": seq_major(d_inner),
        "delta": delta,
        "A": A,
        "B": seq_major(n_state),
        "C": seq_major(n_state),
        "D": randn(d_inner) if with_D else None,
        "z": seq_major(d_inner) if with_z else None,
        # Without softplus the raw steps must stay positive, else exp(delta * A) > 1 and the scan explodes.
        "delta_bias": (0.5 * randn(d_inner) if softplus else 0.05 * randn(d_inner).abs())
        if with_bias
        else None,
    }
    return {k: (v.to(dtype).requires_grad_() if v is not None else None) for k, v in inputs.items()}


def run_with_grads(
    fn, inputs: dict[str, torch.Tensor | None], softplus: bool, grad_out: torch.Tensor, **kwargs: object
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output of `fn` and the gradients of <output, grad_out> w.r.t. every tensor input."""
    out = fn(**inputs, delta_softplus=softplus, **kwargs)
    present = {k: v for k, v in inputs.items() if v is not None}
    grads = torch.autograd.grad(out, list(present.values()), grad_out)
    return out.detach(), dict(zip(present, grads, strict=True))


def chunked(chunk_size: int | None = None, **arguments: object) -> torch.Tensor:
    """The chunked PyTorch scan called like `selective_scan`, with an explicit chunk size."""
    return chunked_selective_scan(ScanInputs(**arguments), chunk_size)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float, rtol: float) -> None:
    """torch.testing.assert_close with a message naming the compared quantity."""
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# The public entry point runs the compiled CPU kernel by default; every public-API test runs both paths.
KERNEL_OR_TORCH = [True, False]

OPTIONS = list(itertools.product([False, True], repeat=4))  # with_D, with_z, with_bias, softplus


IMPLEMENTATIONS = {
    # 29 steps = 3 full chunks of 8 and a partial one
    "chunked": lambda **kw: chunked(**kw, chunk_size=8),
    # 37 channels = two full blocks of 16 and a partial one
    "kernel": lambda **kw: selective_scan(**kw, use_kernel=True),
}


@pytest.mark.parametrize(("with_D", "with_z", "with_bias", "softplus"), OPTIONS)
@pytest.mark.parametrize("seq", [1, 29])
@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_matches_reference_outputs_and_gradients(
    with_D: bool, with_z: bool, with_bias: bool, softplus: bool, seq: int, implementation: str
) -> None:
    """Every option combination, both implementations: output and all input gradients match the oracle."""
    inputs = make_inputs(3, 37, 5, seq, with_D=with_D, with_z=with_z, with_bias=with_bias, softplus=softplus)
    grad_out = torch.randn(3, 37, seq, generator=torch.Generator().manual_seed(1))
    out, grads = run_with_grads(IMPLEMENTATIONS[implementation], inputs, softplus, grad_out)
    ref_out, ref_grads = run_with_grads(selective_scan_reference, inputs, softplus, grad_out)
    assert out.shape == (3, 37, seq)
    assert out.dtype == torch.float32
    assert_close(out, ref_out, "output", atol=1e-5, rtol=1e-4)
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert grads[name].shape == inputs[name].shape, name
        assert_close(grads[name], ref_grads[name], f"grad {name}", atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("use_kernel", KERNEL_OR_TORCH)
def test_default_chunking_with_partial_last_chunk(use_kernel: bool) -> None:
    """The public entry point with its default chunk size, on a sequence that ends mid-chunk."""
    batch, d_inner, n_state, seq = 4, 64, 8, 150
    chunk = default_chunk_size(batch, n_state, d_inner)
    assert 4 <= chunk < seq and seq % chunk != 0
    assert default_chunk_size(8, 24, 576) == 8  # Mamba-Tiny training shapes
    inputs = make_inputs(batch, d_inner, n_state, seq, seed=13)
    grad_out = torch.randn(batch, d_inner, seq, generator=torch.Generator().manual_seed(14))
    out, grads = run_with_grads(selective_scan, inputs, True, grad_out, use_kernel=use_kernel)
    ref_out, ref_grads = run_with_grads(selective_scan_reference, inputs, True, grad_out)
    assert_close(out, ref_out, "output", atol=1e-5, rtol=1e-4)
    for name in grads:
        assert_close(grads[name], ref_grads[name], f"grad {name}", atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 64])
def test_chunk_size_does_not_change_results(chunk_size: int) -> None:
    """From one step per chunk to one chunk for the whole sequence, results agree."""
    inputs = make_inputs(3, 8, 4, 29, seed=2)
    grad_out = torch.randn(3, 8, 29, generator=torch.Generator().manual_seed(3))
    out, grads = run_with_grads(chunked, inputs, True, grad_out, chunk_size=chunk_size)
    ref_out, ref_grads = run_with_grads(selective_scan_reference, inputs, True, grad_out)
    assert_close(out, ref_out, "output", atol=1e-5, rtol=1e-4)
    for name in grads:
        assert_close(grads[name], ref_grads[name], f"grad {name}", atol=1e-4, rtol=1e-3)


def test_gradcheck_float64() -> None:
    """Finite differences in float64 with every option on, across three chunks."""
    inputs = make_inputs(2, 3, 2, 7, dtype=torch.float64, seed=4)
    names = list(inputs)

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        return chunked(**dict(zip(names, tensors, strict=True)), delta_softplus=True, chunk_size=3)

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_float64_without_options() -> None:
    """Finite differences in float64 for the bare scan (no D, z, bias, softplus)."""
    inputs = make_inputs(1, 2, 3, 5, with_D=False, with_z=False, with_bias=False, softplus=False, seed=5)
    inputs = {k: v.detach().double().requires_grad_() for k, v in inputs.items() if v is not None}
    names = list(inputs)

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        return chunked(**dict(zip(names, tensors, strict=True)), chunk_size=2)

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("use_kernel", KERNEL_OR_TORCH)
def test_long_sequence_with_huge_steps_stays_finite_and_exact(use_kernel: bool) -> None:
    """L = 4096 with steps up to ~1e3: finite everywhere and equal to the oracle."""
    seq = 4096
    inputs = make_inputs(1, 4, 3, seq, softplus=True, seed=6)
    with torch.no_grad():
        # Step sizes from ~1e-4 to ~1e3 (pre-softplus up to 1000): decays underflow to exactly 0.
        pre = torch.linspace(-9.0, 1000.0, seq).roll(seq // 3)
        inputs["delta"].copy_(pre.expand(1, 4, seq) + torch.randn(1, 4, seq))
    grad_out = torch.randn(1, 4, seq, generator=torch.Generator().manual_seed(7))
    out, grads = run_with_grads(selective_scan, inputs, True, grad_out, use_kernel=use_kernel)
    ref_out, ref_grads = run_with_grads(selective_scan_reference, inputs, True, grad_out)
    assert torch.isfinite(out).all()
    assert_close(out, ref_out, "output", atol=1e-4, rtol=1e-3)
    for name in grads:
        assert torch.isfinite(grads[name]).all(), name
        assert_close(grads[name], ref_grads[name], f"grad {name}", atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("use_kernel", KERNEL_OR_TORCH)
def test_long_sequence_without_softplus_huge_raw_steps(use_kernel: bool) -> None:
    """Raw (no softplus) steps up to ~300 over 4100 steps: finite output and gradients."""
    seq = 4100
    inputs = make_inputs(2, 3, 2, seq, softplus=False, with_bias=False, seed=8)
    with torch.no_grad():
        inputs["delta"].mul_(torch.logspace(-3, 3, seq))  # raw steps up to ~300
    out = selective_scan(**inputs, use_kernel=use_kernel)
    ref = selective_scan_reference(**inputs)
    assert torch.isfinite(out).all()
    assert_close(out, ref, "output", atol=1e-4, rtol=1e-3)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in inputs.values() if t is not None)


@pytest.mark.parametrize("use_kernel", KERNEL_OR_TORCH)
def test_bfloat16_inputs_give_bfloat16_output_close_to_float32(use_kernel: bool) -> None:
    """bf16 in, bf16 out (and bf16 gradients), computed in float32 internally."""
    inputs = make_inputs(2, 16, 4, 40, dtype=torch.bfloat16, seed=9)
    out = selective_scan(**inputs, delta_softplus=True, use_kernel=use_kernel)
    as_float = {k: v.detach().float() if v is not None else None for k, v in inputs.items()}
    expected = selective_scan_reference(**as_float, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), expected, "bf16 output", atol=2e-2, rtol=1e-2)
    out.float().square().sum().backward()
    for name, tensor in inputs.items():
        assert tensor.grad is not None and tensor.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(tensor.grad.float()).all(), name


@pytest.mark.parametrize("use_kernel", KERNEL_OR_TORCH)
def test_autocast_runs_in_float32(use_kernel: bool) -> None:
    """Under CPU autocast the scan still computes in float32 and returns u's dtype."""
    inputs = make_inputs(2, 8, 3, 19, seed=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selective_scan(**inputs, delta_softplus=True, use_kernel=use_kernel)
    assert out.dtype == torch.float32
    assert_close(out, selective_scan_reference(**inputs, delta_softplus=True), "output", atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("use_kernel", KERNEL_OR_TORCH)
def test_no_grad_path_matches_and_layouts_do_not_matter(use_kernel: bool) -> None:
    """The inference path equals the autograd path; strided and contiguous inputs agree."""
    inputs = make_inputs(3, 10, 4, 21, seed=11)
    with torch.no_grad():
        fast = selective_scan(**inputs, delta_softplus=True, use_kernel=use_kernel)
        contiguous = {k: v.contiguous() if v is not None else None for k, v in inputs.items()}
        same = selective_scan(**contiguous, delta_softplus=True, use_kernel=use_kernel)
    assert not fast.requires_grad
    with_grad = selective_scan(**inputs, delta_softplus=True, use_kernel=use_kernel)
    assert with_grad.requires_grad
    torch.testing.assert_close(fast, with_grad.detach(), atol=0, rtol=0)
    torch.testing.assert_close(fast, same, atol=1e-6, rtol=1e-6)  # strided kernels may round differently
    ref = selective_scan_reference(**inputs, delta_softplus=True)
    assert_close(fast, ref.detach(), "output", atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("use_kernel", KERNEL_OR_TORCH)
def test_gradient_only_for_some_inputs(use_kernel: bool) -> None:
    """Only some inputs require grad: those gradients are still right."""
    inputs = make_inputs(2, 6, 3, 11, seed=12)
    frozen = {k: (v.detach() if k not in ("u", "A") else v) for k, v in inputs.items()}
    out = selective_scan(**frozen, delta_softplus=True, use_kernel=use_kernel)
    gu, gA = torch.autograd.grad(out.sum(), [frozen["u"], frozen["A"]])
    ref = selective_scan_reference(**frozen, delta_softplus=True)
    ru, rA = torch.autograd.grad(ref.sum(), [frozen["u"], frozen["A"]])
    assert_close(gu, ru, "grad u", atol=1e-4, rtol=1e-3)
    assert_close(gA, rA, "grad A", atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("use_kernel", KERNEL_OR_TORCH)
def test_shape_errors_are_reported(use_kernel: bool) -> None:
    """Mismatched shapes raise ValueError naming the argument."""
    inputs = make_inputs(2, 6, 3, 11)
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(**{**inputs, "B": inputs["B"][:, :2]}, use_kernel=use_kernel)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**{**inputs, "A": inputs["A"][:5]}, use_kernel=use_kernel)
