"""Command line of `msm data`: build, check, verify, subset, shard."""

from __future__ import annotations

import argparse

from msm_lightning.datasets import shard as shard_cmd
from msm_lightning.datasets import subset as subset_cmd
from msm_lightning.datasets.real import DATA_VERSION
from msm_lightning.datasets.real.build import STEPS, build, verify
from msm_lightning.datasets.real.check import check_report
from msm_lightning.datasets.real.packages import PackageError
from msm_lightning.datasets.real.render import RenderError

DEFAULT_CACHE = "data/real-cache"
DEFAULT_OUT = "data/real"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msm data",
        description=f"Real-audio pretraining corpus and HEAR-format tasks from Debian data packages "
        f"(data version {DATA_VERSION}); `shard` turns any audio corpus into streaming shards for training.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="fetch packages and build the corpus and/or tasks (resumable, cached)")
    b.add_argument(
        "--cache", default=DEFAULT_CACHE, help=f"downloaded and unpacked packages (default {DEFAULT_CACHE})"
    )
    b.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    b.add_argument("--only", nargs="+", metavar="STEP", help=f"build only these: {', '.join(STEPS)}")
    b.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    b.add_argument(
        "--corpus-hours-per-package",
        type=float,
        default=1.0,
        help="cap on corpus hours taken from one package; 0 = no cap (default 1.0)",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_parser("check", help="which external tools are present and what to install")
    v = sub.add_parser("verify", help="re-hash every built output against its checksums.sha256")
    v.add_argument("--out", default=DEFAULT_OUT)
    subset_cmd.add_parser(sub)
    shard_cmd.add_parser(sub)
    return parser


def main(argv: list[str]) -> None:
    """Run `msm data build|check|verify|subset|shard`."""
    args = _parser().parse_args(argv)
    if args.command == "shard":
        shard_cmd.run(args)
        return
    if args.command == "subset":
        subset_cmd.run(args)
        return
    if args.command == "check":
        ok, lines = check_report()
        print("\n".join(lines))
        raise SystemExit(0 if ok else 1)
    if args.command == "verify":
        problems = verify(args.out)
        print("\n".join(problems) if problems else f"{args.out}: every output matches its checksums")
        raise SystemExit(1 if problems else 0)
    cap = args.corpus_hours_per_package or None
    try:
        build(args.cache, args.out, args.only, args.seed, cap, progress=not args.no_progress)
    except (PackageError, RenderError) as err:
        raise SystemExit(f"msm data: {err}") from err
