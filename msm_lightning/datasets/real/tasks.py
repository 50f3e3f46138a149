"""The six task builders by name, and planning them all (needed to keep task audio out of the corpus)."""

from __future__ import annotations

from msm_lightning.datasets.real.context import Context, TaskBuilder
from msm_lightning.datasets.real.environment import ENVIRONMENT
from msm_lightning.datasets.real.notes import INSTRUMENT, PITCH
from msm_lightning.datasets.real.records import TaskPlan
from msm_lightning.datasets.real.speech import COUNT, KEYWORD, LANGUAGE

TASKS: dict[str, TaskBuilder] = {
    t.name: t for t in (PITCH, INSTRUMENT, KEYWORD, LANGUAGE, COUNT, ENVIRONMENT)
}


def plan_all(ctx: Context) -> dict[str, TaskPlan]:
    """Plans (metadata only, no audio written) of every task."""
    return {name: builder.plan(ctx) for name, builder in TASKS.items()}


def used_by_tasks(plans: dict[str, TaskPlan]) -> tuple[set[str], set[str]]:
    """Source keys and content hashes used by any task: the corpus must contain none of them."""
    keys: set[str] = set()
    sha1s: set[str] = set()
    for plan in plans.values():
        k, h = plan.used_sources()
        keys |= k
        sha1s |= h
    return keys, sha1s
