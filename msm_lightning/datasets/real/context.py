"""What every task planner and renderer needs: the package cache, the seed, decoded audio on demand."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from msm_lightning.datasets.real.dsp import load_mono
from msm_lightning.datasets.real.packages import PackageCache, sha1_file
from msm_lightning.datasets.real.records import AudioSource, ClipPlan, TaskPlan


@dataclass
class Context:
    """The package cache, the build seed and a small decoded-audio cache."""

    cache: PackageCache
    seed: int = 0
    _font_sha1: dict[str, str] = field(default_factory=dict)

    def sources(self, package: str) -> list[AudioSource]:
        """Indexed audio files of a package (fetched, unpacked and scanned on first use)."""
        return self.cache.index(package)

    def path(self, source: AudioSource | str) -> Path:
        """The file of a source, given as an AudioSource or a `package:path` key."""
        package, rel = (
            (source.package, source.path) if isinstance(source, AudioSource) else source.split(":", 1)
        )
        return self.cache.package_dir(package) / "root" / rel

    def load(self, key: str, cached: bool = True) -> np.ndarray:
        """A source file (by `package:path` key) as 16 kHz mono float32 (kept in a small cache if cached)."""
        return _load_cached(str(self.path(key))) if cached else load_mono(self.path(key))

    def font_sha1(self, package: str) -> str:
        """Content hash of a soundfont package's font (keys the render cache)."""
        if package not in self._font_sha1:
            self._font_sha1[package] = sha1_file(self.cache.soundfont(package))
        return self._font_sha1[package]


@functools.lru_cache(maxsize=256)
def _load_cached(path: str) -> np.ndarray:
    # The speaker-count mixtures reuse utterances; decoding once keeps the build fast.
    audio = load_mono(path)
    audio.setflags(write=False)
    return audio


@dataclass(frozen=True)
class TaskBuilder:
    """One task: which packages it needs, how to plan its clips, how to make each clip's audio."""

    name: str
    packages: tuple[str, ...]
    plan: Callable[[Context], TaskPlan]
    renderer: Callable[[Context, TaskPlan], Callable[[ClipPlan], np.ndarray]]
    summary: str
