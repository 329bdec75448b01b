"""Dynamic batching: which waiting jobs can be answered by one `pipe(...)` call.

Every option of `pipe(...)` holds for the whole call (decoding settings, image mode, denoising settings), so jobs
share a call only when their options are equal; each job keeps its own seed through a list of generators, one per
input, which the pipeline uses row by row (a batch answers exactly as its inputs one by one: `pipeline/decoding.py`).
A job that continues a cached prefix runs in a call of its own (`past=` takes one input).
"""

import math
from dataclasses import dataclass, field

import torch

from .jobs import ChatJob


def options_key(options: dict) -> str:
    """A key equal for two jobs exactly when their `pipe(...)` options are (the order of the keys aside)."""

    def canonical(value):
        if isinstance(value, float) and math.isnan(value):
            return "nan"  # NaN != NaN: never batch such options together by accident, nor apart
        if isinstance(value, dict):
            return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
        if isinstance(value, (list, tuple)):
            return [canonical(v) for v in value]
        return value

    return repr(canonical(dict(options)))


def job_generator(job: ChatJob) -> torch.Generator:
    """The job's own generator: seeded with its seed, or from fresh entropy when it has none."""
    generator = torch.Generator()
    if job.seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(job.seed))
    return generator


@dataclass
class Group:
    """Jobs answered by one `pipe(...)` call; `alone` calls take one job (a stream, or a cached prefix)."""

    items: list = field(default_factory=list)
    alone: bool = False


def plan_groups(items: list, max_batch_size: int, runs_alone) -> list[Group]:
    """Splits waiting items (each with `.job`) into calls, in arrival order of each group's first item: those for
    which `runs_alone(item)` is true alone, the others by equal options, at most `max_batch_size` per call."""
    groups: list[Group] = []
    open_groups: dict[str, Group] = {}
    for item in items:
        if runs_alone(item):
            groups.append(Group([item], alone=True))
            continue
        key = options_key(item.job.options)
        group = open_groups.get(key)
        if group is None or len(group.items) >= max_batch_size:
            group = open_groups[key] = Group()
            groups.append(group)
        group.items.append(item)
    return groups
