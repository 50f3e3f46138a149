"""Who speaks in which language in each package: pure functions from a file's path to its metadata.

Speaker identities are what the splits keep apart. Where a package does not say who speaks, one voice per
package and language is assumed (tuxpaint, klettres); asterisk's en and es prompts share one speaker
(Allison), so the speaker, not the package, is the group.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import NamedTuple

from msm_lightning.datasets.real.records import AudioSource

HEDGEWARS_VOICES = "usr/share/games/hedgewars/Data/Sounds/voices/"
ASTERISK_SOUNDS = "usr/share/asterisk/sounds/"
TUXPAINT_STAMPS = "usr/share/tuxpaint/stamps/"
KLETTRES = "usr/share/klettres/"
FILLETS_SOUND = "usr/share/games/fillets-ng/sound/"
# The two main characters of Fish Fillets (small fish "m", big fish "v") have one actor each per language.
FILLETS_MAIN = {"m": "small-fish", "v": "big-fish"}
KLETTRES_LANG = {"en_GB": "en"}  # klettres' British folder: same language, assumed possibly same voice


class Utterance(NamedTuple):
    """Language and speaker of a speech file."""

    language: str
    speaker: str


def hedgewars_voice(source: AudioSource) -> tuple[str, str] | None:
    """(voice pack, phrase) of a hedgewars voice file, e.g. ("Pirate", "incoming"); None otherwise."""
    if source.package != "hedgewars-data" or not source.path.startswith(HEDGEWARS_VOICES):
        return None
    parts = source.path[len(HEDGEWARS_VOICES) :].split("/")
    if len(parts) != 2:
        return None
    phrase = re.sub(r"\d+$", "", PurePosixPath(parts[1]).stem).lower()
    return parts[0], phrase


def utterance(source: AudioSource) -> Utterance | None:
    """Language and speaker of a speech file from the language packages; None for anything else."""
    p, path = source.package, source.path
    if p.startswith("asterisk-") and path.startswith(ASTERISK_SOUNDS):
        voice, *rest = path[len(ASTERISK_SOUNDS) :].split("/")
        m = re.match(r"^([a-z]{2})_[A-Z]{2}_[mf]_(\w+)$", voice)
        # silence/ holds pure silence, not speech.
        if m and rest and rest[0] != "silence":
            return Utterance(m.group(1), f"asterisk:{m.group(2)}")
        return None
    if p == "festvox-ru" and path.endswith(".wav") and "/wav/" in path:
        return Utterance("ru", "festvox-ru:msu_ru_nsh")
    if p == "tuxpaint-stamps-default" and path.startswith(TUXPAINT_STAMPS):
        m = re.search(r"_desc(?:_([a-z]{2}))?\.ogg$", path)
        if m:
            lang = m.group(1) or "en"  # the unsuffixed description is the English one
            return Utterance(lang, f"tuxpaint:{lang}")
        return None
    if p == "klettres-data" and path.startswith(KLETTRES):
        parts = path[len(KLETTRES) :].split("/")
        if len(parts) == 3 and parts[1] in ("alpha", "syllab"):
            lang = KLETTRES_LANG.get(parts[0], parts[0])
            return Utterance(lang, f"klettres:{lang}")
        return None
    if p in ("fillets-ng-data-cs", "fillets-ng-data-nl") and path.startswith(FILLETS_SOUND):
        parts = path[len(FILLETS_SOUND) :].split("/")
        if len(parts) == 3 and parts[1] in ("cs", "nl"):
            fields = PurePosixPath(parts[2]).stem.split("-")
            # Only the two fish: side characters may be voiced by the same actors, so they are left out.
            if len(fields) >= 3 and fields[1] in FILLETS_MAIN:
                return Utterance(parts[1], f"fillets:{parts[1]}:{FILLETS_MAIN[fields[1]]}")
        return None
    return None
