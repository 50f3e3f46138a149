"""The compiled CPU selective scan: agreement with the PyTorch scan, dispatch, build and fallback.

Its comparison with the step-by-step oracle for every option is in test_selective_scan.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_selective_scan import assert_close, make_inputs, run_with_grads

from msm_lightning.model.encoders import cpu_scan
from msm_lightning.model.encoders import selective_scan as scan_module
from msm_lightning.model.encoders.mamba import MambaMixer
from msm_lightning.model.encoders.selective_scan import (
    kernel_applies,
    selective_scan,
    selective_scan_reference,
)


@pytest.fixture(scope="session")
def kernel() -> cpu_scan.ScanKernel:
    """The compiled kernel, built on first use in the session rather than at collection; skips without it."""
    kernel = cpu_scan.load_kernel()
    if kernel is None:
        pytest.skip("no C compiler on this machine")
    return kernel


pytestmark = pytest.mark.usefixtures("kernel")


def test_kernel_matches_torch_scan_at_mamba_tiny_shapes() -> None:
    """The two implementations agree at the shapes of a Mamba-T layer (batch 2 to keep it quick)."""
    inputs = make_inputs(2, 576, 24, 251, seed=3)
    grad_out = torch.randn(2, 576, 251, generator=torch.Generator().manual_seed(4))
    out, grads = run_with_grads(selective_scan, inputs, True, grad_out, use_kernel=True)
    ref_out, ref_grads = run_with_grads(selective_scan, inputs, True, grad_out, use_kernel=False)
    assert_close(out, ref_out, "output", atol=1e-5, rtol=1e-4)
    for name in grads:
        assert_close(grads[name], ref_grads[name], f"grad {name}", atol=1e-4, rtol=1e-3)


def test_nan_input_gives_nan_output_not_a_number() -> None:
    """A NaN in u reaches the output of its channel from that step on instead of vanishing."""
    inputs = make_inputs(1, 4, 3, 10, seed=5)
    with torch.no_grad():
        inputs["u"][0, 2, 4] = float("nan")
        out = selective_scan(**inputs, delta_softplus=True, use_kernel=True)
    assert torch.isnan(out[0, 2, 4:]).all()
    assert torch.isfinite(out[0, 2, :4]).all() and torch.isfinite(out[0, [0, 1, 3]]).all()


def test_threads_do_not_change_results() -> None:
    """Threads own batch items (backward) or channel blocks (forward): results are bitwise identical."""
    inputs = make_inputs(4, 40, 6, 33, seed=6)
    grad_out = torch.randn(4, 40, 33, generator=torch.Generator().manual_seed(7))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_with_grads(selective_scan, inputs, True, grad_out, use_kernel=True)
        torch.set_num_threads(2)
        two = run_with_grads(selective_scan, inputs, True, grad_out, use_kernel=True)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one[0], two[0], atol=0, rtol=0)
    for name in one[1]:
        torch.testing.assert_close(one[1][name], two[1][name], atol=0, rtol=0, msg=name)


def test_dispatch_rules() -> None:
    """The kernel runs for CPU float32/bf16 when asked; float64 (gradcheck) and use_kernel=False do not."""
    A = torch.zeros(4, 3)
    assert kernel_applies(torch.zeros(1, 4, 2), A, True) is not None
    assert kernel_applies(torch.zeros(1, 4, 2, dtype=torch.bfloat16), A, True) is not None
    assert kernel_applies(torch.zeros(1, 4, 2, dtype=torch.float64), A, True) is None
    assert kernel_applies(torch.zeros(1, 4, 2), A, False) is None
    assert kernel_applies(torch.zeros(1, 4, 2), torch.zeros(4, 10_000), True) is None  # N over the limit


def test_mamba_mixer_switch_selects_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """`use_fused_kernels` is the one switch: on (default) the CPU kernel runs, off it does not."""
    calls = []
    real = scan_module.kernel_selective_scan

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scan_module, "kernel_selective_scan", counting)
    torch.manual_seed(0)
    mixer = MambaMixer(32, d_state=4, expand=2)
    x = torch.randn(2, 9, 32)
    with_kernel = mixer(x)
    assert calls == [1]
    mixer.use_fused_kernels = False
    without = mixer(x)
    assert calls == [1]
    torch.testing.assert_close(with_kernel, without, atol=1e-5, rtol=1e-4)


def test_build_is_cached_per_source_and_flags(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second build reuses the library; the file name changes when the flags do."""
    compiler = cpu_scan.find_compiler()
    first = cpu_scan.build_kernel(compiler, tmp_path)
    mtime = first.stat().st_mtime_ns
    assert cpu_scan.build_kernel(compiler, tmp_path) == first and first.stat().st_mtime_ns == mtime
    monkeypatch.setattr(cpu_scan, "compile_flags", lambda: [*cpu_scan._BASE_FLAGS, "-DUNUSED_FLAG"])
    assert cpu_scan.build_kernel(compiler, tmp_path) != first
    assert [p.suffix for p in tmp_path.iterdir()] == [".so", ".so"]  # no temporary files left behind


def test_missing_compiler_falls_back_with_one_warning(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a working compiler the scan still runs (PyTorch path) after a single warning."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MSM_CACHE_DIR", str(tmp_path / "cache"))
    cpu_scan.load_kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="compiled CPU selective scan is unavailable"):
            assert cpu_scan.load_kernel() is None
        inputs = make_inputs(1, 4, 3, 6, seed=8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = selective_scan(**inputs, delta_softplus=True)
        assert_close(out, selective_scan_reference(**inputs, delta_softplus=True), "output", 1e-5, 1e-4)
    finally:
        cpu_scan.load_kernel.cache_clear()
