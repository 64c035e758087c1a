"""Several training processes under torchrun: which process this is, the process group, and the
few collectives fit() needs.

torchrun starts one process per GPU (or per CPU share) and tells each who it is through WORLD_SIZE,
RANK, LOCAL_RANK and LOCAL_WORLD_SIZE. Without them this is one process, rank 0 of 1, and every
helper here returns at once without communicating, so the single-process path pays nothing.

Rank 0 is the one that talks to MLflow; every rank trains on its shard of each global batch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import PipelineError

_EVERY_RANK = "pipeline_raised_on_every_rank"


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def read_world(environ=None) -> World:
    """This process's place among the processes torchrun started (one process: SINGLE)."""
    env = os.environ if environ is None else environ
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    size = int(env["WORLD_SIZE"])
    return World(
        int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), size, int(env.get("LOCAL_WORLD_SIZE", str(size)))
    )


def mark_raised_on_every_rank(exc: BaseException) -> BaseException:
    """Say that every rank raises this error at the same point, so rank 0's report is the one needed."""
    setattr(exc, _EVERY_RANK, True)
    return exc


def is_raised_on_every_rank(exc: BaseException) -> bool:
    return getattr(exc, _EVERY_RANK, False)


@contextlib.contextmanager
def failing_alike():
    """For checks of the configuration alone (no I/O): every rank fails them alike, so a PipelineError
    raised in the block is marked as such and only rank 0 reports it."""
    try:
        yield
    except PipelineError as exc:
        raise mark_raised_on_every_rank(exc)


def check_world(world: World, batch_size: int, device: torch.device) -> None:
    """Refuse, on every rank alike and before any communication, what cannot be split over the processes."""
    if world.size == 1:
        return
    if batch_size % world.size:
        lower = batch_size // world.size * world.size
        hint = f"{lower} or {lower + world.size}" if lower else str(world.size)
        raise mark_raised_on_every_rank(
            PipelineError(
                f"batch_size={batch_size} is the global batch and must split evenly over the {world.size} processes; "
                f"use a multiple of {world.size}, e.g. {hint}"
            )
        )
    if device.type == "cuda" and world.local_size > torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise mark_raised_on_every_rank(
            PipelineError(
                f"{world.local_size} processes on this machine but {gpus} GPU(s) are visible; "
                f"use --nproc-per-node {gpus} (one process per GPU) or device=cpu"
            )
        )


@contextlib.contextmanager
def joining_process_group(world: World, device: torch.device):
    """Init the process group (NCCL on GPUs, gloo on CPU) for the block and destroy it after.

    Nothing happens for one process, or when the caller already holds a process group.
    """
    if world.size == 1:
        yield
        return
    owned = not dist.is_initialized()
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    except BaseException as exc:
        # An error every rank raised together: wait until rank 0 has ended its MLflow run before
        # anyone exits, since torchrun stops the remaining processes as soon as one has exited.
        if is_raised_on_every_rank(exc):
            dist.barrier()
        raise
    finally:
        if owned:
            dist.destroy_process_group()


@contextlib.contextmanager
def failing_together(world: World):
    """Run the block on every rank; if it failed on any rank, raise on every rank.

    Put the per-rank setup that precedes the first collective of training (loading data, building
    the model, rank 0's run setup) in this block: a rank failing there alone would otherwise leave
    the others waiting in that collective. A rank that did not fail itself raises a PipelineError
    with the failed rank's message, so rank 0's one error line names the cause.
    """
    if world.size == 1:
        yield
        return
    error = None
    try:
        yield
    except Exception as exc:
        error = exc
    reports = [None] * world.size
    dist.all_gather_object(reports, None if error is None else _describe(error))
    if error is not None:
        raise mark_raised_on_every_rank(error)
    failed = [(rank, message) for rank, message in enumerate(reports) if message is not None]
    if failed:
        rank, message = failed[0]
        raise mark_raised_on_every_rank(PipelineError(f"process rank {rank} failed: {message}"))


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"


def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [start, stop) of n rows that `rank` takes: contiguous, in rank order, sizes differing by
    at most one (the first n % size ranks take one more)."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def count_epoch(n: int, batch_size: int, size: int, drop_last: bool = False) -> tuple[int, int]:
    """(optimizer steps, images trained on) of one epoch over n images in global batches.

    Every rank must take part in every step, so a last global batch with fewer images than
    processes is left out of the epoch (one process: the last batch is kept unless drop_last).
    """
    steps, rest = divmod(n, batch_size)
    if rest >= size and not drop_last:
        return steps + 1, n
    return steps, n - rest


# One random stream per use, so that no two draw the same numbers: fit() seeds each epoch's shuffle,
# augmentation and dropout from (seed, epoch, stream[, rank]). The stream tag is never 0 and comes
# before the rank, because SeedSequence ignores trailing zeros: (seed, epoch) and (seed, epoch, 0) are
# one seed, which once made rank 0's augmentation draws the very numbers its shuffle had drawn.
SHUFFLE_STREAM, AUGMENT_STREAM, DROPOUT_STREAM = 1, 2, 3


def derive_seed(*parts: int) -> int:
    """A 63-bit seed made of (seed, epoch, stream[, rank]); trailing zeros do not count (see SHUFFLE_STREAM)."""
    hi, lo = np.random.SeedSequence([int(p) for p in parts]).generate_state(2)
    return ((int(hi) << 32) | int(lo)) & (2**63 - 1)


def sum_across(t: torch.Tensor, world: World) -> torch.Tensor:
    """Sum of t over all ranks, in place (one process: t itself)."""
    if world.size > 1:
        dist.all_reduce(t)
    return t


def gather_rows(local: torch.Tensor, n: int, world: World) -> torch.Tensor:
    """Every rank's shard_range rows of an n-row tensor, put back together in row order on every rank."""
    if world.size == 1:
        return local
    rows = -(-n // world.size)  # the largest shard: all_gather needs equal shapes, so shards are padded to it
    padded = local.new_zeros((rows, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return join_shards(parts, n)


def join_shards(parts: list[torch.Tensor], n: int) -> torch.Tensor:
    """The rows of n that padded per-rank parts hold, in row order (the inverse of shard_range)."""
    lengths = [stop - start for start, stop in (shard_range(n, rank, len(parts)) for rank in range(len(parts)))]
    return torch.cat([part[:length] for part, length in zip(parts, lengths)])


def broadcast_buffers(module: torch.nn.Module, world: World) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics)."""
    if world.size == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)
