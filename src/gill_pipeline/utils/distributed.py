"""The workers of a job started by `accelerate launch` (or `torchrun`): which one this process is, its share of the
work, and a barrier.

`gill index build`, `gill evaluate` and `gill generate --prompts` run as one process or as N: `accelerate launch
--num_processes N -m gill_pipeline ...` (one machine, or several with `--num_machines/--machine_rank/
--main_process_ip`) sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK` and the rendezvous address; without them this is one
worker. Work is cut into units (batches, parts) fixed by the input alone, never by the number of workers, and each
worker takes a contiguous run of them: the units and their results are the same with 1 or N workers, and merging
is concatenation in unit order. The only collective is a barrier, over gloo (CPU), so it needs no GPU and works
between machines as NCCL would.
"""

import logging
import os
from dataclasses import dataclass


logger = logging.getLogger(__name__)

# A worker waits this long at a barrier for the slowest one (a whole share of a large build) before giving up;
# `GILL_BARRIER_TIMEOUT_S` changes it.
DEFAULT_BARRIER_TIMEOUT_S = 24 * 3600


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"The environment variable `{name}` must be an integer, got {value!r}.") from None


@dataclass(frozen=True)
class Workers:
    r"""
    This process's place among the workers of a job.

    Args:
        rank (`int`): this worker, `0 <= rank < world_size`; worker 0 merges and writes what is shared.
        world_size (`int`): how many workers split the work.
        local_rank (`int`): this worker on its machine (picks its GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"`rank`={self.rank} must lie in [0, `world_size`={self.world_size}).")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, num_units: int) -> range:
        """The contiguous run of unit numbers in `range(num_units)` this worker does (the first `num_units %
        world_size` workers take one more)."""
        base, extra = divmod(num_units, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def device(self, device: str) -> str:
        """`device` for this worker: a bare `cuda` becomes this worker's GPU (`cuda:LOCAL_RANK`)."""
        return f"cuda:{self.local_rank}" if self.distributed and device == "cuda" else device

    def barrier(self) -> None:
        """Waits until every worker is here (nothing to wait for with one)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            from datetime import timedelta

            # gloo: barriers only (results travel as files), and it needs no GPU on any machine.
            timeout = _env_int("GILL_BARRIER_TIMEOUT_S", DEFAULT_BARRIER_TIMEOUT_S)
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        dist.barrier()


def current_workers() -> Workers:
    """The workers of this job as the launcher's environment describes them (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`);
    one worker when there is none."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return Workers()
    return Workers(_env_int("RANK", 0), world_size, _env_int("LOCAL_RANK", 0))


def atomic_write_text(path: str, text: str) -> None:
    """Writes `path` under a temporary name and renames it: a reader (another worker) sees the old file or the new
    one, never half of it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
