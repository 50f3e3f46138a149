"""The rows of a pipeline's comparison: a HEAR module, with a model file or without, and its options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msm_lightning.hear.layout import embeddings_folder_name
from msm_lightning.model.families import FAMILIES

# Peer models of the benchmark: the package each needs (the `peers` extra) -> its HEAR module.
PEERS = {"torchcrepe": "hear_modules.peers.crepe", "resemblyzer": "hear_modules.peers.resemblyzer"}


@dataclass(frozen=True)
class Contender:
    """A row of the comparison: a HEAR module with a model file (or none) and load_model options."""

    name: str  # model name in the results, e.g. "SSAM-T", "SSAM-T-random", "log-mel"
    module: str
    model: Path | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def folder(self, emb_root: Path) -> Path:
        """Where `msm embed --out emb_root/<name>` puts the task folders (heareval's folder naming)."""

        return emb_root / self.name / embeddings_folder_name(self.module, dict(self.options))


def random_twin(family: str) -> Contender:
    """The family's Tiny model with random weights (`load_model()` without a file)."""
    return Contender(f"{FAMILIES[family].paper_name}-T-random", FAMILIES[family].hear_module)


def pretrained(family: str, bundle: Path) -> Contender:
    """The family's exported pretrained model."""
    return Contender(f"{FAMILIES[family].paper_name}-T", FAMILIES[family].hear_module, bundle)


def at_step(family: str, step: int, bundle: Path) -> Contender:
    """The family's model exported from its pretraining checkpoint at `step`."""
    return Contender(f"{FAMILIES[family].paper_name}-T-step{step}", FAMILIES[family].hear_module, bundle)


def crepe(capacity: str) -> Contender:
    """The CREPE peer at `capacity` ("tiny" or "full")."""
    return Contender(f"CREPE-{capacity}", PEERS["torchcrepe"], options=(("capacity", capacity),))


LOGMEL = Contender("log-mel", "hear_modules.logmel")
RESEMBLYZER = Contender("Resemblyzer", PEERS["resemblyzer"])
