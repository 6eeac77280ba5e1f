"""Many processes with torch.distributed: the layer engine's data parallelism.

Under `torchrun --nproc-per-node K` every rank loads the model, makes the same calibration windows and keeps
a contiguous shard of them. Per layer, each rank gathers its part of every input statistic on its own
windows; the parts are summed across ranks (`all_reduce_sums`), so every rank holds the statistics of all
windows. The per-linear solves are shared out: job j runs on rank j mod K and its result is broadcast
(`share`), so every rank applies the same new weights, and runs the processed layer on its own windows to
make the next layer's inputs. Rank 0 alone writes the output (`write_once`).

One process (no WORLD_SIZE, or WORLD_SIZE=1) never touches torch.distributed: every function here is then
the identity or a plain loop, so the single-process path is unchanged bit for bit.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


_world = World()


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def setup() -> World:
    """The process group from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT):
    NCCL when CUDA is available (one device per local rank), gloo otherwise. Idempotent; one process gets
    World(size=1) and no process group."""
    global _world
    size = env_world_size()
    if size <= 1 or _world.is_distributed:
        return _world
    import torch.distributed as dist

    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise ConfigError("WORLD_SIZE > 1 but RANK is missing or not an integer: start the job with torchrun "
                          "(torchrun --nproc-per-node K --no-python toolchain ...)") from None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        atexit.register(_teardown)
    _world = World(size, rank, local_rank, backend)
    return _world


def _teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> World:
    return _world


def shard_sizes(n: int, size: int) -> list[int]:
    """Contiguous shards of n windows over `size` ranks, the first n % size ranks one window larger."""
    return [n // size + (r < n % size) for r in range(size)]


def shard_windows(calib: torch.Tensor | None, world_: World) -> tuple[torch.Tensor | None, list[int] | None]:
    """This rank's contiguous shard of the calibration windows and the windows per rank."""
    if calib is None or not world_.is_distributed:
        return calib, None
    sizes = shard_sizes(calib.shape[0], world_.size)
    if min(sizes) == 0:
        raise ConfigError(f"--calib-samples {calib.shape[0]} is fewer than the {world_.size} ranks: every rank "
                          f"needs at least one calibration window")
    start = sum(sizes[:world_.rank])
    return calib[start:start + sizes[world_.rank]], sizes


def record(world_: World, windows_per_rank: list[int] | None) -> dict | None:
    """compression.json's "distributed" entry (None for one process)."""
    if not world_.is_distributed:
        return None
    return {"world_size": world_.size, "backend": world_.backend, "windows_per_rank": windows_per_rank}


# ---------------------------------------------------------------------------- collectives
def all_reduce_sums(tensors: list[torch.Tensor | None], counts: list[int] = ()) -> list[int]:
    """Sum `tensors` in place across ranks and return the summed integer `counts` (token counts). The
    tensors are reduced one by one in their own dtype, so no statistic is held twice in a flat buffer."""
    if not _world.is_distributed:
        return list(counts)
    import torch.distributed as dist

    for t in tensors:
        if t is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    if not counts:
        return []
    device = tensors[0].device if tensors and tensors[0] is not None else torch.device("cpu")
    total = torch.tensor(list(counts), dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return [int(c) for c in total.tolist()]


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def share(jobs: list[Callable[[], Any]], apply: Callable[[int, Any], None]) -> None:
    """Run every job once across the ranks and `apply(j, result)` on every rank, in job order.

    One process: run and apply each job in turn (one result alive at a time, as before). K ranks: job j
    runs on rank j mod K; each rank runs its own jobs first, then each result is broadcast from its owner
    (as CPU tensors, restored to the device the owner computed on) and applied everywhere."""
    if not _world.is_distributed:
        for j, job in enumerate(jobs):
            apply(j, job())
        return
    import torch.distributed as dist

    size, rank = _world.size, _world.rank
    mine = {j: _map_tensors(job(), lambda t: t.cpu()) for j, job in enumerate(jobs) if j % size == rank}
    device = torch.device("cuda", _world.local_rank) if _world.backend == "nccl" else torch.device("cpu")
    for j in range(len(jobs)):
        box = [mine.pop(j, None)]
        dist.broadcast_object_list(box, src=j % size, device=device)
        apply(j, _map_tensors(box[0], lambda t: t.to(device)))


def write_once(write: Callable[[], Any]) -> Any:
    """Rank 0 runs `write` (the output directory); the others wait at a barrier and receive its result."""
    if not _world.is_distributed:
        return write()
    import torch.distributed as dist

    box = [write() if _world.is_writer else None]
    device = torch.device("cuda", _world.local_rank) if _world.backend == "nccl" else torch.device("cpu")
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]
