"""Training from `msm data shard` shards: random crops streamed by litdata, resumable mid-epoch.

Every rank and every loader worker reads its own disjoint part of the records each epoch (litdata gives
each (rank, worker) pair its own chunks, or parts of chunks, from a permutation seeded by the data seed
and the epoch). Each record yields one random crop per epoch, like one file of the folder path; a crop's
position comes from (seed, epoch, record), so a resumed epoch draws exactly the crops an uninterrupted one
would have drawn.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.sampler import ChunkedIndex
from litdata.streaming.serializers import _SERIALIZERS, Serializer

from msm_lightning.audio import CorruptRecordError, decode_record_audio
from msm_lightning.training.datamodule import SkippedAudioWarning

# Position snapshots kept per loader: the batch being trained is always among the last few handed out.
_SNAPSHOTS = 32
# Exclusive bound of the per-item mask seeds: they travel through collation as int64.
_SEED_BOUND = 2**63 - 1
# The field formats `msm data shard` writes. litdata decodes whatever formats a shard's index.json names,
# some by unpickling (`pickle`, `graph`); every other format is refused, so shards cannot run code.
SHARD_FORMATS = frozenset({"str", "bytes", "int"})


class ShardFormatError(ValueError):
    """A shard index names a field format that msm shards never hold."""


class _RefusedFormat(Serializer):
    """Stands in for a litdata format outside SHARD_FORMATS: a shard index naming it is an error."""

    def __init__(self, name: str) -> None:
        self.name = name

    def setup(self, metadata: Any) -> None:
        """Called for each format the index names, before any record is decoded."""
        raise ShardFormatError(
            f"the shard index names field format {self.name!r}; msm shards hold only "
            f"{sorted(SHARD_FORMATS)}, and no other format is decoded (some unpickle, which could run code)"
        )

    def serialize(self, data: Any) -> tuple[bytes, str | None]:
        """Never used: msm shards are written with the plain formats."""
        raise ShardFormatError(f"field format {self.name!r} is not written to msm shards")

    def deserialize(self, data: bytes) -> Any:
        """Never reached (setup refuses first); refuses too."""
        raise ShardFormatError(f"field format {self.name!r} is not decoded from msm shards")

    def can_serialize(self, data: Any) -> bool:
        """Nothing."""
        return False


def data_only_serializers() -> dict[str, Serializer]:
    """litdata serializers for reading shards: every format outside SHARD_FORMATS refused."""
    return {name: _RefusedFormat(name) for name in _SERIALIZERS if name not in SHARD_FORMATS}


def data_seed() -> int:
    """The shuffle and crop seed: Lightning's global seed (the same on every rank), else 0.

    It must be equal on all ranks, since litdata splits one seeded permutation between them; a
    per-process random seed would give overlapping shares.
    """
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


class ShardCropDataset(StreamingDataset):
    """Fixed-length random crops of the records in a shard folder (local path or object-store URL).

    Items are ``{"audio": float32 tensor [crop_samples], "skipped": int, "record": int, "mask_seed": int}``:
    ``skipped`` counts the corrupt records this item replaces (0 or 1), ``record`` is the record's index,
    ``mask_seed`` seeds the item's mask (MSMPretraining draws it from that seed, so a resumed run also
    masks as the uninterrupted one would). A corrupt record is replaced by another crop of the last good
    clip this worker read (or of the next readable record of the same chunk), so every rank still yields
    the same number of items.
    """

    def __init__(
        self,
        input_dir: str,
        crop_samples: int = 32000,
        sample_rate: int = 16000,
        seed: int = 0,
        shuffle: bool = True,
        max_attempts: int = 100,
        **kwargs: Any,
    ) -> None:
        """Stream `input_dir`; `kwargs` go to litdata's StreamingDataset (e.g. cache_dir, max_cache_size)."""
        if crop_samples <= 0 or sample_rate <= 0 or max_attempts <= 0:
            raise ValueError("crop_samples, sample_rate and max_attempts must be positive")
        # drop_last gives every rank and worker the same number of items, which DDP needs to stay in step.
        kwargs.setdefault("serializers", data_only_serializers())
        super().__init__(input_dir, shuffle=shuffle, drop_last=True, seed=seed, **kwargs)
        self.crop_samples = crop_samples
        self.sample_rate = sample_rate
        self.max_attempts = max_attempts
        self._last_good: np.ndarray | None = None
        self._bad = 0

    def __getitem__(self, index: ChunkedIndex | int | slice | str) -> Any:
        """A crop item for the ChunkedIndex litdata iterates with; the raw record for any other index."""
        if not isinstance(index, ChunkedIndex):
            return super().__getitem__(index)
        try:
            audio = self._read(index)
            skipped = 0
        except CorruptRecordError as err:
            self._warn(index.index, err)
            audio, skipped = self._substitute(index), 1
        # Seeded by (seed, epoch, record) rather than by a running generator, so that a resumed epoch
        # crops and masks each record as the uninterrupted run would have.
        rng = np.random.default_rng((self.seed, self.current_epoch, index.index))
        mask_seed = int(rng.integers(_SEED_BOUND))
        crop = self._crop(audio, rng)
        return {"audio": crop, "skipped": skipped, "record": index.index, "mask_seed": mask_seed}

    def _read(self, index: ChunkedIndex) -> np.ndarray:
        try:
            record = super().__getitem__(index)
        except ShardFormatError:
            raise  # the whole shard set is refused, not one record
        except Exception as err:  # a damaged record header can make the deserialiser fail in many ways
            raise CorruptRecordError(f"unreadable record ({type(err).__name__}: {err})") from err
        if not isinstance(record, dict):
            raise CorruptRecordError(f"record is a {type(record).__name__}, not a dict")
        audio = decode_record_audio(record)
        if record.get("sample_rate") != self.sample_rate:
            # Not corruption: the whole folder was written for another rate, so every record would fail.
            raise ValueError(
                f"shard records are at {record.get('sample_rate')} Hz but training wants "
                f"{self.sample_rate} Hz; rewrite them with `msm data shard --sample-rate` or change "
                "data.sample_rate"
            )
        self._last_good = audio
        return audio

    def _substitute(self, index: ChunkedIndex) -> np.ndarray:
        if self._last_good is not None:
            return self._last_good
        # No good clip yet in this worker: look ahead in the current chunk, which is already local. A bad
        # record met here is reported (and counted) when its own turn comes.
        for j in list(self.upcoming_indexes)[: self.max_attempts - 1]:
            try:
                return self._read(ChunkedIndex(index=int(j), chunk_index=index.chunk_index))
            except CorruptRecordError:
                continue
        raise RuntimeError(
            f"record {index.index} and the records after it in chunk {index.chunk_index} of "
            f"'{self.input_dir.url or self.input_dir.path}' are corrupt ({self._bad} corrupt records met)"
        )

    def _warn(self, record: int, err: Exception) -> None:
        self._bad += 1
        warnings.warn(f"skipping corrupt shard record {record}: {err}", SkippedAudioWarning, stacklevel=3)

    def _crop(self, audio: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        crop, n = self.crop_samples, audio.size
        if n >= crop:
            start = int(rng.integers(n - crop + 1))
            return torch.from_numpy(audio[start : start + crop].copy())
        # Tile short clips from a random phase: a uniform crop of the endlessly looped clip.
        phase = int(rng.integers(n))
        return torch.from_numpy(np.tile(audio, -(-(crop + phase) // n))[phase : phase + crop].copy())


def batches_trained(trainer: L.Trainer | None) -> int | None:
    """Batches of the current epoch whose training step has finished, or None outside fitting.

    Lightning counts a batch as processed once its optimisation ran, so this is right both for a
    checkpoint written at the end of a batch and for one written mid-step (SLURM's requeue signal).
    """
    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return None
    return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


class ShardLoader(StreamingDataLoader):
    """litdata's StreamingDataLoader whose state is the position after the last *trained* batch.

    litdata's own state counts the batches handed out. A checkpoint written during a training step (as
    SLURM's requeue signal handler writes it) would then record the batch being trained as done, and a
    resume would skip it. This loader keeps a snapshot of the state after each batch it hands out and
    reports the one matching the number of batches Lightning has trained.
    """

    def __init__(
        self, dataset: ShardCropDataset, *, trained: Callable[[], int | None] | None = None, **kwargs: Any
    ) -> None:
        """Like StreamingDataLoader; `trained()` says how many batches of this epoch have been trained."""
        super().__init__(dataset, **kwargs)
        self._trained = trained
        self._snapshots: dict[int, dict[str, Any]] = {}
        # Batches of the epoch done before litdata's own count starts: nonzero after an elastic resume
        # (other devices or workers than the checkpoint's), where litdata counts from 0 again.
        self._offset = 0

    def _state_now(self) -> dict[str, Any]:
        # Copy the dicts that litdata updates in place on later calls; the lists inside are not mutated.
        state = super().state_dict()
        return {**state, "dataset": dict(state["dataset"])}

    def __iter__(self) -> Any:
        """Yield litdata's batches, recording the loader state after each."""
        if not self.restore:
            # A new epoch; a resumed one keeps the snapshot it was loaded from.
            self._snapshots.clear()
            self._offset = 0
        for batch in super().__iter__():
            state = self._state_now()
            done = self._offset + state["num_samples_yielded"] // self.batch_size
            if done == 1:
                # The state before this epoch's first batch: the end of the previous epoch, so that
                # a resume from it starts this epoch afresh (litdata treats 0 yielded as "new epoch").
                self._snapshots[done - 1] = self._epoch_start(state)
            self._snapshots[done] = state
            if len(self._snapshots) > _SNAPSHOTS:
                del self._snapshots[min(self._snapshots)]
            yield batch

    @staticmethod
    def _epoch_start(state: dict[str, Any]) -> dict[str, Any]:
        dataset = {**state["dataset"], "num_samples_yielded": 0, "current_epoch": state["current_epoch"] - 1}
        dataset["sample_in_epoch"] = 0
        return {
            **state,
            "dataset": dataset,
            "current_epoch": state["current_epoch"] - 1,
            "num_samples_yielded": 0,
            "latest_worker_idx": 0,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position after the last trained batch (during fit), else after the last batch handed out."""
        done = self._trained() if self._trained is not None else None
        if done is not None and done in self._snapshots:
            return self._snapshots[done]
        return self._state_now()

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Resume from `obj` (a state from state_dict()) at the next iteration."""
        super().load_state_dict(obj)
        done = obj["num_samples_yielded"] // self.batch_size
        self._offset = done - self._num_samples_yielded_streaming // self.batch_size
        self._snapshots = {done: obj}


def shard_loader(datamodule: Any, state: dict[str, Any] | None = None) -> ShardLoader:
    """The training loader of an AudioDataModule with `shards` set, resumed from `state` if given."""
    from msm_lightning.training.datamodule import _accelerator_available

    # litdata configures every worker itself, so Lightning's caution about an IterableDataset's len()
    # under several workers does not apply.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    local = "://" not in datamodule.shards
    if local and not (Path(datamodule.shards) / "index.json").is_file():
        raise ValueError(
            f"'{datamodule.shards}' holds no shards (no index.json); write them with `msm data shard`"
        )
    trainer = datamodule.trainer
    dataset = ShardCropDataset(
        datamodule.shards, datamodule.crop_samples, datamodule.sample_rate, seed=data_seed()
    )
    loader = ShardLoader(
        dataset,
        trained=lambda: batches_trained(trainer),
        batch_size=datamodule.batch_size,
        num_workers=datamodule.num_workers,
        pin_memory=datamodule.pin_memory and _accelerator_available(),
        drop_last=True,
    )
    if len(loader) == 0:
        world = trainer.world_size if trainer is not None else 1
        raise ValueError(
            f"shards '{datamodule.shards}' hold too few records for batch_size {datamodule.batch_size} on "
            f"{world} device(s) with {max(1, datamodule.num_workers)} loader worker(s) each: every epoch "
            "would be empty"
        )
    if state:
        loader.load_state_dict(state)
    return loader
