"""Pure split logic: groups (speakers, voice packs, soundfonts, sources) to splits, never clips at random."""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence

from msm_lightning.datasets.real.records import AudioSource, ClipPlan


class SplitLeakError(ValueError):
    """A group (speaker, voice pack, soundfont, source) has clips in more than one split."""


def seeded_order(items: Iterable[Hashable], seed: int, salt: str) -> list:
    """Items sorted, then shuffled by a generator seeded with (seed, salt): stable on every machine."""
    ordered = sorted(items, key=str)
    random.Random(f"{seed}:{salt}").shuffle(ordered)
    return ordered


def balanced_folds(
    group_labels: Mapping[str, Counter], n_folds: int, seed: int, salt: str = "folds"
) -> dict[str, int]:
    """Assign whole groups to folds, spreading each label's groups over the folds, then balancing size.

    `group_labels[g]` counts the clips of group g per label. Groups are placed largest first (ties in a
    seeded order); each goes to the fold that holds the fewest groups of its labels, then the fewest clips.
    """
    if n_folds < 1:
        raise ValueError(f"n_folds must be positive, got {n_folds}")
    order = seeded_order(group_labels, seed, salt)
    order.sort(key=lambda g: -sum(group_labels[g].values()))  # stable: ties keep the seeded order
    label_groups: list[Counter] = [Counter() for _ in range(n_folds)]
    sizes = [0] * n_folds
    out: dict[str, int] = {}
    for g in order:
        labels = group_labels[g]
        best = min(
            range(n_folds),
            key=lambda f: (sum(label_groups[f][lab] for lab in labels), sizes[f], f),
        )
        out[g] = best
        label_groups[best].update(set(labels))
        sizes[best] += sum(labels.values())
    return out


def partition_groups(
    groups: Iterable[str], counts: Mapping[str, int], seed: int, salt: str
) -> dict[str, str]:
    """Deal groups into named splits of exactly `counts[split]` groups each, in a seeded order."""
    order = seeded_order(groups, seed, salt)
    need = sum(counts.values())
    if len(order) < need:
        raise ValueError(f"need {need} groups for splits {dict(counts)}, have only {len(order)}: {order}")
    out, i = {}, 0
    for split, n in counts.items():
        for g in order[i : i + n]:
            out[g] = split
        i += n
    return out


def check_disjoint(clips: Sequence[ClipPlan]) -> None:
    """Raise SplitLeakError if any group, source file or content hash occurs in two splits."""
    for attr in ("groups", "sources", "sha1s"):
        where: dict[str, set[str]] = defaultdict(set)
        for clip in clips:
            for item in getattr(clip, attr):
                where[item].add(clip.split)
        leaks = {k: sorted(v) for k, v in where.items() if len(v) > 1}
        if leaks:
            first = sorted(leaks)[:5]
            raise SplitLeakError(
                f"{attr} in more than one split: " + ", ".join(f"{k} {leaks[k]}" for k in first)
            )
    names = Counter(c.name for c in clips)
    dupes = [n for n, k in names.items() if k > 1]
    if dupes:
        raise SplitLeakError(f"clip names used twice: {sorted(dupes)[:5]}")


def linked_groups(shared: Mapping[str, Iterable[str]], min_shared: int = 2) -> dict[str, str]:
    """Merge groups that share at least `min_shared` identical files (likely one voice): group -> merged name.

    `shared[content]` lists the groups in which a content hash occurs. Groups linked directly or through
    others form one merged group named by its members joined with "+".
    """
    parent: dict[str, str] = {}

    def root(g: str) -> str:
        while parent.setdefault(g, g) != g:
            g = parent[g]
        return g

    links: Counter = Counter()
    for groups in shared.values():
        members = sorted(set(groups))
        for g in members:
            root(g)
        for a, b in itertools.pairwise(members):
            links[(a, b)] += 1
    for (a, b), n in sorted(links.items()):
        if n >= min_shared:
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    members_of: dict[str, list[str]] = defaultdict(list)
    for g in sorted(parent):
        members_of[root(g)].append(g)
    return {g: "+".join(members_of[root(g)]) for g in parent}


def unique_content(sources: Iterable[AudioSource]) -> list[AudioSource]:
    """One source per content hash (the first by package:path), so a copied file cannot straddle splits."""
    seen: set[str] = set()
    out = []
    for s in sorted(sources, key=lambda s: s.key):
        if s.sha1 not in seen:
            seen.add(s.sha1)
            out.append(s)
    return out


def cap_per_key(items: Sequence, key, cap: int, seed: int, salt: str) -> list:
    """At most `cap` items per key, chosen in a seeded order; the result is sorted like the input."""
    by_key: dict = defaultdict(list)
    for i, item in enumerate(items):
        by_key[key(item)].append(i)
    keep: list[int] = []
    for k in sorted(by_key, key=str):
        keep += seeded_order(by_key[k], seed, f"{salt}:{k}")[:cap]
    return [items[i] for i in sorted(keep)]


def split_sizes(clips: Sequence[ClipPlan]) -> dict[str, int]:
    """Clip count per split."""
    return dict(sorted(Counter(c.split for c in clips).items()))


def label_counts(clips: Sequence[ClipPlan]) -> dict[str, dict[str, int]]:
    """Clip count per split and label."""
    out: dict[str, Counter] = defaultdict(Counter)
    for c in clips:
        out[c.split].update(c.labels)
    return {s: dict(sorted(v.items())) for s, v in sorted(out.items())}
