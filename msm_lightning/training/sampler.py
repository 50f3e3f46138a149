"""The training crop stream: which file, which crop and which mask every sample of every step gets.

Each sample's file, the random draws of its crop and its mask are a pure function of (seed, epoch, rank,
position in the epoch). So the stream can start at any batch: a resumed run (after a crash, or a SLURM
requeue) reads exactly the crops and draws exactly the masks that the uninterrupted run would have, on
every rank, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sized

import torch
from torch.utils.data import DistributedSampler

from msm_lightning.model.masking import random_mask

# Exclusive bound of the per-sample seeds: they travel through default_collate as int64.
_SEED_BOUND = 2**63 - 1


def derived_seed(*key: int | str) -> int:
    """A 63-bit seed from a key of ints and tags (a hash, so nearby keys give unrelated streams)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


def _generator(*key: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*key))


class CropStreamSampler(DistributedSampler):
    """Yields ``(file index, crop seed, mask seed)`` for one rank, from any batch of the stream on.

    Every epoch shuffles all files with a permutation of its own and deals them out to the ranks like
    ``DistributedSampler(drop_last=True)``; each sample then gets two seeds drawn for (epoch, rank). An
    iterator starts at batch ``consumed_batches()`` of the stream (the batches this rank has trained on
    since the run began, equal on every rank) and ends with that epoch, so a resumed run picks up in the
    middle of an epoch and the next iterator starts the next epoch. ``set_epoch`` is accepted but unused:
    the epoch follows from the count. Being a ``DistributedSampler``, Lightning leaves it in place.

    Where ``consumed_batches`` is missing or returns None (plain use, no trainer) every new iterator
    starts the next epoch.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        consumed_batches: Callable[[], int | None] | None = None,
    ) -> None:
        """A stream of `batch_size` batches over `dataset` for `rank` of `world_size`, keyed by `seed`."""
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.consumed_batches = consumed_batches
        self._iterators_started = 0

    @property
    def batches_per_epoch(self) -> int:
        """Full batches each rank reads per epoch."""
        return self.num_samples // self.batch_size

    def epoch_items(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's file indices [n] and (crop, mask) seeds [n, 2] for `epoch`, in stream order."""
        order = torch.randperm(len(self.dataset), generator=_generator("order", self.seed, epoch))
        files = order[: self.total_size][self.rank :: self.num_replicas]
        seeds = torch.randint(
            _SEED_BOUND, (len(files), 2), generator=_generator("draws", self.seed, epoch, self.rank)
        )
        return files, seeds

    def start_batch(self) -> int:
        """Index in the stream (over all epochs) of the batch the next iterator starts with."""
        consumed = self.consumed_batches() if self.consumed_batches is not None else None
        return consumed if consumed is not None else self._iterators_started * self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        """This rank's samples from `start_batch()` to the end of that batch's epoch."""
        per_epoch = self.batches_per_epoch
        start = self.start_batch()
        self._iterators_started += 1
        if per_epoch == 0:
            return iter(())
        epoch, first = divmod(start, per_epoch)
        files, seeds = self.epoch_items(epoch)
        window = slice(first * self.batch_size, per_epoch * self.batch_size)
        return zip(files[window].tolist(), *seeds[window].T.tolist(), strict=True)

    def __len__(self) -> int:
        """Samples per epoch on this rank (a resumed epoch's first iterator yields fewer)."""
        return self.num_samples


def masks_from_seeds(seeds: torch.Tensor, n_patches: int, ratio: float) -> torch.Tensor:
    """Boolean masks [len(seeds), n_patches] drawn, row by row, from generators seeded with `seeds`."""
    rows = [
        random_mask(1, n_patches, ratio, generator=torch.Generator().manual_seed(int(s)))
        for s in seeds.tolist()
    ]
    return torch.cat(rows) if rows else torch.zeros(0, n_patches, dtype=torch.bool)
