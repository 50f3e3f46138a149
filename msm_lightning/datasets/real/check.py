"""`msm data check`: which external tools the build needs, which are present, and what to install."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import soundfile as sf


@dataclass(frozen=True)
class Tool:
    """An external program, the Debian package that provides it, and what the build uses it for."""

    command: str
    package: str
    purpose: str
    required: bool


TOOLS = (
    Tool("apt-get", "apt", "download the data packages (apt-get download; no install needed)", True),
    Tool("dpkg", "dpkg", "unpack the .deb files (dpkg -x) and read their version (dpkg-deb)", True),
    Tool("dpkg-deb", "dpkg", "read a .deb's package name and version", True),
    Tool("fluidsynth", "fluidsynth", "render MIDI notes for note_pitch and note_instrument", True),
    Tool(
        "sox",
        "sox",
        "not used by the build (soundfile decodes ogg/mp3/wav); handy for inspecting audio",
        False,
    ),
    Tool("ffmpeg", "ffmpeg", "not used by the build; only needed for asterisk's g722 packages", False),
)


def apt_lists_ready(probe: str = "fluid-soundfont-gm") -> bool:
    """Whether `apt-get update` has run (apt knows a candidate version of a package we fetch)."""
    if shutil.which("apt-cache") is None:
        return False
    done = subprocess.run(["apt-cache", "policy", probe], capture_output=True, text=True, check=False)
    return "Candidate:" in done.stdout and "Candidate: (none)" not in done.stdout


def check_report() -> tuple[bool, list[str]]:
    """(all required tools present?, report lines)."""
    lines, missing = [], []
    for tool in TOOLS:
        path = shutil.which(tool.command)
        state = path if path else "MISSING"
        kind = "required" if tool.required else "optional"
        lines.append(f"{tool.command:11s} {kind:8s} {state:28s} {tool.purpose}")
        if not path and tool.required:
            missing.append(tool.package)
    formats = sf.available_formats()
    for fmt in ("OGG", "MP3", "WAV"):
        ok = fmt in formats
        lines.append(
            f"{'soundfile':11s} {'required':8s} {fmt + (' ok' if ok else ' MISSING'):28s} "
            f"libsndfile {sf.__libsndfile_version__} decodes {fmt}"
        )
        if not ok:
            missing.append(f"python soundfile with {fmt} (pip install -U soundfile)")
    if shutil.which("apt-get"):
        ready = apt_lists_ready()
        lines.append(
            f"{'apt lists':11s} {'required':8s} {'ok' if ready else 'EMPTY':28s} "
            "package lists, so apt-get download can find the data packages"
        )
        if not ready:
            lines.append("  -> run: apt-get update")
    debs = sorted({m for m in missing if " " not in m})
    if debs:
        lines.append(f"  -> install: apt-get install -y {' '.join(debs)}")
    others = [m for m in missing if " " in m]
    lines += [f"  -> {m}" for m in others]
    if not missing:
        lines.append("all required tools are present")
    return not missing, lines
