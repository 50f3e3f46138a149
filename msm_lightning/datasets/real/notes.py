"""Tasks on rendered notes: pitch (MIDI 36..96) and instrument family, train/valid/test by soundfont."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

from msm_lightning.datasets.real import DATA_VERSION
from msm_lightning.datasets.real.context import Context, TaskBuilder
from msm_lightning.datasets.real.dsp import limit_peak, rms
from msm_lightning.datasets.real.hearformat import task_metadata
from msm_lightning.datasets.real.records import ClipPlan, TaskPlan
from msm_lightning.datasets.real.render import Note, RenderError, render_notes
from msm_lightning.hear.layout import TRAINVALTEST

# A soundfont is one "recording session": all its notes share samples, so it must not straddle splits.
SOUNDFONT_SPLITS: dict[str, str] = {
    "fluid-soundfont-gm": "train",
    "timgm6mb-soundfont": "valid",
    "musescore-general-soundfont-small": "test",
}
FONT_TAGS = {
    "fluid-soundfont-gm": "fluid",
    "timgm6mb-soundfont": "timgm",
    "musescore-general-soundfont-small": "msgs",
}

PITCHES = range(36, 97)
# Ten melodic General MIDI programs from different families (electric grand, vibraphone, church organ,
# jazz guitar, synth bass, viola, trumpet, tenor sax, flute, sawtooth lead): each sounds at every pitch
# 36..96 in all three soundfonts (many others have no samples at the extremes, e.g. basses above 84).
PITCH_PROGRAMS = (2, 11, 19, 26, 38, 41, 56, 66, 73, 81)
CLIP_SECONDS = 2.0
HOLD_SECONDS = 1.5

# Family -> (General MIDI programs, MIDI pitch range played), after NSynth's instrument families.
FAMILIES: dict[str, tuple[tuple[int, ...], tuple[int, int]]] = {
    "bass": ((32, 33, 34, 35), (28, 52)),
    "brass": ((56, 57, 58, 60), (40, 72)),
    "flute": ((72, 73, 74, 75), (60, 90)),
    "guitar": ((24, 25, 26, 27), (40, 76)),
    "keyboard": ((0, 1, 4, 6), (36, 84)),
    "mallet": ((8, 9, 11, 12), (60, 90)),
    "organ": ((16, 17, 19, 20), (36, 84)),
    "reed": ((64, 65, 68, 71), (50, 80)),
    "string": ((40, 41, 42, 44), (43, 76)),
    "synth_lead": ((80, 81, 84, 87), (40, 80)),
    "vocal": ((52, 53, 54, 91), (48, 76)),
}
NOTES_PER_PROGRAM = 5
SILENT_RMS = 1e-4  # fluidsynth writes exact zeros where a font has no sample


def _velocity(seed: int, *parts: object) -> int:
    return random.Random(":".join(map(str, (seed, *parts)))).randint(70, 110)


def plan_pitch(ctx: Context) -> TaskPlan:
    """Every pitch 36..96 on ten programs, rendered from each of the three soundfonts."""
    return TaskPlan("note_pitch", pitch_metadata(), pitch_clips(ctx.seed), tuple(SOUNDFONT_SPLITS))


def pitch_metadata() -> dict:
    """HEAR metadata of the pitch task (NSynth-pitch style: pitch_acc, then chroma_acc)."""
    return task_metadata(
        "note_pitch",
        DATA_VERSION,
        prediction_type="multiclass",
        split_mode=TRAINVALTEST,
        sample_duration=CLIP_SECONDS,
        evaluation=["pitch_acc", "chroma_acc"],
        extra={"description": "MIDI pitch 36..96 of single rendered notes; split by soundfont"},
    )


def pitch_clips(seed: int) -> list[ClipPlan]:
    """The pitch task's clips (pure: a function of the seed only)."""
    clips = []
    for font, split in SOUNDFONT_SPLITS.items():
        for program in PITCH_PROGRAMS:
            for pitch in PITCHES:
                vel = _velocity(seed, "pitch", font, program, pitch)
                clips.append(
                    ClipPlan(
                        name=f"{FONT_TAGS[font]}_prog{program:03d}_midi{pitch:03d}.wav",
                        split=split,
                        labels=(str(pitch),),
                        groups=(f"soundfont:{font}",),
                        recipe={"font": font, "program": program, "pitch": pitch, "velocity": vel},
                    )
                )
    return clips


def plan_instrument(ctx: Context) -> TaskPlan:
    """Eleven instrument families, four programs each, five pitches per program, per soundfont."""
    meta = task_metadata(
        "note_instrument",
        DATA_VERSION,
        prediction_type="multiclass",
        split_mode=TRAINVALTEST,
        sample_duration=CLIP_SECONDS,
        evaluation=["top1_acc"],
        extra={"description": "instrument family of single rendered notes; split by soundfont"},
    )
    return TaskPlan("note_instrument", meta, instrument_clips(ctx.seed), tuple(SOUNDFONT_SPLITS))


def instrument_clips(seed: int) -> list[ClipPlan]:
    """The instrument-family task's clips (pure: a function of the seed only)."""
    clips = []
    for font, split in SOUNDFONT_SPLITS.items():
        for family, (programs, (low, high)) in FAMILIES.items():
            for program in programs:
                rng = random.Random(f"{seed}:instrument:{font}:{program}")
                for pitch in sorted(rng.sample(range(low, high + 1), NOTES_PER_PROGRAM)):
                    vel = _velocity(seed, "instrument", font, program, pitch)
                    clips.append(
                        ClipPlan(
                            name=f"{FONT_TAGS[font]}_{family}_prog{program:03d}_midi{pitch:03d}.wav",
                            split=split,
                            labels=(family,),
                            groups=(f"soundfont:{font}",),
                            recipe={"font": font, "program": program, "pitch": pitch, "velocity": vel},
                        )
                    )
    return clips


def note_renderer(ctx: Context, plan: TaskPlan) -> Callable[[ClipPlan], np.ndarray]:
    """Render all notes of each soundfont in one fluidsynth run, then hand out the clips by name."""
    audio: dict[str, np.ndarray] = {}
    render_dir = ctx.cache.root / "render"
    for font in SOUNDFONT_SPLITS:
        clips = [c for c in plan.clips if c.recipe["font"] == font]
        notes = [Note(c.recipe["program"], c.recipe["pitch"], c.recipe["velocity"]) for c in clips]
        rendered = render_notes(
            ctx.cache.soundfont(font),
            ctx.font_sha1(font),
            notes,
            render_dir,
            clip=CLIP_SECONDS,
            hold=HOLD_SECONDS,
        )
        for clip, x in zip(clips, rendered, strict=True):
            if rms(x) < SILENT_RMS:
                # A soundfont without samples for this program and key renders silence: never a clip.
                raise RenderError(
                    f"{font}: program {clip.recipe['program']} is silent at MIDI "
                    f"{clip.recipe['pitch']} ({clip.name}); choose another program or range"
                )
            audio[clip.name] = limit_peak(x)
    return lambda clip: audio[clip.name]


PITCH = TaskBuilder(
    "note_pitch", tuple(SOUNDFONT_SPLITS), plan_pitch, note_renderer, "pitch of rendered notes, MIDI 36..96"
)
INSTRUMENT = TaskBuilder(
    "note_instrument",
    tuple(SOUNDFONT_SPLITS),
    plan_instrument,
    note_renderer,
    "instrument family of rendered notes",
)
