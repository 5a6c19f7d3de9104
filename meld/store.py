"""Feature store: one split's log-mel frames in a memory-mapped float32 file, plus an index.

Layout of a split folder::

    frames.f32      all utterances' (frames, 80) log-mel, back to back
    index.jsonl     {id, speaker, text, offset, frames, duration} per utterance
    rejected.jsonl  {id, reason} for every input that was skipped

Also: the frame-budget bucketing batch sampler, sharded per worker and resumable.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from meld.features import N_MELS, NormStats


def write_store(folder: str | Path, items, rejected: list[dict]) -> dict:
    """Write (meta, mel) items into a split folder; returns {kept, rejected, frames}.

    Args:
        items: iterable of (meta dict with id/speaker/text/duration, (T, 80) float32 mel).
        rejected: rows {id, reason} to list in rejected.jsonl.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    offset = 0
    index = []
    with open(folder / "frames.f32.tmp", "wb") as f:
        for meta, mel in items:
            mel = np.ascontiguousarray(mel, dtype=np.float32)
            f.write(mel.tobytes())
            index.append({**meta, "offset": offset, "frames": int(mel.shape[0])})
            offset += mel.shape[0]
    (folder / "frames.f32.tmp").replace(folder / "frames.f32")
    with open(folder / "index.jsonl", "w", encoding="utf-8") as f:
        for row in index:
            f.write(json.dumps(row) + "\n")
    with open(folder / "rejected.jsonl", "w", encoding="utf-8") as f:
        for row in rejected:
            f.write(json.dumps(row) + "\n")
    return {"kept": len(index), "rejected": len(rejected), "frames": offset}


class FeatureStore:
    """Read-only view of one split: ``store[i]`` -> (T, 80) float32 raw log-mel (memory-mapped)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_path = self.folder / "index.jsonl"
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.folder}: not a feature store (no index.jsonl; did the features stage run?)")
        with open(index_path, encoding="utf-8") as f:
            self.index = [json.loads(line) for line in f if line.strip()]
        total = sum(r["frames"] for r in self.index)
        self._frames = (
            np.memmap(self.folder / "frames.f32", dtype=np.float32, mode="r", shape=(total, N_MELS))
            if total
            else np.zeros((0, N_MELS), np.float32)
        )

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        row = self.index[i]
        return np.asarray(self._frames[row["offset"] : row["offset"] + row["frames"]])

    @property
    def lengths(self) -> list[int]:
        return [r["frames"] for r in self.index]

    def all_frames(self) -> np.ndarray:
        return self._frames


def load_stats(path: str | Path) -> NormStats:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no normalisation statistics (did the features stage run?)")
    return NormStats.from_dict(json.loads(path.read_text()))


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0  # batches already served in this epoch (per worker)


class FrameBudgetSampler:
    """Length-bucketed batches whose padded size (longest x count) stays under a frame budget.

    Utterances are sorted by length and cut greedily into batches; the batch order is
    shuffled every epoch (seeded by ``seed + epoch``), and worker ``rank`` takes every
    ``world_size``-th batch. Every rank gets the same number of batches, as DDP needs.

    Args:
        lengths: frames per utterance (after grouping by the reduction factor).
        frames_per_batch: padded frame budget per batch.
        rank, world_size: this worker's shard.
        seed: shuffling seed.
    """

    def __init__(self, lengths: list[int], frames_per_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        too_long = [i for i, n in enumerate(lengths) if n > frames_per_batch]
        if too_long:
            raise ValueError(
                f"{len(too_long)} utterance(s) are longer than the frame budget ({frames_per_batch}); "
                "raise train.frames_per_batch or lower features.max_seconds"
            )
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        self.batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            longest = lengths[i]  # sorted ascending: the newcomer is the longest
            if current and longest * (len(current) + 1) > frames_per_batch:
                self.batches.append(current)
                current = []
            current.append(i)
        if current:
            self.batches.append(current)
        if len(self.batches) < world_size:
            raise ValueError(f"only {len(self.batches)} batches for {world_size} workers: lower the frame budget")
        self.lengths = lengths
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_rank = len(self.batches) // world_size
        self.state = SamplerState()

    def padding_fraction(self) -> float:
        padded = sum(max(self.lengths[i] for i in b) * len(b) for b in self.batches)
        real = sum(self.lengths)
        return 1.0 - real / padded if padded else 0.0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.batches), generator=g).tolist()
        mine = [self.batches[j] for j in perm[self.rank :: self.world_size]]
        return mine[: self.per_rank]

    def __iter__(self):
        """Endless: yields batches, advancing (epoch, position) so a checkpoint can resume mid-epoch."""
        while True:
            batches = self.epoch_batches(self.state.epoch)
            while self.state.position < len(batches):
                batch = batches[self.state.position]
                self.state.position += 1
                yield batch
            self.state = SamplerState(self.state.epoch + 1, 0)

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "position": self.state.position}

    def load_state_dict(self, d: dict) -> None:
        self.state = SamplerState(int(d["epoch"]), int(d["position"]))


def collate(
    mels: list[np.ndarray], texts: list[list[int]], reduction: int
) -> dict[str, torch.Tensor]:
    """Pad normalised (T, 80) mels (grouped by r into (T', 80r)) and BPE id lists into a batch.

    Returns: mel (B, T', 80r), mel_len (B,), text (B, L), text_len (B,).
    """
    B = len(mels)
    grouped = [math.ceil(m.shape[0] / reduction) for m in mels]
    T = max(grouped)
    mel = torch.zeros(B, T * reduction, N_MELS)
    for b, m in enumerate(mels):
        mel[b, : m.shape[0]] = torch.from_numpy(np.asarray(m, dtype=np.float32))
    mel = mel.reshape(B, T, N_MELS * reduction)  # (B, T', 80r)
    L = max(len(t) for t in texts)
    text = torch.zeros(B, L, dtype=torch.long)
    for b, t in enumerate(texts):
        text[b, : len(t)] = torch.tensor(t, dtype=torch.long)
    return {
        "mel": mel,
        "mel_len": torch.tensor(grouped, dtype=torch.long),
        "text": text,
        "text_len": torch.tensor([len(t) for t in texts], dtype=torch.long),
    }


class TrainingData:
    """A split's normalised frames and BPE ids, ready for :func:`collate`."""

    def __init__(self, store: FeatureStore, stats: NormStats, tokenizer, reduction: int):
        self.store, self.stats, self.reduction = store, stats, reduction
        self.texts = [tokenizer.encode(r["text"]) for r in store.index]

    def lengths(self) -> list[int]:
        return [math.ceil(n / self.reduction) for n in self.store.lengths]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        mels = [self.stats.normalise(self.store[i]) for i in indices]
        return collate(mels, [self.texts[i] for i in indices], self.reduction)
