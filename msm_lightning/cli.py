"""The `msm` command: LightningCLI subcommands (fit, validate, ...) plus msm-lightning's own tools."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# msm-lightning's own subcommands: name -> "module:function(argv)", imported only when used.
TOOLS: dict[str, str] = {
    "synth": "msm_lightning.datasets.cli:synth_main",
    "data": "msm_lightning.datasets.real:main",
    "export": "msm_lightning.model.bundle:main",
    "convert": "msm_lightning.model.convert:main",
    "embed": "msm_lightning.hear.embed:main",
    "evaluate": "msm_lightning.evaluation.protocol:main",
    "score": "msm_lightning.evaluation.score:main",
    "demo": "msm_lightning.pipelines.cli:demo_main",
    "benchmark": "msm_lightning.pipelines.cli:benchmark_main",
    "budget": "msm_lightning.pipelines.cli:budget_main",
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
        from msm_lightning.training.cli import lightning_main

        lightning_main(argv, from_command_line)


if __name__ == "__main__":
    main()
