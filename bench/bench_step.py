"""Training-step benchmark of the three Tiny models (target: Mamba-T and xLSTM-T <= 2x Transformer-T).

Each family runs in its own fresh subprocess so that peak memory is its own: one step is frontend + masking +
forward + backward + AdamW update on a batch of 2 s crops. Prints seconds per step (the fastest step over
alternating rounds, the least disturbed by other load), peak resident memory, the step's memory above the
idle process, and each family's ratio to the Transformer.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

from msm_lightning.model.families import FAMILIES


def rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(family: str, batch: int, steps: int, warmup: int) -> dict:
    """Time `steps` training steps of `family`-tiny after `warmup` steps, in this process."""
    import torch

    from msm_lightning.model.masking import random_mask
    from msm_lightning.model.msm import MaskedSpectrogramModel
    from msm_lightning.training.optim import param_groups

    torch.manual_seed(0)
    model = MaskedSpectrogramModel.from_preset(family, "tiny")
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    audio = torch.randn(batch, 32000)

    def step() -> None:
        spec = model.spectrogram(audio)
        loss = model.masked_loss(spec, random_mask(batch, model.n_patches, 0.5))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    idle = rss_mib()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "family": family,
        "seconds": statistics.median(times),
        "min_seconds": min(times),
        "peak_rss_mib": peak,
        "step_mib": peak - idle,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    """Run every family in a subprocess and print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the families")
    parser.add_argument("--family", choices=list(FAMILIES), help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.family:
        print(json.dumps(measure(args.family, args.batch, args.steps, args.warmup)))
        return
    runs: dict[str, list[dict]] = {f: [] for f in FAMILIES}
    # Families alternate over rounds so that load from other processes hits all of them alike.
    for _ in range(args.rounds):
        for family in FAMILIES:
            cmd = [
                sys.executable,
                __file__,
                "--family",
                family,
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[family].append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for family in FAMILIES:
        best = min(runs[family], key=lambda r: r["min_seconds"])
        rows.append(
            {
                **best,
                "seconds": best["min_seconds"],
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs[family]),
                "step_mib": max(r["step_mib"] for r in runs[family]),
            }
        )
    base = rows[0]["seconds"]
    print(
        f"Training step, Tiny models, batch {args.batch} x 2 s crops: fastest of {args.steps} steps x "
        f"{args.rounds} rounds after {args.warmup} warm-up; {platform.processor() or platform.machine()}, "
        f"{rows[0]['threads']} threads"
    )
    print(f"{'model':<14}{'params':>9}{'s/step':>9}{'x Transformer':>15}{'peak RSS MiB':>14}{'step MiB':>10}")
    for r in rows:
        name, ratio = r["family"] + "-tiny", r["seconds"] / base
        print(
            f"{name:<14}{r['params_m']:>8.2f}M{r['seconds']:>9.3f}{ratio:>15.2f}"
            f"{r['peak_rss_mib']:>14.0f}{r['step_mib']:>10.0f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
