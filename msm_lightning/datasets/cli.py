"""`msm synth`: the synthetic pretraining corpus or the synthetic HEAR tasks."""

from __future__ import annotations

import argparse


def synth_main(argv: list[str]) -> None:
    """`msm synth OUT [--tasks]`: write a synthetic pretraining corpus, or three synthetic HEAR tasks."""
    from msm_lightning.datasets.synth import make_corpus

    parser = argparse.ArgumentParser(prog="msm synth", description=synth_main.__doc__)
    parser.add_argument("out", help="output folder")
    parser.add_argument("--n-files", type=int, default=48)
    parser.add_argument("--n-corrupt", type=int, default=0, help="also write this many unreadable files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tasks",
        action="store_true",
        help="write the synthetic HEAR tasks instead: synth-texture, synth-pitch (scene), synth-events",
    )
    args = parser.parse_args(argv)
    if args.tasks:
        from msm_lightning.datasets.synth_tasks import make_tasks

        for task in make_tasks(args.out, seed=args.seed, events=True):
            print(f"wrote task {task}")
        return
    manifest = make_corpus(args.out, n_files=args.n_files, seed=args.seed, n_corrupt=args.n_corrupt)
    print(f"wrote {args.n_files + args.n_corrupt} files, manifest {manifest}")
