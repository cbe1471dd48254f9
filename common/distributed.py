"""torchrun / DDP helpers that collapse to no-ops in a single process.

A stage script calls :func:`init_distributed` once. Under ``torchrun --nproc-per-node N`` it joins
the process group (NCCL on CUDA, Gloo on CPU), pins each rank to its local GPU and returns that
rank's device; started as a plain ``python`` process it returns the requested device and every
helper below becomes a no-op, so the same code path serves one GPU and many.

Conventions: only the main process (rank 0) writes files (:func:`is_main`); every rank reaches the
same :func:`barrier` before anyone reads what rank 0 wrote. Training uses a
``DistributedSampler`` (:func:`train_sampler`); evaluation uses :func:`shard_sampler`, which gives
each rank a disjoint slice *without padding*, so summed counts are exact.
"""
from __future__ import annotations

import os
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, RandomSampler, Sampler, SequentialSampler

from .errors import UserError, cli_main, require
from .seed import pick_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; otherwise describe the single process."""
    if not launched_by_torchrun():
        return DistInfo(0, 1, 0, pick_device(device))
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world_size == 1:
        return DistInfo(0, 1, 0, pick_device(device))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        require(local_rank < torch.cuda.device_count(),
                f"torchrun started local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(local_rank)
        run_device = torch.device("cuda", local_rank)
    else:
        run_device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, run_device)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place, and returned); identity in one process."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate (along dim 0) one tensor per rank, in rank order; shapes may differ along dim 0."""
    if not is_initialized():
        return tensor
    n = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])


def broadcast_object(obj):
    """Rank 0's Python object on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ShardSampler(Sampler[int]):
    """Rank r takes examples r, r + W, r + 2W, ... in order: disjoint, complete, no padding."""

    def __init__(self, dataset: Dataset, rank_: int | None = None, world: int | None = None):
        self.n = len(dataset)
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def train_sampler(dataset: Dataset, *, shuffle: bool, seed: int) -> Sampler[int]:
    """A seeded shuffling sampler; a ``DistributedSampler`` under DDP. Call ``set_epoch`` when present."""
    if is_initialized() and world_size() > 1:
        from torch.utils.data.distributed import DistributedSampler

        return DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)
    if not shuffle:
        return SequentialSampler(dataset)
    return _EpochRandomSampler(dataset, seed)


def shard_sampler(dataset: Dataset) -> Sampler[int]:
    """Exact evaluation sharding under DDP; plain sequential order in one process."""
    return ShardSampler(dataset) if is_initialized() and world_size() > 1 else SequentialSampler(dataset)


class _EpochRandomSampler(RandomSampler):
    """A random order that is a function of (seed, epoch), like ``DistributedSampler`` in one process."""

    def __init__(self, dataset: Dataset, seed: int):
        self.seed = seed
        self.epoch = 0
        super().__init__(dataset, generator=torch.Generator().manual_seed(seed))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


def cleanup() -> None:
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def require_shared_run_dir(run_dir: str | os.PathLike) -> None:
    """Every rank must see what rank 0 writes in the run directory (one filesystem shared by all
    nodes): rank 0 writes a token file, every rank reads it back, and all ranks stop with one line,
    together, when one of them cannot."""
    if not is_initialized():
        return
    token = broadcast_object(uuid.uuid4().hex if is_main() else None)
    path = Path(run_dir) / f".shared-check-{token}"
    if is_main():
        from .io import write_text

        write_text(path, token)
    barrier()
    try:
        sees = path.read_text() == token
    except OSError:
        sees = False
    blind = [r for r, ok in enumerate(all_gather_cat(torch.tensor([int(sees)])).tolist()) if not ok]
    barrier()
    if is_main():
        path.unlink()
    if not sees:
        raise UserError(f"rank {rank()} on {socket.gethostname()} cannot see {path}, which rank 0 wrote: the run "
                        f"directory {run_dir} must be on a filesystem that every node shares, at the same path (--out)")
    if blind:
        raise UserError(f"rank(s) {', '.join(map(str, blind))} cannot see the run directory {run_dir} that rank 0 "
                        f"writes: it must be on a filesystem that every node shares, at the same path (--out)")


def _run_checked(argv: list[str]) -> None:
    """``torchrun ... -m common.distributed SCRIPT ARGS``: join the process group, check the shared run
    directory (``--run-dir`` of ARGS), then run SCRIPT in this process as ``python SCRIPT ARGS`` would."""
    from .lane import run_script

    require(len(argv) >= 1 and "--run-dir" in argv[1:-1], "usage: torchrun ... -m common.distributed SCRIPT --run-dir DIR ...")
    device = argv[argv.index("--device") + 1] if "--device" in argv[1:-1] else "auto"
    init_distributed(device)
    require_shared_run_dir(argv[argv.index("--run-dir") + 1])
    run_script(argv[0], argv[1:])


if __name__ == "__main__":
    cli_main(_run_checked, sys.argv[1:])
