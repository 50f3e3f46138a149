"""Time and peak memory of selective scans at Mamba-Tiny shapes on the CPU.

    python bench/bench_scan.py                      # batch 8, d_inner 576, N 24, L 251
    python bench/bench_scan.py --seq 1024 --reps 5

Methods:
  kernel             msm_lightning's compiled CPU kernel (`selective_scan`'s default on the CPU): one pass per
                     channel with its states in registers, states recomputed in the backward
  scan               msm_lightning's chunked PyTorch scan (boundary states only, recompute in backward), the
                     portable fallback
  materialise        exp(delta A) and delta B u for every step up front ([batch, d_inner, L, N] each), then a
                     step loop under autograd that keeps every state: the structure of mamba-ssm's
                     `selective_scan_ref` and Hugging Face's slow Mamba path. The per-step slices are taken
                     with one `unbind`, so autograd stacks their gradients once.
  materialise-index  the same, but indexing decays[:, :, t] inside the loop as those references do: autograd
                     then scatters every step's gradient into a fresh full-size [batch, d_inner, L, N]
                     tensor and sums them, O(L^2) work (not run by default: tens of seconds per call)
  reference          msm_lightning's step-by-step `selective_scan_reference` (the test oracle)

Every method runs in its own fresh subprocess. Peak memory is the growth of the process's peak resident
set size (getrusage ru_maxrss) from just before the first scan call to the end, so it counts everything the
scan allocates (saved tensors, temporaries, gradients, allocator slack), not an estimate. "saved" is the
size of the distinct tensor storages autograd keeps between forward and backward (via saved-tensor hooks),
beyond the inputs themselves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msm_lightning.model.encoders.scan_inputs import ScanInputs
from msm_lightning.model.encoders.selective_scan import selective_scan, selective_scan_reference
from msm_lightning.model.encoders.torch_scan import chunked_selective_scan, default_chunk_size

METHODS = ("kernel", "scan", "materialise", "materialise-index", "reference")
DEFAULT_METHODS = ("kernel", "scan", "materialise", "reference")


def scan_materialise(x: ScanInputs, index_each_step: bool = False) -> torch.Tensor:
    """Baseline: materialise decays and drives for all L steps, then recur with autograd saving each state."""
    u, delta, A, B, C = (t.float() for t in (x.u, x.delta, x.A, x.B, x.C))
    if x.delta_bias is not None:
        delta = delta + x.delta_bias.float()[:, None]
    if x.delta_softplus:
        delta = F.softplus(delta)
    decays = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # [batch, d_inner, L, N]
    drives = (delta * u).unsqueeze(-1) * B.transpose(1, 2)[:, None]  # [batch, d_inner, L, N]
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # [batch, d_inner, N]
    outputs = []
    if index_each_step:
        for t in range(u.shape[-1]):
            h = decays[:, :, t] * h + drives[:, :, t]
            outputs.append(torch.bmm(h, C[:, :, t, None]).squeeze(-1))  # [batch, d_inner]
    else:
        for decay, drive, c in zip(decays.unbind(2), drives.unbind(2), C.unbind(2), strict=True):
            h = decay * h + drive
            outputs.append(torch.bmm(h, c[:, :, None]).squeeze(-1))
    y = torch.stack(outputs, dim=-1)  # [batch, d_inner, L]
    if x.D is not None:
        y = y + x.D.float()[:, None] * u
    if x.z is not None:
        y = y * F.silu(x.z.float())
    return y.to(x.u.dtype)


def make_inputs(batch: int, d_inner: int, n_state: int, seq: int) -> dict[str, torch.Tensor]:
    """Mamba-like inputs and layouts: sequence-major activations seen as [batch, channels, L]."""
    g = torch.Generator().manual_seed(0)

    def seq_major(channels: int) -> torch.Tensor:
        return torch.randn(batch, seq, channels, generator=g).transpose(1, 2).requires_grad_()

    dt = torch.exp(torch.rand(d_inner, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "u": seq_major(d_inner),
        "delta": (0.1 * torch.randn(batch, seq, d_inner, generator=g)).transpose(1, 2).requires_grad_(),
        "A": (-torch.arange(1, n_state + 1, dtype=torch.float32).repeat(d_inner, 1)).requires_grad_(),
        "B": seq_major(n_state),
        "C": seq_major(n_state),
        "D": torch.ones(d_inner, requires_grad=True),
        "z": seq_major(d_inner),
        "delta_bias": (dt + torch.log(-torch.expm1(-dt))).requires_grad_(),  # softplus^-1(dt)
    }


def saved_bytes(fn: Callable[[], torch.Tensor], inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run fn under saved-tensor hooks; returns its output and the bytes of the distinct storages autograd
    saved for backward, not counting the inputs' own storages (those exist anyway)."""
    own = {t.untyped_storage().data_ptr() for t in inputs.values()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far; machine is 0 off Linux."""
    mine = sum(os.times()[:2])
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0, mine
    busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), mine


def worker(args: argparse.Namespace) -> dict[str, float]:
    """Measure one method in this (fresh) process and return its numbers."""
    if args.threads:
        torch.set_num_threads(args.threads)
    scan = {
        "kernel": lambda **kw: selective_scan(**kw, use_kernel=True),
        "scan": lambda **kw: chunked_selective_scan(ScanInputs(**kw), chunk_size=args.chunk or None),
        "materialise": lambda **kw: scan_materialise(ScanInputs(**kw)),
        "materialise-index": lambda **kw: scan_materialise(ScanInputs(**kw), index_each_step=True),
        "reference": selective_scan_reference,
    }[args.worker]
    # A small call first, so one-off library initialisation does not count as the scan's memory; it also
    # checks that the method computes the same function as the oracle.
    small = make_inputs(2, 8, 4, 21)
    torch.testing.assert_close(
        scan(**small, delta_softplus=True), selective_scan_reference(**small, delta_softplus=True)
    )
    scan(**small, delta_softplus=True).sum().backward()
    inputs = make_inputs(args.batch, args.d_inner, args.d_state, args.seq)
    grad_out = torch.randn(args.batch, args.seq, args.d_inner).transpose(1, 2)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    def forward() -> torch.Tensor:
        return scan(**inputs, delta_softplus=True)

    def forward_backward() -> None:
        forward().backward(grad_out)

    def forward_no_grad() -> None:
        with torch.no_grad():
            forward()

    _, saved = saved_bytes(forward, inputs)
    for _ in range(args.warmup):
        forward_backward()
        forward_no_grad()
    fb, fwd = [], []
    busy0, mine0 = cpu_seconds()
    wall0 = time.perf_counter()
    for _ in range(args.reps):
        start = time.perf_counter()
        forward_backward()
        fb.append(time.perf_counter() - start)
        start = time.perf_counter()
        forward_no_grad()
        fwd.append(time.perf_counter() - start)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    busy1, mine1 = cpu_seconds()
    # Share of the machine's CPU capacity that other processes used while we measured.
    others = max(busy1 - busy0 - (mine1 - mine0), 0.0) / (
        (time.perf_counter() - wall0) * (os.cpu_count() or 1)
    )
    return {
        "fb_min": min(fb) * 1e3,
        "fb_median": statistics.median(fb) * 1e3,
        "fwd_min": min(fwd) * 1e3,
        "fwd_median": statistics.median(fwd) * 1e3,
        "peak_mib": (rss_after - rss_before) / 1024,
        "saved_mib": saved / 2**20,
        "threads": torch.get_num_threads(),
        "others": others,
    }


def main() -> None:
    """Parse arguments, run each method in a fresh subprocess and print a table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-inner", type=int, default=576)
    parser.add_argument("--d-state", type=int, default=24)
    parser.add_argument("--seq", type=int, default=251)
    parser.add_argument("--chunk", type=int, default=0, help="chunk size of `scan` (0: default_chunk_size)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from {METHODS}"
    )
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)))
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(
        f"batch {args.batch}, d_inner {args.d_inner}, N {args.d_state}, L {args.seq}, "
        f"chunk {args.chunk or default_chunk_size(args.batch, args.d_state, args.d_inner)}, "
        f"reps {args.reps}, torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    results = {}
    for method in methods:
        cmd = [sys.executable, __file__, "--worker", method, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])

    header = (
        f"{'method':<18} {'fwd+bwd min':>12} {'fwd+bwd med':>12} {'fwd-only min':>13} "
        f"{'peak RSS +':>11} {'saved':>9} {'other load':>11}"
    )
    print(f"threads: {results[methods[0]]['threads']}")
    print(header)
    print("-" * len(header))
    for method, r in results.items():
        print(
            f"{method:<18} {r['fb_min']:>9.1f} ms {r['fb_median']:>9.1f} ms {r['fwd_min']:>10.1f} ms "
            f"{r['peak_mib']:>7.1f} MiB {r['saved_mib']:>5.1f} MiB {100 * r['others']:>10.0f}%"
        )
    for fast, slow in (("kernel", "scan"), ("kernel", "materialise"), ("scan", "materialise")):
        if fast in results and slow in results:
            f, s = results[fast], results[slow]
            print(
                f"{fast} vs {slow}: {s['fb_median'] / f['fb_median']:.1f}x faster (median fwd+bwd), "
                f"{s['peak_mib'] / max(f['peak_mib'], 1e-9):.1f}x less peak memory"
            )


if __name__ == "__main__":
    main()
