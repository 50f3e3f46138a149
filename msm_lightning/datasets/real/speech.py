"""Speech tasks: hedgewars keywords (folds by voice pack), spoken language (by speaker), speaker count."""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from msm_lightning.datasets.real import DATA_VERSION
from msm_lightning.datasets.real.context import Context, TaskBuilder
from msm_lightning.datasets.real.dsp import (
    SAMPLE_RATE,
    band_limit,
    db_to_amplitude,
    fix_length,
    limit_peak,
    normalize_rms,
    trim,
)
from msm_lightning.datasets.real.hearformat import task_metadata
from msm_lightning.datasets.real.records import AudioSource, ClipPlan, TaskPlan
from msm_lightning.datasets.real.speakers import hedgewars_voice, utterance
from msm_lightning.datasets.real.splits import (
    balanced_folds,
    cap_per_key,
    linked_groups,
    partition_groups,
    unique_content,
)
from msm_lightning.hear.layout import NEW_SPLIT_KFOLD, TRAIN_VALID_TEST, TRAINVALTEST, fold_names

KEYWORD_SECONDS = 2.0
KEYWORD_FOLDS = 5

LANGUAGE_PACKAGES = (
    "tuxpaint-stamps-default",
    "asterisk-core-sounds-en-wav",
    "asterisk-core-sounds-es-wav",
    "asterisk-core-sounds-fr-wav",
    "asterisk-core-sounds-it-wav",
    "asterisk-core-sounds-ru-wav",
    "asterisk-prompt-it-menardi-wav",
    "fillets-ng-data-cs",
    "fillets-ng-data-nl",
    "festvox-ru",
    "klettres-data",
)
LANGUAGE_SECONDS = 2.0
LANGUAGE_FOLDS = 4
LANGUAGE_PER_SPEAKER = 80  # clips per (speaker, language): no single voice dominates a language
LANGUAGE_MIN_GROUPS = 3  # a language needs this many speakers to be tested on unseen voices
LANGUAGE_MIN_SECONDS = 0.4
# Everything is passed through an 8 kHz channel: the asterisk prompts are 8 kHz recordings, and a
# bandwidth difference would otherwise tell their languages apart from the same languages elsewhere.
LANGUAGE_CHANNEL_RATE = 8000

COUNT_PACKAGES = LANGUAGE_PACKAGES
COUNT_SECONDS = 3.0
COUNT_MAX = 4
COUNT_MIN_UTTERANCE = 1.5
COUNT_MIN_UTTERANCES = 80  # speakers with fewer usable utterances are left out of the pool
COUNT_SPEAKER_SPLITS = {"test": 5, "valid": 4}  # the rest train; test voices are never heard in training
COUNT_PER_CLASS = {"train": 120, "valid": 40, "test": 40}
COUNT_NOISE_DB = -65.0  # a faint noise floor in every clip, so "0 speakers" is not digital silence


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def _stem(path: str) -> str:
    return _slug(path.rsplit("/", 1)[-1].rsplit(".", 1)[0])


def speech_clip(ctx: Context, key: str, seconds: float) -> np.ndarray:
    """A speech file trimmed of silence, cut or padded to `seconds`, at a fixed RMS level."""
    x = trim(ctx.load(key))
    return normalize_rms(fix_length(x, round(seconds * SAMPLE_RATE)))


# ---------------------------------------------------------------- keyword


def keyword_clips(sources: Sequence[AudioSource], seed: int) -> list[ClipPlan]:
    """Hedgewars phrases that every voice pack has, five folds of whole voice packs (pure).

    Packs that share two or more identical recordings are one voice for splitting (Classic, Default and
    Default_uk do); a single shared file is kept once, in the pack that sorts first.
    """
    voiced = [(s, v) for s in sources if (v := hedgewars_voice(s)) is not None]
    phrases: dict[str, set[str]] = defaultdict(set)
    packs_of: dict[str, set[str]] = defaultdict(set)
    for s, (pack, phrase) in voiced:
        phrases[pack].add(phrase)
        packs_of[s.sha1].add(pack)
    if len(phrases) < KEYWORD_FOLDS:
        raise ValueError(f"hedgewars-data: {len(phrases)} voice packs found, need at least {KEYWORD_FOLDS}")
    shared = set.intersection(*phrases.values())
    group_of = linked_groups(packs_of)
    kept = {s.key for s in unique_content(s for s, _ in voiced)}
    chosen = [(s, pack, phrase) for s, (pack, phrase) in voiced if phrase in shared and s.key in kept]
    counts: dict[str, Counter] = defaultdict(Counter)
    for _, pack, phrase in chosen:
        counts[group_of[pack]][phrase] += 1
    folds = balanced_folds(counts, KEYWORD_FOLDS, seed, "keyword")
    names = fold_names(KEYWORD_FOLDS)
    return [
        ClipPlan(
            name=f"{_slug(pack)}_{_stem(s.path)}.wav",
            split=names[folds[group_of[pack]]],
            labels=(phrase,),
            groups=(f"hedgewars:{group_of[pack]}",),
            sources=(s.key,),
            sha1s=(s.sha1,),
            recipe={"source": s.key},
        )
        for s, pack, phrase in sorted(chosen, key=lambda t: t[0].key)
    ]


def plan_keyword(ctx: Context) -> TaskPlan:
    """Keyword spotting on the phrases shared by all hedgewars voice packs."""
    meta = task_metadata(
        "hedgewars_keyword",
        DATA_VERSION,
        prediction_type="multiclass",
        split_mode=NEW_SPLIT_KFOLD,
        nfolds=KEYWORD_FOLDS,
        sample_duration=KEYWORD_SECONDS,
        evaluation=["top1_acc"],
        extra={"description": "phrase spoken by a hedgewars voice pack; folds by voice pack"},
    )
    return TaskPlan(
        "hedgewars_keyword", meta, keyword_clips(ctx.sources("hedgewars-data"), ctx.seed), ("hedgewars-data",)
    )


def keyword_renderer(ctx: Context, plan: TaskPlan) -> Callable[[ClipPlan], np.ndarray]:
    """Trimmed, level-normalized phrase."""
    return lambda clip: speech_clip(ctx, clip.recipe["source"], KEYWORD_SECONDS)


# ---------------------------------------------------------------- language


def language_clips(sources: Sequence[AudioSource], seed: int) -> list[ClipPlan]:
    """Spoken-language clips in folds of whole speakers, for languages with enough speakers (pure)."""
    items = []
    for s in unique_content(sources):
        u = utterance(s)
        if u is not None and s.duration >= LANGUAGE_MIN_SECONDS:
            items.append((s, u))
    speakers_of: dict[str, set[str]] = defaultdict(set)
    for _, u in items:
        speakers_of[u.language].add(u.speaker)
    languages = {lang for lang, spk in speakers_of.items() if len(spk) >= LANGUAGE_MIN_GROUPS}
    items = [(s, u) for s, u in items if u.language in languages]
    items = cap_per_key(
        items, lambda t: (t[1].speaker, t[1].language), LANGUAGE_PER_SPEAKER, seed, "language"
    )
    counts: dict[str, Counter] = defaultdict(Counter)
    for _, u in items:
        counts[u.speaker][u.language] += 1
    folds = balanced_folds(counts, LANGUAGE_FOLDS, seed, "language")
    names = fold_names(LANGUAGE_FOLDS)
    return [
        ClipPlan(
            name=f"{u.language}_{_slug(u.speaker)}_{_stem(s.path)}_{s.tag}.wav",
            split=names[folds[u.speaker]],
            labels=(u.language,),
            groups=(u.speaker,),
            sources=(s.key,),
            sha1s=(s.sha1,),
            recipe={"source": s.key},
        )
        for s, u in items
    ]


def plan_language(ctx: Context) -> TaskPlan:
    """Spoken language identification, folds by source and speaker."""
    sources = [s for p in LANGUAGE_PACKAGES for s in ctx.sources(p)]
    meta = task_metadata(
        "spoken_language",
        DATA_VERSION,
        prediction_type="multiclass",
        split_mode=NEW_SPLIT_KFOLD,
        nfolds=LANGUAGE_FOLDS,
        sample_duration=LANGUAGE_SECONDS,
        evaluation=["top1_acc"],
        extra={"description": "language of a spoken word or phrase (8 kHz channel); folds by speaker"},
    )
    return TaskPlan("spoken_language", meta, language_clips(sources, ctx.seed), LANGUAGE_PACKAGES)


def language_renderer(ctx: Context, plan: TaskPlan) -> Callable[[ClipPlan], np.ndarray]:
    """Trimmed speech through an 8 kHz channel, level-normalized."""

    def render(clip: ClipPlan) -> np.ndarray:
        x = fix_length(trim(ctx.load(clip.recipe["source"])), round(LANGUAGE_SECONDS * SAMPLE_RATE))
        return normalize_rms(band_limit(x, LANGUAGE_CHANNEL_RATE))

    return render


# ---------------------------------------------------------------- speaker count


def count_pool(sources: Sequence[AudioSource]) -> dict[str, list[AudioSource]]:
    """Speaker -> utterances long enough to overlap in a mixture, for speakers with enough of them (pure)."""
    pool: dict[str, list[AudioSource]] = defaultdict(list)
    for s in unique_content(sources):
        u = utterance(s)
        # klettres holds single letters: too short to overlap, and padded with silence.
        if u is not None and s.duration >= COUNT_MIN_UTTERANCE and not u.speaker.startswith("klettres:"):
            pool[u.speaker].append(s)
    return {spk: sorted(v) for spk, v in sorted(pool.items()) if len(v) >= COUNT_MIN_UTTERANCES}


def count_clips(pool: dict[str, list[AudioSource]], seed: int) -> list[ClipPlan]:
    """Mixtures of 0..4 distinct speakers; each split draws from its own speakers only (pure)."""
    counts = dict(COUNT_SPEAKER_SPLITS)
    counts["train"] = len(pool) - sum(counts.values())
    if counts["train"] < COUNT_MAX:
        raise ValueError(
            f"speaker count needs at least {sum(COUNT_SPEAKER_SPLITS.values()) + COUNT_MAX} "
            f"speakers with {COUNT_MIN_UTTERANCES}+ utterances, found {len(pool)}"
        )
    split_of = partition_groups(pool, counts, seed, "count-speakers")
    clips = []
    for split in TRAIN_VALID_TEST:
        speakers = sorted(s for s, sp in split_of.items() if sp == split)
        for k in range(COUNT_MAX + 1):
            for i in range(COUNT_PER_CLASS[split]):
                rng = random.Random(f"{seed}:count:{split}:{k}:{i}")
                chosen = sorted(rng.sample(speakers, k))
                parts = []
                for spk in chosen:
                    src = rng.choice(pool[spk])
                    parts.append(
                        {
                            "source": src.key,
                            "sha1": src.sha1,
                            "gain_db": round(rng.uniform(-3, 3), 2),
                            "position": round(rng.random(), 4),
                        }
                    )
                clips.append(
                    ClipPlan(
                        name=f"{split}_n{k}_{i:04d}.wav",
                        split=split,
                        labels=(str(k),),
                        groups=tuple(chosen),
                        sources=tuple(sorted({p["source"] for p in parts})),
                        sha1s=tuple(sorted({p["sha1"] for p in parts})),
                        recipe={"parts": parts, "noise_seed": f"{seed}:{split}:{k}:{i}"},
                    )
                )
    return clips


def plan_count(ctx: Context) -> TaskPlan:
    """Speaker counting (0..4 overlapping talkers), like LibriCount; test speakers unseen in training."""
    sources = [s for p in COUNT_PACKAGES for s in ctx.sources(p)]
    meta = task_metadata(
        "speaker_count",
        DATA_VERSION,
        prediction_type="multiclass",
        split_mode=TRAINVALTEST,
        sample_duration=COUNT_SECONDS,
        evaluation=["top1_acc"],
        extra={"description": "number of simultaneous distinct speakers (0..4); splits by speaker"},
    )
    return TaskPlan("speaker_count", meta, count_clips(count_pool(sources), ctx.seed), COUNT_PACKAGES)


def place(x: np.ndarray, n: int, position: float) -> np.ndarray:
    """n samples of `x`: a window at `position` (0..1) of a longer signal, or a shorter one placed there."""
    if len(x) >= n:
        start = int(position * (len(x) - n))
        return x[start : start + n].astype(np.float32)
    return fix_length(x, n, int(position * (n - len(x))))


def count_renderer(ctx: Context, plan: TaskPlan) -> Callable[[ClipPlan], np.ndarray]:
    """Sum equal-level utterances, fix the mixture level (so loudness does not count), add a noise floor."""
    n = round(COUNT_SECONDS * SAMPLE_RATE)

    def render(clip: ClipPlan) -> np.ndarray:
        mix = np.zeros(n, dtype=np.float64)
        for part in clip.recipe["parts"]:
            voice = normalize_rms(place(trim(ctx.load(part["source"])), n, part["position"]), -23.0)
            mix += voice * db_to_amplitude(part["gain_db"])
        if clip.recipe["parts"]:
            mix = normalize_rms(mix.astype(np.float32), -20.0)
        rng = np.random.default_rng(hash_seed(clip.recipe["noise_seed"]))
        mix = mix + rng.standard_normal(n) * db_to_amplitude(COUNT_NOISE_DB)
        return limit_peak(mix.astype(np.float32))

    return render


def hash_seed(text: str) -> int:
    """A stable integer seed from text (Python's hash() is salted per process)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)


KEYWORD = TaskBuilder(
    "hedgewars_keyword",
    ("hedgewars-data",),
    plan_keyword,
    keyword_renderer,
    "phrases shared by all hedgewars voice packs, folds by voice pack",
)
LANGUAGE = TaskBuilder(
    "spoken_language",
    LANGUAGE_PACKAGES,
    plan_language,
    language_renderer,
    "spoken language, folds by source and speaker",
)
COUNT = TaskBuilder(
    "speaker_count",
    COUNT_PACKAGES,
    plan_count,
    count_renderer,
    "number of overlapping speakers 0..4, test speakers unseen",
)
