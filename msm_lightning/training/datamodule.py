"""Fixed-length audio crops for pretraining: a fault-tolerant dataset and its Lightning data module."""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from msm_lightning.audio import AudioReadError, audio_info, list_audio_files, load_audio
from msm_lightning.training.sampler import CropStreamSampler

# Replacement draws that may land on files already known to be bad before falling back to an exact
# draw among the good ones (which costs a pass over the whole index).
_REJECTION_DRAWS = 64
# setup() gives up looking for a readable file after this many; a corpus whose first thousand files
# are all unreadable is broken even if a later one happens to read.
_MAX_PROBES = 1000


class SkippedAudioWarning(UserWarning):
    """An unreadable audio file was skipped and replaced by another one."""


class _PathTable:
    """File paths packed into two numpy buffers.

    Forked DataLoader workers would gradually copy a Python list of a million paths (touching an
    object writes its reference count, un-sharing its page); numpy buffers stay shared.
    """

    def __init__(self, paths: Sequence[str | Path]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> Path:
        start = int(self._ends[index - 1]) if index > 0 else 0
        return Path(os.fsdecode(self._blob[start : int(self._ends[index])].tobytes()))

    def digest(self) -> str:
        """SHA-256 of the paths in order."""
        return hashlib.sha256(self._blob.tobytes() + self._ends.tobytes()).hexdigest()


def _distributed_rank() -> int | None:
    """Global rank from torch.distributed if it is initialised in this process, else None."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return None


class RandomCropDataset(Dataset):
    """Fixed-length crops of audio files (random, or centred for evaluation) that skip unreadable files.

    Items are ``{"audio": float32 tensor [crop_samples], "skipped": int, "skipped_ids": int64 tensor
    [max_attempts]}``, where ``skipped`` counts the unreadable files passed over to produce the item and
    ``skipped_ids`` holds their indices (padded with -1), so that a file met again is not counted again.
    Clips shorter than the crop are tiled; files with non-finite or out-of-scale samples are unreadable.
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        crop_samples: int = 32000,
        sample_rate: int = 16000,
        center: bool = False,
        max_attempts: int = 100,
        rank: int | None = None,
    ) -> None:
        """Crop `crop_samples` at `sample_rate` from `files`; `rank` defaults to torch.distributed's."""
        if crop_samples <= 0 or sample_rate <= 0 or max_attempts <= 0:
            raise ValueError("crop_samples, sample_rate and max_attempts must be positive")
        self._paths = _PathTable(files)
        self.crop_samples = crop_samples
        self.sample_rate = sample_rate
        self.center = center
        self.max_attempts = max_attempts
        self.rank = rank
        self._bad: set[int] = set()
        self._gen: torch.Generator | None = None
        self._gen_pid = -1

    def __len__(self) -> int:
        """Number of files."""
        return len(self._paths)

    def path(self, index: int) -> Path:
        """Path of file `index`."""
        return self._paths[index]

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the per-process generator (spawned workers build their own)."""
        return {**self.__dict__, "_gen": None, "_gen_pid": -1}

    def index_digest(self) -> str:
        """SHA-256 of the file list, to check that every rank indexes the same corpus in the same order."""
        return self._paths.digest()

    def __getitem__(self, index: int | tuple[int, int, int]) -> dict[str, torch.Tensor | int]:
        """Return a crop of file `index`, or of a readable substitute if that file cannot be read.

        A ``(file index, crop seed, mask seed)`` index (from `CropStreamSampler`) fixes the crop's random
        draws and adds the mask seed to the item as ``mask_seed``.
        """
        extra: dict[str, int] = {}
        if isinstance(index, tuple):
            index, crop_seed, mask_seed = index
            gen, extra = torch.Generator().manual_seed(crop_seed), {"mask_seed": mask_seed}
        else:
            gen = self._generator()
        idx, last_error = index, None
        # Each failed attempt (a newly or previously found bad file) is one skip, of file `idx`.
        passed = torch.full((self.max_attempts,), -1, dtype=torch.int64)
        for skipped in range(self.max_attempts):
            if idx not in self._bad:
                try:
                    audio = self._crop(self._paths[idx], gen)
                    return {"audio": audio, "skipped": skipped, "skipped_ids": passed, **extra}
                except AudioReadError as err:
                    self._mark_bad(idx, err)
                    last_error = err
            passed[skipped] = idx
            idx = self._substitute(idx, gen)
        raise RuntimeError(
            f"{self.max_attempts} audio files in a row could not be read (last: {last_error}); "
            f"{len(self._bad)} of {len(self)} files are known to be unreadable in this process"
        )

    def _generator(self) -> torch.Generator:
        # Crops must differ between DataLoader workers and between DDP ranks, yet follow
        # seed_everything. Each process builds its own generator on its first draw, seeded from
        # torch's global seed there: PyTorch seeds worker k with base_seed + k, and Lightning's
        # seed_everything(workers=True) reseeds each worker from (base_seed, worker, rank). The rank
        # and worker id are mixed in again explicitly because in the main process (num_workers=0),
        # and in workers without Lightning's reseeding, that global seed is the same on every rank
        # whenever the user seeded. Keyed by pid since forked workers inherit the parent's generator.
        pid = os.getpid()
        if self._gen is None or self._gen_pid != pid:
            worker = get_worker_info()
            rank = self.rank if self.rank is not None else (_distributed_rank() or 0)
            entropy = [torch.initial_seed(), rank, 0 if worker is None else worker.id + 1]
            seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]) >> 1
            self._gen, self._gen_pid = torch.Generator().manual_seed(seed), pid
        return self._gen

    def _randint(self, high: int, gen: torch.Generator) -> int:
        return int(torch.randint(high, (1,), generator=gen))

    def _crop(self, path: Path, gen: torch.Generator) -> torch.Tensor:
        info = audio_info(path)
        total = math.ceil(info.frames * self.sample_rate / info.sample_rate)
        crop = self.crop_samples
        if total > crop:
            # Read only the crop (plus resampling context) so long recordings cost no more than short.
            start = (total - crop) // 2 if self.center else self._randint(total - crop + 1, gen)
            rate = self.sample_rate
            audio = load_audio(path, rate, offset=start / rate, duration=crop / rate)
        else:
            audio = load_audio(path, self.sample_rate)
        if audio.numel() >= crop:
            return audio[:crop].clone()
        # Tile short clips. A random phase makes this a uniform crop of the endlessly looped clip.
        phase = 0 if self.center else self._randint(audio.numel(), gen)
        return audio.repeat(math.ceil((crop + phase) / audio.numel()))[phase : phase + crop].clone()

    def _mark_bad(self, index: int, err: AudioReadError) -> None:
        self._bad.add(index)
        warnings.warn(f"skipping unreadable audio file: {err}", SkippedAudioWarning, stacklevel=2)

    def _substitute(self, index: int, gen: torch.Generator) -> int:
        n = len(self)
        if len(self._bad) >= n:
            raise RuntimeError(f"all {n} audio files are unreadable (e.g. '{self._paths[index]}')")
        if self.center:
            # Evaluation stays deterministic: take the next readable file.
            index = (index + 1) % n
            while index in self._bad:
                index = (index + 1) % n
            return index
        for _ in range(_REJECTION_DRAWS):
            index = self._randint(n, gen)
            if index not in self._bad:
                return index
        good = [i for i in range(n) if i not in self._bad]
        return good[self._randint(len(good), gen)]


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


class AudioDataModule(L.LightningDataModule):
    """Random fixed-length crops of an audio corpus for self-supervised pretraining.

    Unreadable files are skipped with a warning (each batch's ``skipped`` entry counts them); setup()
    fails if no listed file can be read at all. With ``shards`` the crops stream from `msm data shard`
    output instead (`msm_lightning.training.shards`), and the loader's position after the last trained
    batch goes into checkpoints, so a resume continues mid-epoch.

    Args:
        root: Folder searched recursively for audio files (.wav, .flac, .ogg, .mp3, .aiff, .aif).
            Give exactly one of root, manifest and shards.
        manifest: Text file with one audio path per line ('#' comments allowed; relative paths are
            relative to the manifest), or a .csv/.tsv whose first column is the path.
        shards: Folder (or object-store URL, e.g. s3://bucket/shards) written by `msm data shard`; used
            instead of root and manifest.
        batch_size: Crops per batch on each device (the global batch is this times the world size).
        num_workers: DataLoader worker processes per device; 0 loads in the training process.
        crop_seconds: Length of each crop in seconds; shorter clips are looped to this length.
        sample_rate: Sample rate in Hz that all audio is resampled to.
        val_manifest: Optional manifest of held-out files, validated on deterministic centre crops.
        pin_memory: Use page-locked host memory for batches when a GPU or other accelerator is present.
    """

    def __init__(
        self,
        root: str | None = None,
        manifest: str | None = None,
        shards: str | None = None,
        batch_size: int = 32,
        num_workers: int = 4,
        crop_seconds: float = 2.0,
        sample_rate: int = 16000,
        val_manifest: str | None = None,
        pin_memory: bool = True,
    ) -> None:
        """Store the settings; files are listed and checked in setup()."""
        super().__init__()
        if batch_size <= 0 or num_workers < 0 or crop_seconds <= 0 or sample_rate <= 0:
            raise ValueError(
                "need batch_size > 0, num_workers >= 0, crop_seconds > 0 and sample_rate > 0; got "
                f"{batch_size}, {num_workers}, {crop_seconds}, {sample_rate}"
            )
        self.save_hyperparameters()
        self.root = root
        self.manifest = manifest
        self.shards = shards
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.crop_seconds = crop_seconds
        self.sample_rate = sample_rate
        self.val_manifest = val_manifest
        self.pin_memory = pin_memory
        self.train_dataset: RandomCropDataset | None = None
        self.val_dataset: RandomCropDataset | None = None
        self._crop_stream: CropStreamSampler | None = None  # the training sampler, see train_dataloader()
        self._crop_stream_state: dict[str, int] | None = None  # its seed and position from a checkpoint
        self._shard_loader: Any = None  # a training.shards.ShardLoader, built in train_dataloader()
        self._shard_state: dict[str, Any] | None = None  # its position from a checkpoint, if resuming

    @property
    def crop_samples(self) -> int:
        """Crop length in samples."""
        return round(self.crop_seconds * self.sample_rate)

    def setup(self, stage: str | None = None) -> None:
        """List the training (and validation) files and check that some of them can be read."""
        if sum(x is not None for x in (self.root, self.manifest, self.shards)) != 1:
            raise ValueError(
                "AudioDataModule needs exactly one of root (a folder of audio), manifest (a file list) or "
                f"shards, the others null (e.g. --data.root null); got root={self.root!r}, "
                f"manifest={self.manifest!r}, shards={self.shards!r}"
            )
        if self.shards is None and self.train_dataset is None and stage in (None, "fit"):
            source = f"folder '{self.root}'" if self.root is not None else f"manifest '{self.manifest}'"
            files = list_audio_files(root=self.root, manifest=self.manifest)
            self.train_dataset = self._dataset(files, source, center=False)
        if self.val_manifest is not None and self.val_dataset is None and stage in (None, "fit", "validate"):
            files = list_audio_files(manifest=self.val_manifest)
            self.val_dataset = self._dataset(files, f"manifest '{self.val_manifest}'", center=True)

    def _dataset(self, files: list[Path], source: str, center: bool) -> RandomCropDataset:
        first_error = None
        tried = min(len(files), _MAX_PROBES)
        for path in files[:tried]:
            try:
                load_audio(path, self.sample_rate, duration=self.crop_seconds)
                break
            except AudioReadError as err:
                first_error = first_error or err
        else:
            raise ValueError(
                f"none of the {tried} files tried (of {len(files)} listed) in {source} could be read; "
                f"first error: {first_error}"
            )
        rank = self.trainer.global_rank if self.trainer is not None else None
        return RandomCropDataset(files, self.crop_samples, self.sample_rate, center=center, rank=rank)

    def _loader(self, dataset: RandomCropDataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._crop_stream_sampler(dataset) if train else None,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and _accelerator_available(),
            persistent_workers=self.num_workers > 0,
        )

    def _crop_stream_sampler(self, dataset: RandomCropDataset) -> CropStreamSampler:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        restored = self._crop_stream_state
        if restored is not None:
            seed = restored["seed"]
        else:
            # Every rank must deal from the same permutation: rank 0's seed wins (the processes of an srun
            # job each seed themselves, and an unseeded run would differ between them).
            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
            seed = trainer.strategy.broadcast(seed, src=0) if trainer is not None else seed
        if trainer is not None and world > 1:
            digest = dataset.index_digest()
            same = trainer.strategy.broadcast(digest, src=0) == digest
            if not trainer.strategy.reduce_boolean_decision(same, all=True):
                raise ValueError(
                    f"the {world} ranks list different training files (rank {rank}: {len(dataset)} files); "
                    "root or manifest must give every node the same paths in the same order"
                )
        self._crop_stream = CropStreamSampler(
            dataset,
            self.batch_size,
            seed,
            rank=rank,
            world_size=world,
            consumed_batches=self._batches_consumed,
        )
        return self._crop_stream

    def _batches_consumed(self) -> int | None:
        # A resume starts where the checkpoint says; later iterators (new epochs) where training is now.
        if self._crop_stream_state is not None:
            consumed, self._crop_stream_state = self._crop_stream_state["batches"], None
            return consumed
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return None
        # Lightning counts a batch as processed once its optimisation step has run.
        return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)

    def train_dataloader(self) -> DataLoader:
        """Shuffled random crops; incomplete last batches are dropped."""
        if self.shards is not None:
            from msm_lightning.training.shards import shard_loader

            # The checkpoint's position is used once: a reloaded loader must not jump back to it.
            self._shard_loader, self._shard_state = shard_loader(self, self._shard_state), None
            return self._shard_loader
        if self.train_dataset is None:
            self.setup("fit")
        world = self.trainer.world_size if self.trainer is not None else 1
        if len(self.train_dataset) < self.batch_size * world:
            raise ValueError(
                f"only {len(self.train_dataset)} training files for batch_size {self.batch_size} on "
                f"{world} device(s): with drop_last every epoch would be empty"
            )
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """Centre crops of the val_manifest files in order, or no loader (an empty list) without one."""
        if self.val_manifest is None:
            return []
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, train=False)

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position after the last trained batch (shard loader or crop sampler)."""
        if self._shard_loader is not None:
            return {"shards": self._shard_loader.state_dict()}
        if self._crop_stream is not None and (batches := self._batches_consumed()) is not None:
            return {"crop_stream": {"seed": self._crop_stream.seed, "batches": batches}}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the stream's position for train_dataloader() to resume from."""
        self._shard_state = state_dict.get("shards")
        self._crop_stream_state = state_dict.get("crop_stream")
