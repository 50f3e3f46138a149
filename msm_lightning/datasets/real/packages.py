"""Debian data packages: fetch (apt-get download), unpack (dpkg -x), record the licence, index the audio."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import soundfile as sf

from msm_lightning.datasets.real.records import AudioSource

# Every package the build may use, with what it contributes.
PACKAGES: dict[str, str] = {
    "fillets-ng-data": "English dialogue, effects, music",
    "fillets-ng-data-cs": "Czech dialogue (two main actors)",
    "fillets-ng-data-nl": "Dutch dialogue (two main actors)",
    "festvox-ru": "Russian read sentences, one speaker",
    "tuxpaint-stamps-default": "spoken descriptions in 12 languages, animal and object sounds",
    "asterisk-core-sounds-en-wav": "English telephone prompts (Allison, 8 kHz)",
    "asterisk-core-sounds-es-wav": "Spanish telephone prompts (Allison, 8 kHz)",
    "asterisk-core-sounds-fr-wav": "French telephone prompts (June, 8 kHz)",
    "asterisk-core-sounds-it-wav": "Italian telephone prompts (Carlo, 8 kHz)",
    "asterisk-core-sounds-ru-wav": "Russian telephone prompts (8 kHz)",
    "asterisk-prompt-it-menardi-wav": "Italian telephone prompts (Menardi, 8 kHz)",
    "hedgewars-data": "15 voice packs, music, effects",
    "klettres-data": "letters and syllables in 20 languages",
    "qabcs-data": "alphabet words in 8 languages, named noises",
    "scratch": "114 labelled sound clips",
    "megaglest-data": "ambience, animals, weapons, unit voices, music",
    "wesnoth-1.16-music": "orchestral music",
    "fluid-soundfont-gm": "General MIDI soundfont (FluidR3)",
    "timgm6mb-soundfont": "General MIDI soundfont (TimGM6mb)",
    "musescore-general-soundfont-small": "General MIDI soundfont (MuseScore General Lite)",
}

AUDIO_SUFFIXES = (".wav", ".ogg", ".mp3", ".flac", ".aif", ".aiff", ".au")
_INDEX_FORMAT = 1


class PackageError(RuntimeError):
    """A package could not be fetched, unpacked or read; the message names the package and the fix."""


def _run(cmd: list[str], cwd: Path | None, package: str) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise PackageError(f"{package}: `{cmd[0]}` is not installed (run `msm data check`)") from err
    if done.returncode != 0:
        hint = " (has `apt-get update` been run?)" if cmd[0] == "apt-get" else ""
        raise PackageError(f"{package}: `{' '.join(cmd)}` failed{hint}: {done.stderr.strip()[-500:]}")
    return done.stdout


class PackageCache:
    """The cache folder: debs/ holds the .deb files, pkgs/NAME/ the unpacked trees and their records."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def deb_dir(self) -> Path:
        """Folder of downloaded .deb files."""
        return self.root / "debs"

    def package_dir(self, name: str) -> Path:
        """Folder of one package: `root/` (its unpacked files), `package.json`, `index.json`."""
        return self.root / "pkgs" / name

    def unpacked(self, name: str) -> Path:
        """The unpacked file tree of a package (fetching and unpacking it first if needed)."""
        self.ensure(name)
        return self.package_dir(name) / "root"

    def find_deb(self, name: str) -> Path | None:
        """The cached .deb of a package, if one was downloaded."""
        found = sorted(self.deb_dir().glob(f"{name}_*.deb"))
        return found[-1] if found else None

    def fetch(self, name: str) -> Path:
        """The package's .deb, downloaded with `apt-get download` unless already cached."""
        deb = self.find_deb(name)
        if deb is not None:
            return deb
        self.deb_dir().mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "download", "-q", name], self.deb_dir(), name)
        deb = self.find_deb(name)
        if deb is None:
            raise PackageError(f"{name}: apt-get download reported success but no {name}_*.deb appeared")
        return deb

    def ensure(self, name: str) -> dict[str, Any]:
        """Fetch and unpack a package once; returns its record (name, version, licences, deb)."""
        record_path = self.package_dir(name) / "package.json"
        if record_path.is_file():
            return json.loads(record_path.read_text())
        deb = self.fetch(name)
        target = self.package_dir(name)
        tmp = target.with_name(name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "root").mkdir(parents=True)
        _run(["dpkg", "-x", str(deb), str(tmp / "root")], None, name)
        fields = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"], None, name)
        info = dict(line.split(": ", 1) for line in fields.strip().splitlines() if ": " in line)
        record = {
            "package": info.get("Package", name),
            "version": info.get("Version", "unknown"),
            "deb": deb.name,
            "licences": read_licences(tmp / "root" / "usr/share/doc" / name / "copyright"),
            "copyright_file": f"usr/share/doc/{name}/copyright",
        }
        (tmp / "package.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(target)
        return record

    def record(self, name: str) -> dict[str, Any]:
        """The package record written when it was unpacked."""
        return self.ensure(name)

    def index(self, name: str) -> list[AudioSource]:
        """Every readable audio file of a package (cached in index.json after the first scan)."""
        self.ensure(name)
        path = self.package_dir(name) / "index.json"
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("format") == _INDEX_FORMAT:
                return [AudioSource(**s) for s in data["sources"]]
        sources, unreadable = scan_audio(name, self.package_dir(name) / "root")
        payload = {
            "format": _INDEX_FORMAT,
            "sources": [asdict(s) for s in sources],
            "unreadable": unreadable,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
        tmp.replace(path)
        return sources

    def soundfont(self, name: str) -> Path:
        """The .sf2/.sf3 file inside a soundfont package."""
        root = self.unpacked(name)
        fonts = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".sf2", ".sf3") and p.is_file())
        if not fonts:
            raise PackageError(f"{name}: no .sf2/.sf3 soundfont inside {root}")
        return fonts[0]

    def size_bytes(self) -> int:
        """Disk use of the whole cache."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file() and not p.is_symlink())


def read_licences(copyright_file: Path) -> list[str]:
    """The distinct `License:` names of a Debian copyright file (machine-readable or not)."""
    if not copyright_file.is_file():
        return ["unknown (no copyright file)"]
    text = copyright_file.read_text(errors="replace")
    names = []
    for line in text.splitlines():
        m = re.match(r"^Licen[cs]e:\s*(\S.*)$", line)
        if m and m.group(1).strip() not in names:
            names.append(m.group(1).strip())
    if names:
        return names
    # Free-form copyright files: name the licences they quote (the file itself stays the authority).
    found = [name for name, pattern in _LICENCE_PHRASES if re.search(pattern, text, re.IGNORECASE)]
    return [f"{n} (free-form copyright file)" for n in found] or ["see copyright file"]


_LICENCE_PHRASES = (
    ("LGPL", r"(Lesser|Library) General Public License"),
    ("GPL", r"(?<!Lesser )(?<!Library )GNU General Public License"),
    ("MIT", r"MIT licen[cs]e|Permission is hereby granted, free of charge"),
    ("CC", r"Creative Commons"),
    ("public domain", r"public domain"),
    ("BSD-style", r"Redistribution and use in source and binary forms"),
)


def sha1_file(path: Path) -> str:
    """SHA-1 of a file's bytes."""
    h = hashlib.sha1()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def scan_audio(package: str, root: Path) -> tuple[list[AudioSource], list[str]]:
    """Audio files under an unpacked package root (docs skipped), and the paths that could not be read."""
    sources, unreadable = [], []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        for fname in sorted(names):
            full = Path(folder) / fname
            rel = full.relative_to(root).as_posix()
            if full.suffix.lower() not in AUDIO_SUFFIXES or rel.startswith("usr/share/doc/"):
                continue
            if full.is_symlink() or not full.is_file():
                continue  # symlinked copies would be the same recording twice
            try:
                info = sf.info(str(full))
                duration = info.frames / info.samplerate
            except Exception:  # libsndfile raises assorted types for unsupported or broken files
                unreadable.append(rel)
                continue
            if info.frames <= 0:
                unreadable.append(rel)
                continue
            sources.append(
                AudioSource(package, rel, sha1_file(full), round(duration, 4), info.samplerate, info.channels)
            )
    return sources, unreadable
