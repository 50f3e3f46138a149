"""The compiled CPU selective scan (`scan_kernel.c`): built with the system C compiler on first use, cached.

The portable PyTorch scan (`selective_scan.py`) is memory-bound on a CPU: every vectorised op streams
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
    """ctypes bindings of the compiled forward and backward; tensors must already be float32."""

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
    def args(inputs: ScanInputs, out: torch.Tensor | None = None) -> ScanArgs:
        """The C argument struct of `inputs` (and the output tensor of a forward)."""
        batch, d_inner, seq = inputs.u.shape
        return ScanArgs(
            View3.of(inputs.u),
            View3.of(inputs.delta),
            View3.of(inputs.z),
            View3.of(out),
            *(_ptr(t) for t in (inputs.A, inputs.B_t, inputs.C_t, inputs.D, inputs.bias)),
            batch,
            d_inner,
            seq,
            inputs.A.shape[1],
            int(inputs.softplus),
            torch.get_num_threads(),
        )

    def forward(self, inputs: ScanInputs) -> torch.Tensor:
        """out [batch, d_inner, L], time-major in memory ([batch, L, d_inner]) as out_proj reads it."""
        batch, d_inner, seq = inputs.u.shape
        out = inputs.u.new_empty(batch, seq, d_inner).transpose(1, 2)
        self.lib.msm_scan_forward(ctypes.byref(self.args(inputs, out)))
        return out

    def backward(self, inputs: ScanInputs, grad_out: torch.Tensor, need_z: bool) -> dict[str, torch.Tensor]:
        """Gradients of every input (z only if `need_z`), reduced over batch where the input has no batch."""
        batch, d_inner, _ = inputs.u.shape
        n_state = inputs.A.shape[1]
        grads = {
            "u": empty_like_layout(inputs.u),
            "delta": empty_like_layout(inputs.delta),
            "z": empty_like_layout(inputs.z) if inputs.z is not None and need_z else None,
            "A": inputs.u.new_empty(batch, d_inner, n_state),
            "B_t": torch.empty_like(inputs.B_t),
            "C_t": torch.empty_like(inputs.C_t),
            "D": inputs.u.new_empty(batch, d_inner) if inputs.D is not None else None,
            "bias": inputs.u.new_empty(batch, d_inner) if inputs.bias is not None else None,
        }
        c_grads = ScanGrads(
            View3.of(grad_out),
            *(View3.of(grads[k]) for k in ("u", "delta", "z")),
            *(_ptr(grads[k]) for k in ("A", "B_t", "C_t", "D", "bias")),
        )
        status = self.lib.msm_scan_backward(ctypes.byref(self.args(inputs)), ctypes.byref(c_grads))
        if status != 0:
            raise MemoryError(f"scan kernel: no memory for the work buffers of {inputs.u.shape[2]} steps")
        for k in ("A", "D", "bias"):  # per batch item partial sums
            if grads[k] is not None:
                grads[k] = grads[k].sum(0)
        return grads


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


def empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    """Dense uninitialised tensor like x (perhaps a strided view), dimensions in the same memory order."""
    order = sorted(range(x.dim()), key=lambda i: (-x.stride(i), i))
    out = x.new_empty([x.shape[i] for i in order])
    return out.permute([order.index(i) for i in range(x.dim())])


class ScanInputs:
    """The scan's inputs as the kernel needs them: float32; A, B_t, C_t, D, bias contiguous."""

    def __init__(
        self,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None,
        z: torch.Tensor | None,
        bias: torch.Tensor | None,
        softplus: bool,
    ) -> None:
        self.u, self.delta, self.z = _f32(u), _f32(delta), _f32(z)
        # B, C come as [b, N, L] views of x_proj's [b, L, .] output: transposing back is free, the copy small.
        self.B_t = B.transpose(1, 2).to(torch.float32).contiguous()
        self.C_t = C.transpose(1, 2).to(torch.float32).contiguous()
        self.A = A.to(torch.float32).contiguous()
        self.D = None if D is None else D.to(torch.float32).contiguous()
        self.bias = None if bias is None else bias.to(torch.float32).contiguous()
        self.softplus = softplus

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """Everything the backward needs, for `save_for_backward`."""
        return (self.u, self.delta, self.A, self.B_t, self.C_t, self.D, self.z, self.bias)


class _KernelScanFn(torch.autograd.Function):
    """The whole selective scan through the compiled kernel; the backward recomputes the states."""

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
        bias: torch.Tensor | None,
        softplus: bool,
        kernel: ScanKernel,
    ) -> torch.Tensor:
        """Inputs as in `selective_scan`; returns out [b, d, L] in u's dtype."""
        inputs = ScanInputs(u, delta, A, B, C, D, z, bias, softplus)
        ctx.kernel, ctx.softplus = kernel, softplus
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, bias)]
        ctx.save_for_backward(*inputs.tensors())
        return kernel.forward(inputs).to(u.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:
        """Gradients for u, delta, A, B, C, D, z, bias in their input dtypes."""
        u, delta, A, B_t, C_t, D, z, bias = ctx.saved_tensors
        inputs = ScanInputs(u, delta, A, B_t.transpose(1, 2), C_t.transpose(1, 2), D, z, bias, ctx.softplus)
        g = ctx.kernel.backward(inputs, grad_out.to(torch.float32), need_z=ctx.needs_input_grad[6])
        grads = [g["u"], g["delta"], g["A"], g["B_t"].transpose(1, 2), g["C_t"].transpose(1, 2)]
        grads += [g["D"], g["z"], g["bias"]]
        out = [
            None if grad is None or not need else grad.to(dtype)
            for grad, need, dtype in zip(grads, ctx.needs_input_grad, ctx.dtypes, strict=False)
        ]
        return (*out, None, None)


def kernel_selective_scan(
    kernel: ScanKernel,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> torch.Tensor:
    """`selective_scan` (same arguments and result) run by the compiled kernel."""
    with torch.autocast(device_type="cpu", enabled=False):
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias)
        ):
            return _KernelScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, kernel)
        inputs = ScanInputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return kernel.forward(inputs).to(u.dtype)
