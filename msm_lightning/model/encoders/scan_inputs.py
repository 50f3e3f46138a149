"""The selective scan's inputs as one value, and the helpers every scan implementation shares.

`ScanInputs` is the one container of a scan's arguments: the dispatcher builds it once per call, the
implementations (`torch_scan.py`, `cpu_scan.py`) take it, and their autograd Functions, which autograd must
hand tensors positionally, rebuild it from `ScanInputs.tensors()` at the start of forward and backward.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import ParamSpec

import torch

TENSOR_FIELDS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

_P = ParamSpec("_P")


@dataclasses.dataclass(frozen=True, eq=False)
class ScanInputs:
    """Arguments of mamba-ssm's `selective_scan_fn` for real A and input-dependent B, C; checked on creation.

    u, delta, z: [batch, d_inner, L]; A: [d_inner, N]; B, C: [batch, N, L]; D, delta_bias: [d_inner]. Any
    strides and floating dtypes: each implementation reads the caller's layout as it is.
    """

    u: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor | None = None
    z: torch.Tensor | None = None
    delta_bias: torch.Tensor | None = None
    delta_softplus: bool = False

    def __post_init__(self) -> None:
        """Raise a ValueError naming the first argument whose shape does not fit the others."""
        if self.u.dim() != 3:
            raise ValueError(f"u must be [batch, d_inner, L], got {tuple(self.u.shape)}")
        if self.A.is_complex():
            raise ValueError("complex A is not supported by the portable selective scan")
        batch, d_inner, seq = self.u.shape
        if self.A.dim() != 2 or self.A.shape[0] != d_inner:
            raise ValueError(f"A must be [d_inner={d_inner}, N], got {tuple(self.A.shape)}")
        n_state = self.A.shape[1]
        expected = {
            "delta": (batch, d_inner, seq),
            "B": (batch, n_state, seq),
            "C": (batch, n_state, seq),
            "D": (d_inner,),
            "z": (batch, d_inner, seq),
            "delta_bias": (d_inner,),
        }
        for name, shape in expected.items():
            tensor = getattr(self, name)
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")

    @property
    def batch(self) -> int:
        """Batch size."""
        return self.u.shape[0]

    @property
    def d_inner(self) -> int:
        """Number of channels."""
        return self.u.shape[1]

    @property
    def seq(self) -> int:
        """Sequence length L."""
        return self.u.shape[2]

    @property
    def n_state(self) -> int:
        """State size N per channel."""
        return self.A.shape[1]

    @property
    def compute_dtype(self) -> torch.dtype:
        """Internal precision: float32, or float64 when u is float64 (so gradcheck can run)."""
        return torch.float64 if self.u.dtype == torch.float64 else torch.float32

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The eight tensors in argument order, as the autograd Functions take and save them."""
        return tuple(getattr(self, name) for name in TENSOR_FIELDS)

    def dtypes(self) -> tuple[torch.dtype | None, ...]:
        """The dtypes of `tensors()` (None for absent ones), which their gradients must have."""
        return tuple(None if t is None else t.dtype for t in self.tensors())

    def needs_autograd(self) -> bool:
        """Whether the result must be differentiable: grad mode is on and some tensor requires grad."""
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in self.tensors())


def takes_arguments_of(
    make: Callable[_P, ScanInputs],
) -> Callable[[Callable[[ScanInputs], torch.Tensor]], Callable[_P, torch.Tensor]]:
    """Decorator: `fn(inputs)` becomes callable with the arguments of `make` (`ScanInputs`: u, delta, ...)."""

    # `make` is an argument, rather than ScanInputs built in, so that type checkers give the result
    # ScanInputs' parameter list.
    def decorate(fn: Callable[[ScanInputs], torch.Tensor]) -> Callable[_P, torch.Tensor]:
        @functools.wraps(fn)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> torch.Tensor:
            return fn(make(*args, **kwargs))

        # help() and inspect then show the arguments callers pass, not the wrapped function's one.
        wrapper.__signature__ = inspect.signature(make).replace(return_annotation="torch.Tensor")
        return wrapper

    return decorate


def needs_grad(needs_input_grad: Sequence[bool], name: str) -> bool:
    """Whether autograd wants the named tensor's gradient; the Function's last arguments are `tensors()`."""
    return needs_input_grad[len(needs_input_grad) - len(TENSOR_FIELDS) + TENSOR_FIELDS.index(name)]


def input_grads(
    needs_input_grad: Sequence[bool],
    grads: Sequence[torch.Tensor | None],
    dtypes: Sequence[torch.dtype | None],
) -> tuple[torch.Tensor | None, ...]:
    """The return value of a backward whose forward took some flags, then the eight scan tensors.

    None for each leading flag and for every tensor whose gradient autograd does not need; the others are
    the tensors' gradients in their own dtypes.
    """
    leading = len(needs_input_grad) - len(grads)
    return (None,) * leading + tuple(
        None if grad is None or not need else grad.to(dtype)
        for grad, need, dtype in zip(grads, needs_input_grad[leading:], dtypes, strict=True)
    )


def empty_like_layout(x: torch.Tensor) -> torch.Tensor:
    """Dense uninitialised tensor like x (perhaps a strided view), dimensions in the same memory order."""
    order = sorted(range(x.dim()), key=lambda i: (-x.stride(i), i))
    out = x.new_empty([x.shape[i] for i in order])
    return out.permute([order.index(i) for i in range(x.dim())])


def empty_output(u: torch.Tensor) -> torch.Tensor:
    """Uninitialised [batch, d_inner, L] output in u's dtype, laid out as [batch, L, d_inner] in memory.

    That layout is what Mamba's out_proj consumes (y.transpose(1, 2)) and lets both implementations write
    each time step as one contiguous row.
    """
    batch, d_inner, seq = u.shape
    return u.new_empty(batch, seq, d_inner).transpose(1, 2)
