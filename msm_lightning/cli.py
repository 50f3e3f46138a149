"""The `msm` command: LightningCLI subcommands (fit, validate, ...) plus msm-lightning's own tools."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger

from msm_lightning.callbacks import RunSummary, StepCheckpoint
from msm_lightning.data import AudioDataModule
from msm_lightning.pretraining import MSMPretraining

DEFAULT_ROOT = "runs/msm"


def config_dirs() -> list[Path]:
    """Folders searched for a bare config name: the wheel's bundled copy, then the source checkout's."""
    dirs = [
        Path(str(resources.files("msm_lightning") / "configs")),
        Path(__file__).resolve().parents[1] / "configs",
    ]
    return [d for d in dirs if d.is_dir()]


def resolve_config(name: str) -> str:
    """A config path as given if it exists, else the bundled config of that name (with or without .yaml)."""
    if Path(name).exists() or os.sep in name or "/" in name:
        return name
    for folder in config_dirs():
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return str(candidate)
    available = sorted(p.name for d in config_dirs() for p in d.glob("*.yaml"))
    raise SystemExit(f"msm: config {name!r} is neither a file nor a bundled config; bundled: {available}")


def resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrite `--config NAME` / `--config=NAME` / `-c NAME` so bare names find the bundled configs."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out


def default_loggers(root: str) -> list[Logger]:
    """CSV logs always; TensorBoard too when it is installed."""
    loggers: list[Logger] = [CSVLogger(save_dir=root, name="logs")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=root, name="tensorboard"))
    except ModuleNotFoundError:
        pass
    return loggers


class MSMCLI(LightningCLI):
    """LightningCLI with a fixed checkpoint folder (so `--ckpt_path last` resumes) and default loggers."""

    def add_arguments_to_parser(self, parser) -> None:
        """Checkpointing, lr monitoring and the run summary as configurable, always-on callbacks."""
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 1000,
                "checkpoint.filename": "step{step:08d}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_top_k": -1,
                "trainer.default_root_dir": DEFAULT_ROOT,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.link_arguments("data.batch_size", "model.batch_size")

    def before_instantiate_classes(self) -> None:
        """Put checkpoints in `<default_root_dir>/checkpoints` unless the config says otherwise."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        root = cfg.trainer.default_root_dir or DEFAULT_ROOT
        if cfg.checkpoint.dirpath is None:
            # A fixed folder (not one per logger version) is what lets `--ckpt_path last` find the run.
            cfg.checkpoint.dirpath = os.path.join(root, "checkpoints")

    def instantiate_trainer(self, **kwargs):
        """Use the default loggers unless the config chose loggers (or logger: false)."""
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if cfg.trainer.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(cfg.trainer.default_root_dir or DEFAULT_ROOT)
        return super().instantiate_trainer(**kwargs)


def lightning_main(argv: list[str], from_command_line: bool = False) -> None:
    """Run a LightningCLI subcommand (fit, validate, test, predict)."""
    # Without data.val_manifest the validation loader is deliberately empty; Lightning warns about that.
    warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
    args = resolve_config_args(argv)
    if from_command_line:
        # DDP's launcher re-runs sys.argv for the other ranks, so the resolved arguments must live there.
        sys.argv[1:] = args
        args = None
    MSMCLI(MSMPretraining, AudioDataModule, args=args, save_config_kwargs={"overwrite": True})


def synth_main(argv: list[str]) -> None:
    """`msm synth OUT [--tasks]`: write a synthetic pretraining corpus, or two synthetic HEAR tasks."""
    from msm_lightning.synth import make_corpus

    parser = argparse.ArgumentParser(prog="msm synth", description=synth_main.__doc__)
    parser.add_argument("out", help="output folder")
    parser.add_argument("--n-files", type=int, default=48)
    parser.add_argument("--n-corrupt", type=int, default=0, help="also write this many unreadable files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", action="store_true", help="write the two synthetic HEAR tasks instead")
    args = parser.parse_args(argv)
    if args.tasks:
        from msm_lightning.synth_tasks import make_tasks

        for task in make_tasks(args.out, seed=args.seed):
            print(f"wrote task {task}")
        return
    manifest = make_corpus(args.out, n_files=args.n_files, seed=args.seed, n_corrupt=args.n_corrupt)
    print(f"wrote {args.n_files + args.n_corrupt} files, manifest {manifest}")


# msm-lightning's own subcommands: name -> "module:function(argv)", imported only when used.
TOOLS: dict[str, str] = {
    "synth": "msm_lightning.cli:synth_main",
    "data": "msm_lightning.realdata:main",
    "export": "msm_lightning.export:main",
    "embed": "msm_lightning.embed:main",
    "evaluate": "msm_lightning.evaluate:main",
    "score": "msm_lightning.score:main",
    "demo": "msm_lightning.pipeline:demo_main",
    "benchmark": "msm_lightning.pipeline:benchmark_main",
}


def tool(name: str) -> Callable[[list[str]], None]:
    """The function behind subcommand `name`."""
    module, func = TOOLS[name].split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `msm` console script."""
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        tool(argv[0])(argv[1:])
    else:
        if not argv or argv[0] in ("-h", "--help"):
            print("msm-lightning tools: " + ", ".join(TOOLS) + " (msm TOOL --help); Lightning subcommands:")
        lightning_main(argv, from_command_line)


if __name__ == "__main__":
    main()
