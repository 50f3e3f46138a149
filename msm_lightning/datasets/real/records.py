"""Plain metadata records shared by the planners, the split logic and the writers (no audio in here)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, order=True)
class AudioSource:
    """One audio file inside an unpacked package: where it is, what it holds, how long it is."""

    package: str
    path: str  # relative to the package's unpacked root
    sha1: str  # of the file's bytes: the same recording copied to two paths has one identity
    duration: float
    sample_rate: int
    channels: int

    @property
    def key(self) -> str:
        """`package:path`, the identity recorded in provenance files."""
        return f"{self.package}:{self.path}"

    @property
    def tag(self) -> str:
        """A short stable id of the path (makes clip names unique where file names repeat)."""
        return hashlib.sha1(self.key.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class ClipPlan:
    """One output clip of a task: its name, split, labels, the groups it must not share across splits."""

    name: str  # file name inside 16000/{split}/, with .wav
    split: str
    labels: tuple[str, ...]
    groups: tuple[str, ...]  # speakers / voice packs / soundfonts / sources it is made from
    sources: tuple[str, ...] = ()  # AudioSource keys used (empty for rendered notes)
    sha1s: tuple[str, ...] = ()  # their content hashes, so copies elsewhere are excluded too
    recipe: dict[str, Any] = field(default_factory=dict, hash=False)  # how to make the audio


@dataclass
class TaskPlan:
    """A whole task before any audio is written: its HEAR metadata and every clip."""

    name: str
    metadata: dict[str, Any]
    clips: list[ClipPlan]
    packages: tuple[str, ...] = ()  # packages whose files it uses (for licences in provenance)

    def fingerprint(self) -> str:
        """Hash of everything that determines the output; a changed plan forces a rebuild."""
        payload = {
            "metadata": self.metadata,
            "clips": [asdict(c) for c in self.clips],
            "packages": list(self.packages),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def used_sources(self) -> tuple[set[str], set[str]]:
        """The package:path keys and the content hashes of every source file this task uses."""
        keys = {k for c in self.clips for k in c.sources}
        sha1s = {s for c in self.clips for s in c.sha1s}
        return keys, sha1s
