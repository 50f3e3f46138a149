"""Environmental sound task: coarse classes from megaglest, qabcs, scratch and tuxpaint sound effects.

Labels come from the words in each file's name (scratch also has category folders). A group is one
named sound of one package (e.g. megaglest's "rain" in every tileset, or scratch's Dog1/Dog2): its
variants and copies stay in one fold.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath

import numpy as np

from msm_lightning.datasets.real import DATA_VERSION
from msm_lightning.datasets.real.context import Context, TaskBuilder
from msm_lightning.datasets.real.dsp import SAMPLE_RATE, active_bounds, fix_length, limit_peak
from msm_lightning.datasets.real.hearformat import task_metadata
from msm_lightning.datasets.real.records import AudioSource, ClipPlan, TaskPlan
from msm_lightning.datasets.real.splits import balanced_folds, cap_per_key, unique_content
from msm_lightning.hear.layout import NEW_SPLIT_KFOLD, fold_names

ENV_PACKAGES = ("megaglest-data", "qabcs-data", "scratch", "tuxpaint-stamps-default")
ENV_SECONDS = 3.0
ENV_FOLDS = 5
ENV_CLIPS_PER_FILE = 3  # long ambiences give up to this many non-overlapping clips (same group)
ENV_PER_CLASS = 150
ENV_PER_GROUP = 30  # no single named sound (megaglest's many sword swings) dominates a class
ENV_MIN_GROUPS = 5  # a class must have a group for every fold

# Coarse class -> words that name it in file names. The first word of a name that is listed decides.
_CLASS_WORDS = """
bird: bird birds crow owl duck goose rooster chicken sparrow eagle cuckoo blackbird drake gander heron
    pelican stork pheasant quail albatross flamingo emu vulture parrot tucan toucan quetzal nandou
    penguin swan dove pigeon seagull gull iora booby turkey hen peacock woodpecker magpie raven grouse
    fowl ostrich robin canary cockatoo hummingbird lark hawk
domestic_animal: dog dogs puppy cat cats meow kitten cow bull calf sheep lamb ram goat pig sow horse
    foal donkey yak ox pony mule camel dromedary llama piglet mountaingoat
wild_animal: wolf fox hyena coyote lion tiger jaguar lynx leopard cougar panther bear elephant monkey
    chimp chimpanzee gorilla sealion whale orca dolphin deer doe caribou moose zebra giraffe
    hippopotamus rhinoceros wombat koala kangaroo wallaby raccoon squirrel mouse rabbit beaver badger
    hamster hedgehog otter porcupine jerboa chinchilla panda walrus seal bison frog iguana
insect: cricket crickets bee bees mosquito hornet grasshopper beehive fly moth wasp cicada ladybug
    beetle weevil
vehicle: car motorcycle airplane helicopter train tractor excavator truck bus rocket quadrocopter engine
    ambulance boat ship siren firetruck bicycle airship
household: washing vacuum kettle sewing typing clock watch door zipper scissors hammer saw toilet camera
    bottle glass spoons ratchet balloons pop rattle
ambience: rain wind thunder storm day night nightime desertday sunny
human_sound: laugh cough sneeze scream babycry cry snap fingersnap clap handclap footsteps slurp
    cheering party burp yawn
instrument: accordion bagpipes drum drums drumkit bass cello violin viola guitar piano flute trumpet
    trombone tuba saxophone clarinet oboe bassoon harp harmonica organ xylophone cymbal cymbals gong
    maracas tambourine banjo ukulele sitar kazoo lute recorder timpani zither erhu dulzaina cuica quena
    ney rabel shaker tambura dijjeridoo didgeridoo zurna zhaleyka yangqin yueqin xun washint topshuur
    gamba squeezebox strum pluck
combat: arrow knife firearrowhit catapult
"""


def _parse_classes(table: str) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for entry in re.split(r"\n(?=\S)", table.strip()):
        label, names = entry.split(":", 1)
        out[label.strip()] = frozenset(names.split())
    return out


CLASSES = _parse_classes(_CLASS_WORDS)
# megaglest's unit sounds are named after the unit: a human fighter's attack is a weapon sound and its
# death a scream, while its acknowledgements are speech (left out).
MEGAGLEST_FIGHTERS = frozenset(
    _parse_classes(
        "f: swordman spearman stickfighter archer axe guard warrior cudgel battleaxe horseman valkyrie"
    )["f"]
)
MEGAGLEST_HUMANS = MEGAGLEST_FIGHTERS | frozenset(
    ("technician", "worker", "princess", "shaman", "initiate", "fakir")
)


def words(name: str) -> list[str]:
    """Lower-case words of a file stem: split at non-letters and camelCase ("CarPassing2" -> car, passing)."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return [w for w in re.split(r"[^A-Za-z]+", spaced.lower()) if w]


def _word_class(word: str) -> str | None:
    for label, names in CLASSES.items():
        if word in names:
            return label
    return None


def _megaglest_unit(ws: list[str]) -> str | None:
    unit = ws[0]
    if unit in MEGAGLEST_FIGHTERS and ("attack" in ws or "hit" in ws):
        return "combat"
    if unit in MEGAGLEST_HUMANS and "die" in ws:
        return "human_sound"
    return None


def env_label(source: AudioSource) -> tuple[str, str] | None:
    """(class, group) of a sound-effect file, or None when it is speech, music or unnamed (pure)."""
    path = PurePosixPath(source.path)
    p = source.package
    if p == "megaglest-data":
        if "/sounds/" not in source.path or "/music/" in source.path:
            return None
    elif p == "qabcs-data":
        if not ("/all/noises/" in source.path or "/all/sounds/" in source.path):
            return None
    elif p == "scratch":
        if "/Media/Sounds/" not in source.path or path.parent.name in ("Music Loops", "Vocals"):
            return None
    elif p == "tuxpaint-stamps-default":
        # Spoken descriptions and spoken letters/numbers carry a language suffix.
        if "_desc" in path.stem or re.search(r"_[a-z]{2}(_[A-Z]{2})?$", path.stem):
            return None
    else:
        return None
    ws = words(path.stem)
    if not ws:
        return None
    if p == "megaglest-data" and (label := _megaglest_unit(ws)) is not None:
        return label, f"{p}:{ws[0]}"
    for w in ws:
        label = _word_class(w)
        if label is not None:
            # Group by the naming word, so "sheep1..10" and every tileset's "rain" stay together.
            return label, f"{p}:{w}"
    return None


def env_clips(sources: Sequence[AudioSource], seed: int) -> list[ClipPlan]:
    """Labelled clips (up to three windows per long file), classes capped, five folds of groups (pure)."""
    items = []
    for s in unique_content(sources):
        found = env_label(s)
        if found is None or s.duration < 0.2:
            continue
        n_windows = int(min(ENV_CLIPS_PER_FILE, max(1, s.duration // ENV_SECONDS)))
        for w in range(n_windows):
            items.append((s, found[0], found[1], w))
    groups_of: dict[str, set[str]] = defaultdict(set)
    for _, label, group, _ in items:
        groups_of[label].add(group)
    keep = {label for label, g in groups_of.items() if len(g) >= ENV_MIN_GROUPS}
    items = [t for t in items if t[1] in keep]
    items = cap_per_key(items, lambda t: t[2], ENV_PER_GROUP, seed, "environment-group")
    items = cap_per_key(items, lambda t: t[1], ENV_PER_CLASS, seed, "environment")
    counts: dict[str, Counter] = defaultdict(Counter)
    for _, label, group, _ in items:
        counts[group][label] += 1
    folds = balanced_folds(counts, ENV_FOLDS, seed, "environment")
    names = fold_names(ENV_FOLDS)
    return [
        ClipPlan(
            name=f"{label}_{re.sub(r'[^A-Za-z0-9]+', '-', group)}_{s.tag}_w{w}.wav",
            split=names[folds[group]],
            labels=(label,),
            groups=(group,),
            sources=(s.key,),
            sha1s=(s.sha1,),
            recipe={"source": s.key, "window": w},
        )
        for s, label, group, w in items
    ]


def plan_environment(ctx: Context) -> TaskPlan:
    """About ten coarse classes of environmental sound from four game/education packages."""
    sources = [s for p in ENV_PACKAGES for s in ctx.sources(p)]
    meta = task_metadata(
        "environment_sound",
        DATA_VERSION,
        prediction_type="multiclass",
        split_mode=NEW_SPLIT_KFOLD,
        nfolds=ENV_FOLDS,
        sample_duration=ENV_SECONDS,
        evaluation=["top1_acc"],
        extra={"description": "coarse class of an environmental sound; folds by named sound per package"},
    )
    return TaskPlan("environment_sound", meta, env_clips(sources, ctx.seed), ENV_PACKAGES)


def env_renderer(ctx: Context, plan: TaskPlan) -> Callable[[ClipPlan], np.ndarray]:
    """Window w of the file from its first loud sample, padded to the clip length; level left as recorded."""
    n = round(ENV_SECONDS * SAMPLE_RATE)

    def render(clip: ClipPlan) -> np.ndarray:
        x = ctx.load(clip.recipe["source"])
        start, _ = active_bounds(x, threshold_db=-40.0)
        start = max(0, start - SAMPLE_RATE // 20) + clip.recipe["window"] * n
        return limit_peak(fix_length(x[start:], n))

    return render


ENVIRONMENT = TaskBuilder(
    "environment_sound",
    ENV_PACKAGES,
    plan_environment,
    env_renderer,
    "coarse environmental sound classes, folds by named sound",
)
