"""HEAR 2021 API over pretrained audio models from PyPI, as reference points for our encoders.

Each peer's weights ship inside its PyPI wheel, so nothing is downloaded at run time and the modules work
offline. They are an optional extra: `pip install 'msm-lightning[peers]'`. Every peer embeds on the same
40 ms timestamp grid as the msm-lightning models (`msm_lightning.hear.grid`), through the same base class
(`msm_lightning.hear.base.HearModule`).

- `hear_modules.peers.crepe`: CREPE pitch tracker (torchcrepe), penultimate layer.
- `hear_modules.peers.resemblyzer`: GE2E speaker encoder d-vectors (Resemblyzer).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

INSTALL_HINT = "pip install 'msm-lightning[peers]'"


def missing_peer(package: str, cause: BaseException | None = None) -> ImportError:
    """The ImportError raised when a peer's package is not installed, saying how to install it."""
    error = ImportError(
        f"the '{package}' package is needed for this peer model; install it with: {INSTALL_HINT}"
    )
    error.__cause__ = cause
    return error


def import_peer(package: str) -> ModuleType:
    """Import a peer's package, or raise an ImportError naming the `peers` extra."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise missing_peer(package, exc) from exc


def peer_package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (its own imports may be broken)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise missing_peer(package)
    return Path(next(iter(spec.submodule_search_locations)))
