"""Evaluation over processes: which blocks of work a process does (:class:`Shard`), each sample's own noise
(:func:`sample_generators`) and the gathers that put the pieces back in index order.

The work of an evaluation (samples, real images for the bound and the reference features, images for
Analytic-DPM's moments) is cut into blocks of consecutive indices, ``batch_size`` each (the last one shorter),
and block b goes to process b mod W. A block is computed exactly as one process computes it (the same images in
the same model call), and sample i's noise comes from its own generator seeded by (seed, i), so 1, 2 or W
processes give the same samples and the same figures. The process group is the one ``accelerate launch`` (or
torchrun) forms; without one, everything runs in this process.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import EvaluationError

__all__ = ["Shard", "gather_rows", "current_shard", "start_processes", "sample_seed", "sample_generators"]


@dataclass(frozen=True)
class Shard:
    """Process ``rank`` of ``world``; block b belongs to the process ``(b + offset) mod world``."""

    rank: int = 0
    world: int = 1
    offset: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shifted(self, blocks: int) -> Shard:
        """The same processes, dealing from ``blocks`` further on (spreads consecutive small jobs)."""
        return Shard(self.rank, self.world, self.offset + blocks)

    def blocks(self, n: int, size: int) -> list[range]:
        """The index ranges of this process's blocks of ``size`` among ``n`` items, in order."""
        if size < 1:
            raise ValueError(f"block size must be >= 1, got {size}")
        starts = range(0, n, size)
        return [range(s, min(s + size, n)) for b, s in enumerate(starts) if (b + self.offset) % self.world == self.rank]

    def gather(self, pieces: list, to_all: bool = True) -> list | None:
        """Every process's ``pieces`` (a list of (block start, value) pairs; values on the CPU), sorted by start:
        on every process (``to_all``), else on the main process only (None elsewhere)."""
        if self.world == 1:
            return sorted(pieces, key=lambda p: p[0])
        import torch.distributed as dist

        if to_all:
            parts: list = [None] * self.world
            dist.all_gather_object(parts, pieces)
        else:
            parts = [None] * self.world if self.is_main else None
            dist.gather_object(pieces, parts, dst=0)
            if not self.is_main:
                return None
        return sorted((p for part in parts for p in part), key=lambda p: p[0])

    def broadcast(self, value):
        """The main process's ``value``, on every process."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """The block runs on the main process, then on the others (a download or a cache file written once)."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:  # a failure on the main process must still release the others (they then fail together)
            if self.is_main:
                self.barrier()


def gather_rows(shard: Shard, rows: torch.Tensor, blocks: list[range], dim: int = 0) -> torch.Tensor:
    """``rows`` (full size along ``dim``; this process filled its ``blocks``) with every process's blocks
    filled in, on every process."""
    if shard.world == 1:
        return rows
    index = [slice(None)] * rows.ndim
    pieces = []
    for block in blocks:
        index[dim] = slice(block.start, block.stop)
        pieces.append((block.start, rows[tuple(index)].cpu()))
    out = rows.clone()
    for start, value in shard.gather(pieces):
        index[dim] = slice(start, start + value.shape[dim])
        out[tuple(index)] = value.to(out.device)
    return out


def current_shard() -> Shard:
    """This process in torch.distributed's default process group, if one is formed; else a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def start_processes(device: str | None) -> tuple[Shard, torch.device | None]:
    """(this process's shard, its device or None: the caller's default) for a command line run. Under
    ``accelerate launch`` / torchrun (``WORLD_SIZE`` > 1) the process group is formed through accelerate's
    ``PartialState`` (gloo on a machine without a GPU, where a plain launch would run W independent processes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard(), None
    from accelerate import PartialState

    state = PartialState(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))
    if state.num_processes != world:
        raise EvaluationError(
            f"WORLD_SIZE={world} but the process group has {state.num_processes} process(es): launch with "
            "`accelerate launch --multi_gpu --num_processes N` or torchrun"
        )
    return Shard(state.process_index, state.num_processes), (None if device else state.device)


def sample_seed(seed: int, index: int) -> int:
    """The noise seed of sample ``index`` of an evaluation seeded with ``seed`` (a 63-bit hash of both)."""
    digest = hashlib.blake2b(f"ddpm_plus-sample:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_generators(seed: int, indices: range) -> list[torch.Generator]:
    """One CPU generator per sample (seeded by :func:`sample_seed`): a sample's noise does not depend on the
    batch or the process it is drawn in."""
    return [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]
