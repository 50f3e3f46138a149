"""`msm data`: a real-audio pretraining corpus and six HEAR-format tasks built from Debian data packages.

Every recording comes from a Debian (main) data package fetched with `apt-get download` and unpacked
with `dpkg -x`; notes are rendered from General MIDI soundfonts with fluidsynth. Nothing is downloaded
from anywhere else, and the audio never enters git: `msm data build` rebuilds it deterministically.
"""

from __future__ import annotations

# Bump whenever a change to this package alters any output byte: it is written into every task's
# metadata, the corpus summary and the build markers, so stale outputs are rebuilt rather than reused.
DATA_VERSION = "1.0.0"


def main(argv: list[str]) -> None:
    """Entry point of `msm data ...` (argv excludes the word `data`)."""
    from msm_lightning.datasets.real.cli import main as cli_main

    cli_main(argv)
