"""The compiled CPU selective scan (`scan_kernel.c`): built with the system C compiler on first use, cached.

The portable PyTorch scan (`torch_scan.py`) is memory-bound on a CPU: every vectorised op streams
[steps, batch, N, d_inner] state buffers through memory. The C kernel keeps one channel's N states in
registers for the whole sequence, which makes a Mamba-T layer's scan about 3x faster forward and backward.
It is a speed-up, not a dependency: when no compiler is found or the build fails, `load_kernel` returns
None once with a warning and callers stay on the PyTorch scan.

The shared library goes to `$MSM_CACHE_DIR` (default `~/.cache/msm-lightning`) under a name derived from
the source, the flags and the compiler, so a changed kernel is rebuilt and machines with different vector
units (a cluster's nodes) do not share a binary built for the wrong one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from msm_lightning.model.encoders.scan_inputs import (
    ScanInputs,
    empty_like_layout,
    empty_output,
    input_grads,
    needs_grad,
)

SOURCE = Path(__file__).with_name("scan_kernel.c")
_BASE_FLAGS = [
    "-O3",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fno-signed-zeros",
    "-ffinite-math-only",
    "-fopenmp",
    "-shared",
    "-fPIC",
]


def compile_flags() -> list[str]:
    """Compiler flags: the base set plus AVX2/FMA when PyTorch reports that this CPU has them."""
    capability = torch.backends.cpu.get_cpu_capability()
    return _BASE_FLAGS + (["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else [])


def cache_dir() -> Path:
    """Folder for compiled kernels: $MSM_CACHE_DIR, else ~/.cache/msm-lightning."""
    return Path(os.environ.get("MSM_CACHE_DIR") or Path.home() / ".cache" / "msm-lightning")


def build_kernel(compiler: str, out_dir: Path) -> Path:
    """Compile the kernel into `out_dir` (atomically) unless already there; return the library's path."""
    flags = compile_flags()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), version]).encode()).hexdigest()
    target = out_dir / f"scan_kernel-{key[:16]}.so"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent DDP ranks may compile at the same time.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE}:\n{result.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class View3(ctypes.Structure):
    """A [batch, d_inner, L] float32 tensor for the kernel: data pointer and element strides."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("sb", ctypes.c_long),
        ("sd", ctypes.c_long),
        ("st", ctypes.c_long),
    ]

    @classmethod
    def of(cls, t: torch.Tensor | None) -> View3:
        """The view of `t` (float32, any strides), or a null view for None."""
        return cls(None, 0, 0, 0) if t is None else cls(t.data_ptr(), *t.stride())


class ScanArgs(ctypes.Structure):
    """The kernel's inputs (`scan_args` in scan_kernel.c)."""

    _fields_ = [
        *((name, View3) for name in ("u", "delta", "z", "out")),
        *((name, ctypes.c_void_p) for name in ("A", "B", "C", "D", "bias")),
        *((name, ctypes.c_long) for name in ("nb", "nd", "L", "N")),
        ("softplus", ctypes.c_int),
        ("threads", ctypes.c_int),
    ]


class ScanGrads(ctypes.Structure):
    """The kernel's gradient outputs (`scan_grads` in scan_kernel.c)."""

    _fields_ = [
        *((name, View3) for name in ("gout", "gu", "gdelta", "gz")),
        *((name, ctypes.c_void_p) for name in ("gA", "gB", "gC", "gD", "gbias")),
    ]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class ScanKernel:
    """ctypes bindings of the compiled forward and backward; they take the inputs in `kernel_layout`."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        lib.msm_scan_forward.argtypes = [ctypes.POINTER(ScanArgs)]
        lib.msm_scan_forward.restype = None
        lib.msm_scan_backward.argtypes = [ctypes.POINTER(ScanArgs), ctypes.POINTER(ScanGrads)]
        lib.msm_scan_backward.restype = ctypes.c_int
        lib.msm_scan_max_state.restype = ctypes.c_int
        self.lib = lib
        self.max_state = int(lib.msm_scan_max_state())

    @staticmethod
    def args(x: ScanInputs, out: torch.Tensor | None = None) -> ScanArgs:
        """The C argument struct of `x` (in `kernel_layout`) and the output tensor of a forward."""
        return ScanArgs(
            View3.of(x.u),
            View3.of(x.delta),
            View3.of(x.z),
            View3.of(out),
            # B and C are [b, N, L] views of contiguous [b, L, N] tensors, which the kernel reads.
            *(_ptr(t) for t in (x.A, x.B, x.C, x.D, x.delta_bias)),
            x.batch,
            x.d_inner,
            x.seq,
            x.n_state,
            int(x.delta_softplus),
            torch.get_num_threads(),
        )

    def forward(self, x: ScanInputs) -> torch.Tensor:
        """float32 out [batch, d_inner, L], laid out as [batch, L, d_inner] in memory (see `empty_output`)."""
        x = kernel_layout(x)
        out = empty_output(x.u)
        self.lib.msm_scan_forward(ctypes.byref(self.args(x, out)))
        return out

    def backward(
        self, x: ScanInputs, grad_out: torch.Tensor, need_z: bool
    ) -> tuple[torch.Tensor | None, ...]:
        """float32 gradients of `x.tensors()`, in order (z only if `need_z`), from a float32 grad_out."""
        x = kernel_layout(x)

        def per_batch_item(t: torch.Tensor | None, *shape: int) -> torch.Tensor | None:
            # The kernel's threads own batch items; their partial sums are reduced here.
            return None if t is None else x.u.new_empty(x.batch, *shape)

        g_u, g_delta = empty_like_layout(x.u), empty_like_layout(x.delta)
        g_z = empty_like_layout(x.z) if x.z is not None and need_z else None
        g_A = per_batch_item(x.A, x.d_inner, x.n_state)
        g_D, g_bias = per_batch_item(x.D, x.d_inner), per_batch_item(x.delta_bias, x.d_inner)
        g_B_t = torch.empty_like(x.B.transpose(1, 2))  # contiguous [b, L, N], as the kernel writes it
        g_C_t = torch.empty_like(x.C.transpose(1, 2))
        c_grads = ScanGrads(
            *(View3.of(t) for t in (grad_out, g_u, g_delta, g_z)),
            *(_ptr(t) for t in (g_A, g_B_t, g_C_t, g_D, g_bias)),
        )
        status = self.lib.msm_scan_backward(ctypes.byref(self.args(x)), ctypes.byref(c_grads))
        if status != 0:
            raise MemoryError(f"scan kernel: no memory for the work buffers of {x.seq} steps")
        g_A, g_D, g_bias = (None if t is None else t.sum(0) for t in (g_A, g_D, g_bias))
        return (g_u, g_delta, g_A, g_B_t.transpose(1, 2), g_C_t.transpose(1, 2), g_D, g_z, g_bias)


def find_compiler() -> str:
    """The C compiler: $CC, else `cc` or `gcc` on the PATH; RuntimeError if there is none."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    return compiler


@functools.cache
def load_kernel() -> ScanKernel | None:
    """The compiled kernel, built on first call; None (after one warning) when it cannot be built."""
    try:
        return ScanKernel(build_kernel(find_compiler(), cache_dir()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(
            f"the compiled CPU selective scan is unavailable, using the slower PyTorch scan: {err}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """float32 with the same strides when it already is (the kernel takes any [b, d, L] strides)."""
    return None if t is None else t.to(torch.float32)


def _f32_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _f32_time_major(t: torch.Tensor) -> torch.Tensor:
    # B, C come as [b, N, L] views of x_proj's [b, L, .] output: transposing back is free, the copy small.
    return t.transpose(1, 2).to(torch.float32).contiguous().transpose(1, 2)


def kernel_layout(x: ScanInputs) -> ScanInputs:
    """x as the kernel reads it: float32; A, D, bias contiguous; B, C views of contiguous [b, L, N] tensors.

    Inputs already in that layout are returned as they are (no copies).
    """
    return ScanInputs(
        _f32(x.u),
        _f32(x.delta),
        _f32_contiguous(x.A),
        _f32_time_major(x.B),
        _f32_time_major(x.C),
        _f32_contiguous(x.D),
        _f32(x.z),
        _f32_contiguous(x.delta_bias),
        x.delta_softplus,
    )


class _KernelScanFn(torch.autograd.Function):
    """The whole selective scan through the compiled kernel; the backward recomputes the states."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        kernel: ScanKernel,
        delta_softplus: bool,
        *tensors: torch.Tensor | None,
    ) -> torch.Tensor:
        """Scan `ScanInputs(*tensors, delta_softplus)`; returns out [b, d, L] in u's dtype."""
        x = ScanInputs(*tensors, delta_softplus=delta_softplus)
        f32 = kernel_layout(x)
        ctx.kernel, ctx.delta_softplus, ctx.dtypes = kernel, delta_softplus, x.dtypes()
        ctx.save_for_backward(*f32.tensors())
        return kernel.forward(f32).to(x.u.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:
        """Gradients for the eight tensors in their input dtypes."""
        x = ScanInputs(*ctx.saved_tensors, delta_softplus=ctx.delta_softplus)
        need_z = needs_grad(ctx.needs_input_grad, "z")
        grads = ctx.kernel.backward(x, grad_out.to(torch.float32), need_z=need_z)
        return input_grads(ctx.needs_input_grad, grads, ctx.dtypes)


def kernel_selective_scan(kernel: ScanKernel, x: ScanInputs) -> torch.Tensor:
    """The scan of `x` run by the compiled kernel, in u's dtype; differentiable."""
    with torch.autocast(device_type="cpu", enabled=False):
        if x.needs_autograd():
            return _KernelScanFn.apply(kernel, x.delta_softplus, *x.tensors())
        return kernel.forward(x).to(x.u.dtype)
