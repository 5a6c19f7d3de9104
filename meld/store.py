"""Memory-mapped stores of per-utterance arrays, plus an index: log-mel frames and DAC codes.

Layout of a split folder (feature store; a code store holds ``codes.i16`` instead)::

    frames.f32      all utterances' (frames, 80) log-mel, back to back (float32)
    codes.i16       all utterances' (frames, K) DAC codes, back to back (int16; code stores only)
    index.jsonl     {id, speaker, text, offset, frames, duration} per utterance
    rejected.jsonl  {id, reason} for every input that was skipped

``frames`` counts rows of the data file: 62.5 Hz mel frames in a feature store, 50 Hz code
frames in a code store. Also: the frame-budget bucketing batch sampler, sharded per worker and resumable.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from meld.features import N_MELS, NormStats

FEATURES_FILE = "frames.f32"
CODES_FILE = "codes.i16"
CODE_LIMIT = 1 << 15  # int16 on disk: codes 0..32767, so a codebook of at most 32768 codes


def write_store(folder: str | Path, items, rejected: list[dict], *, data_file: str = FEATURES_FILE,
                dtype: type = np.float32) -> dict:
    """Write (meta, array) items into a split folder; returns {kept, rejected, frames}.

    Args:
        items: iterable of (meta dict with id/speaker/text/duration, (T, W) array); every item has the same W.
        rejected: rows {id, reason} to list in rejected.jsonl.
        data_file, dtype: the data file's name and element type (log-mel: frames.f32 / float32,
            DAC codes: codes.i16 / int16).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    offset = 0
    width = None
    index = []
    with open(folder / f"{data_file}.tmp", "wb") as f:
        for meta, arr in items:
            arr = np.ascontiguousarray(arr, dtype=dtype)
            if arr.ndim != 2 or (width is not None and arr.shape[1] != width):
                raise ValueError(f"{meta.get('id')}: array of shape {arr.shape}, expected (T, {width or 'W'})")
            width = arr.shape[1]
            f.write(arr.tobytes())
            index.append({**meta, "offset": offset, "frames": int(arr.shape[0])})
            offset += arr.shape[0]
    (folder / f"{data_file}.tmp").replace(folder / data_file)
    with open(folder / "index.jsonl", "w", encoding="utf-8") as f:
        for row in index:
            f.write(json.dumps(row) + "\n")
    with open(folder / "rejected.jsonl", "w", encoding="utf-8") as f:
        for row in rejected:
            f.write(json.dumps(row) + "\n")
    return {"kept": len(index), "rejected": len(rejected), "frames": offset}


def write_code_store(folder: str | Path, items, rejected: list[dict]) -> dict:
    """:func:`write_store` for (T, K) integer DAC codes (int16 on disk: codes 0..32767).

    Raises:
        ValueError: codes int16 cannot hold (a negative one, or a codebook of more than 32768 codes):
            the cast to int16 would wrap them into other codes without a word.
    """

    def checked():
        for meta, codes in items:
            codes = np.asarray(codes)
            if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= CODE_LIMIT):
                raise ValueError(f"{meta.get('id')}: codes {int(codes.min())}..{int(codes.max())} do not fit the code "
                                 f"store's int16 (0..{CODE_LIMIT - 1})")
            yield meta, codes

    return write_store(folder, checked(), rejected, data_file=CODES_FILE, dtype=np.int16)


class StoreError(ValueError):
    """A feature or code store the stages cannot read as written (the file and line named)."""


def _read_index(index_path: Path) -> list[dict]:
    """index.jsonl's rows, each checked for what reading the data needs (``offset``, ``frames``, ``id``, ``text``): a
    hand-edited or half-copied line was a JSONDecodeError or KeyError naming no file, raised in every
    Ray worker of a training run rather than once in its driver."""
    rows = []
    try:
        with open(index_path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as err:
                    raise StoreError(f"{index_path}:{n}: not a JSON row ({err})") from err
                if not isinstance(row, dict) or not all(
                        isinstance(row.get(k), int) and not isinstance(row.get(k), bool) and row[k] >= 0
                        for k in ("offset", "frames")):
                    raise StoreError(f"{index_path}:{n}: a row needs whole 'offset' and 'frames' counts >= 0, "
                                     f"found {line.strip()[:200]}")
                # read by every training worker (the transcript) and in messages (the id): missing, a KeyError
                # in each Ray worker naming neither the file nor the line
                if not all(isinstance(row.get(k), str) for k in ("id", "text")):
                    raise StoreError(f"{index_path}:{n}: a row needs an 'id' and a 'text' string, found "
                                     f"{line.strip()[:200]}")
                rows.append(row)
    except UnicodeDecodeError as err:
        raise StoreError(f"{index_path}: not UTF-8 text ({err})") from err
    return rows


class _ArrayStore:
    """Read-only view of one split's data file: ``store[i]`` -> (T, width) array (memory-mapped).

    Raises:
        FileNotFoundError: no index.jsonl in the folder.
        StoreError: an index row that cannot be read, or a data file of another size than the index says.
    """

    data_file: str
    dtype: type
    kind: str  # for messages: "feature store" / "code store"
    stage: str  # the stage that writes it

    def __init__(self, folder: str | Path, width: int):
        self.folder = Path(folder)
        index_path = self.folder / "index.jsonl"
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.folder}: not a {self.kind} (no index.jsonl; did the {self.stage} stage run?)")
        self.index = _read_index(index_path)
        self._lengths = [r["frames"] for r in self.index]
        total = sum(self._lengths)
        data_path = self.folder / self.data_file
        dtype = np.dtype(self.dtype)
        expected = total * width * dtype.itemsize
        found = data_path.stat().st_size if data_path.is_file() else None
        if found is not None and found > expected:
            # checked with no rows too: an index.jsonl cut off to nothing read as an empty split
            raise StoreError(f"{data_path}: {found} bytes, more than the {expected} ({total} rows of {width} {dtype.name}) "
                             f"that {index_path.name}'s {len(self.index)} row(s) account for: a cut off {index_path.name}, or data "
                             "written with another width")
        if total and found != expected:
            raise StoreError(f"{data_path}: expected {expected} bytes ({total} rows of {width} {dtype.name}), "
                             f"found {'no file' if found is None else found}: truncated, or written with another width")
        self._check_rows_tile(index_path, total)
        self._frames = (
            np.memmap(data_path, dtype=self.dtype, mode="r", shape=(total, width))
            if total
            else np.zeros((0, width), self.dtype)
        )

    def _check_rows_tile(self, index_path: Path, total: int) -> None:
        """Every row of the ``total``-row data file read by exactly one utterance. The counts alone (the
        file's size) let two rows share frames: one utterance read (part of) another's, paired with its
        own text, without a word. Rows in another order than the file's are fine (zero-frame rows first
        where several start together). In numpy: a Python loop took 0.16 s per worker on 281k rows."""
        n = len(self.index)
        offsets = np.fromiter((r["offset"] for r in self.index), np.int64, n)
        frames = np.fromiter((r["frames"] for r in self.index), np.int64, n)
        # a row past the data's end would read a short array (a memmap slice clips), not fail; the tiling
        # below refuses it too, but this names what is wrong with it (a gap would be named instead)
        past = np.flatnonzero(offsets + frames > total)
        if past.size:
            k = int(past[0])
            row = self.index[k]
            raise StoreError(f"{index_path}: row {k + 1} ({row.get('id')}) ends at row {row['offset'] + row['frames']} "
                             f"of a {total}-row {self.data_file}")
        order = np.lexsort((np.arange(n), frames > 0, offsets))
        # row k (in offset order) must start where the rows before it end
        ends = np.cumsum(frames[order])
        starts = np.concatenate([[0], ends[:-1]])
        bad = np.flatnonzero(offsets[order] != starts)
        if not bad.size:
            return
        k = int(bad[0])
        row, end = self.index[order[k]], int(starts[k])
        where = f"{index_path}: row {order[k] + 1} ({row.get('id')}) starts at row {row['offset']} of {self.data_file}"
        if row["offset"] < end:
            j = k - 1  # the row it overlaps: the last one before it with frames (end > 0, so there is one)
            while frames[order[j]] == 0:
                j -= 1
            previous = self.index[order[j]]
            raise StoreError(f"{where}, inside the rows of {previous.get('id')} (rows {previous['offset']}..{end}): "
                             "two utterances would read the same frames")
        raise StoreError(f"{where}, leaving rows {end}..{row['offset']} to no utterance (a row points elsewhere than "
                         "where its frames were written)")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        row = self.index[i]
        return np.asarray(self._frames[row["offset"] : row["offset"] + row["frames"]])

    @property
    def lengths(self) -> list[int]:
        """Rows per utterance, built once (callers index it per utterance: a list built on every access made
        that O(n^2) in the split's utterances). Shared: do not modify it."""
        return self._lengths

    def all_frames(self) -> np.ndarray:
        return self._frames


class FeatureStore(_ArrayStore):
    """Read-only view of one split: ``store[i]`` -> (T, 80) float32 raw log-mel (memory-mapped)."""

    data_file, dtype, kind, stage = FEATURES_FILE, np.float32, "feature store", "features"

    def __init__(self, folder: str | Path):
        super().__init__(folder, N_MELS)


class CodeStore(_ArrayStore):
    """Read-only view of one split's DAC codes: ``store[i]`` -> (T, n_levels) int16 codes (memory-mapped).

    Args:
        n_levels: codec levels K the codes were written with (a mismatch is an error, not a misread).
        codebook_size: codes per level N the reader expects; given, every utterance read is checked to
            hold codes in [0, N) only (microseconds per utterance) and :meth:`check_codes` can scan them all.

    Codes outside [0, N) (another codec's store under an edited codec.json, a hand-edited or corrupt
    codes.i16) were an IndexError or a CUDA device assert in a Ray worker, naming nothing, or no error at
    all: Codec-LM's level embedding is one table of K * (N + 2) rows and its heads have N + 1 classes, so
    a code of N trained as <EOS>, and a larger one read another level's row before the loss refused it.
    """

    data_file, dtype, kind, stage = CODES_FILE, np.int16, "code store", "codes"

    def __init__(self, folder: str | Path, n_levels: int, codebook_size: int | None = None):
        super().__init__(folder, n_levels)
        self.n_levels = n_levels
        self.codebook_size = codebook_size

    def __getitem__(self, i: int) -> np.ndarray:
        codes = super().__getitem__(i)
        if self.codebook_size is not None:
            self._check_utterance(i, codes)
        return codes

    def _bound(self) -> int:
        """Codes are good iff their bits read as uint16 are below this: a negative int16 reads as 32768 or
        more, so one unsigned max finds values on both sides of [0, N) (about 13 GB/s on one core)."""
        return min(self.codebook_size, CODE_LIMIT)

    def _check_utterance(self, i: int, codes: np.ndarray) -> None:
        bad = codes.view(np.uint16) >= self._bound()
        if not bad.any():
            return
        frame, level = (int(x) for x in np.argwhere(bad)[0])
        raise StoreError(f"{self.folder / self.data_file}: utterance {self.index[i].get('id')} (entry {i + 1} of index.jsonl) "
                         f"holds code {int(codes[frame, level])} at level {level}, frame {frame}, outside the codebook's "
                         f"0..{self.codebook_size - 1} ({self.codebook_size} codes, as codec.json and the model say): "
                         "a corrupt code store or codes of another codec; rerun the codes stage")

    def check_codes(self) -> None:
        """Scan every utterance's codes for values outside [0, codebook_size), naming the first one.

        One pass of unsigned maxima over the data file in 32 MB pieces (a LibriSpeech-sized store, 4 GB,
        in about a third of a second from the page cache); the utterances are walked one by one only when
        a bad value is found, so bytes no index row reads do not fail the store.

        Raises:
            StoreError: file, utterance id, level, frame and value of the first code outside the codebook.
        """
        if self.codebook_size is None:
            raise ValueError("check_codes needs the codebook size: open the store with CodeStore(folder, K, N)")
        flat = self._frames.reshape(-1).view(np.uint16)
        piece = 1 << 24
        bound = self._bound()
        if all(int(flat[s : s + piece].max()) < bound for s in range(0, flat.size, piece)):
            return
        for i in range(len(self)):
            self._check_utterance(i, super().__getitem__(i))


class StatsError(ValueError):
    """A normalisation-statistics file the stages cannot use (named in the message)."""


def load_stats(path: str | Path) -> NormStats:
    """The features stage's per-channel mean and std, checked: a std of 0 (a hand-edited or truncated
    file) would otherwise surface stages later as NaN codebook vectors, naming nothing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no normalisation statistics (did the features stage run?)")
    try:
        stats = NormStats.from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise StatsError(f"{path}: unreadable normalisation statistics ({type(err).__name__}: {err}); "
                         "rerun the features stage") from err
    for name, values in (("mean", stats.mean), ("std", stats.std)):
        if values.shape != (N_MELS,):
            raise StatsError(f"{path}: '{name}' has shape {values.shape}, expected ({N_MELS},) mel channels")
        if not np.isfinite(values).all():
            raise StatsError(f"{path}: '{name}' holds NaN or infinite values (channel {int(np.argmin(np.isfinite(values)))})")
    if (stats.std <= 0).any():
        raise StatsError(f"{path}: 'std' is not positive at channel {int(np.argmax(stats.std <= 0))}")
    return stats


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0  # batches already served in this epoch (per worker)


class FrameBudgetSampler:
    """Length-bucketed batches whose padded size (longest x count) stays under a frame budget.

    Utterances are sorted by length and cut greedily into batches; the batch order is
    shuffled every epoch (seeded by ``seed`` and ``epoch``), and worker ``rank`` takes every
    ``world_size``-th batch. Every rank gets the same number of batches, as DDP needs.

    An utterance longer than the budget fits no batch: it is left out and its index listed in
    ``skipped``; more than ``max_skipped_fraction`` of them is an error (a budget set for other data).

    Args:
        lengths: frames per utterance (after grouping by the reduction factor).
        frames_per_batch: padded frame budget per batch.
        rank, world_size: this worker's shard.
        seed: shuffling seed.
        max_skipped_fraction: the share of utterances that may be too long for the budget.
    """

    def __init__(self, lengths: list[int], frames_per_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 max_skipped_fraction: float = 0.01):
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            # a rank past the world would take an empty or another worker's share of every epoch, silently
            raise ValueError(f"rank {rank!r} of world_size {world_size!r}: need whole numbers, 0 <= rank < world_size")
        if not lengths:  # else "only 0 batches ...: lower train.frames_per_batch", advice that cannot help
            raise ValueError("no utterances to batch: the split is empty (the features stage's summary.json says how many "
                             "the features stage kept and rejected)")
        self.skipped = [i for i, n in enumerate(lengths) if n > frames_per_batch]
        if self.skipped and len(self.skipped) == len(lengths):
            raise ValueError(f"all {len(lengths)} utterance(s) are longer than the frame budget ({frames_per_batch}): "
                             "raise train.frames_per_batch (tune.frames_per_batch in a sweep)")
        # a division, as the features stage's rule: 29 of 100 is not more than 0.29 (0.29 * 100 < 29 in floats)
        if self.skipped and len(self.skipped) / len(lengths) > max_skipped_fraction:
            raise ValueError(
                f"{len(self.skipped)} of {len(lengths)} utterance(s) are longer than the frame budget "
                f"({frames_per_batch}), more than train.max_skipped_fraction ({max_skipped_fraction:g}) of them: "
                "raise train.frames_per_batch or lower features.max_seconds"
            )
        fits = [i for i, n in enumerate(lengths) if n <= frames_per_batch]
        order = sorted(fits, key=lambda i: (lengths[i], i))
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
            left_out = f" ({len(self.skipped)} utterance(s) longer than it left out)" if self.skipped else ""
            raise ValueError(f"only {len(self.batches)} batches of {frames_per_batch} frames for {world_size} workers"
                             f"{left_out}: lower train.frames_per_batch (tune.frames_per_batch in a sweep) or the "
                             "number of workers")
        self.lengths = lengths
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_rank = len(self.batches) // world_size
        self.state = SamplerState()

    def padding_fraction(self) -> float:
        padded = sum(max(self.lengths[i] for i in b) * len(b) for b in self.batches)
        real = sum(self.lengths[i] for b in self.batches for i in b)
        return 1.0 - real / padded if padded else 0.0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        # (seed, epoch) mixed, not added: with seed + epoch, run seed 1's epoch e was run seed 0's epoch
        # e + 1, so runs with consecutive seeds saw the same batch orders one epoch apart
        mixed = np.random.SeedSequence([epoch, self.seed % 2**64]).generate_state(1, np.uint64)[0]
        g = torch.Generator().manual_seed(int(mixed))
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
        """Resume at a saved (epoch, position). A position past this shard's epoch (a state saved with more
        batches per worker: another budget or world size) would skip the rest of the epoch unseen; a
        negative one would repeat batches. Both are refused, naming the numbers."""
        epoch, position = int(d["epoch"]), int(d["position"])
        if epoch < 0 or not 0 <= position <= self.per_rank:
            raise ValueError(f"sampler state epoch {epoch}, position {position} does not fit this shard's "
                             f"{self.per_rank} batches per epoch (saved with another frame budget or world size?)")
        self.state = SamplerState(epoch, position)


def pad_texts(texts: list[list[int]]) -> dict[str, torch.Tensor]:
    """BPE id lists -> {"text": (B, L) zero-padded, "text_len": (B,)}: the text half of every batch."""
    text = torch.zeros(len(texts), max(len(t) for t in texts), dtype=torch.long)
    for b, t in enumerate(texts):
        text[b, : len(t)] = torch.tensor(t, dtype=torch.long)
    return {"text": text, "text_len": torch.tensor([len(t) for t in texts], dtype=torch.long)}


def enforce_rejected_fraction(stage: str, split: str, rejected: list[dict], total: int, limit: float,
                              listing: Path) -> float:
    """The fraction of a split's rows a data stage rejected; stops the stage, naming the first few, above ``limit``
    (``features.max_rejected_fraction``, shared by the features and codes stages)."""
    frac = len(rejected) / max(1, total)
    if frac > limit:
        reasons = "; ".join(f"{r['id']}: {r['reason']}" for r in rejected[:5])
        raise SystemExit(
            f"{stage}: split '{split}' rejected {len(rejected)}/{total} utterances ({frac:.1%} > "
            f"features.max_rejected_fraction={limit:.1%}); first: {reasons}; all listed in {listing}"
        )
    return frac


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
    rows = mel.numpy()  # the same memory; numpy copies read-only arrays (mapped, or Ray's) without a warning
    for b, m in enumerate(mels):
        rows[b, : m.shape[0]] = m
    mel = mel.reshape(B, T, N_MELS * reduction)  # (B, T', 80r)
    return {"mel": mel, "mel_len": torch.tensor(grouped, dtype=torch.long), **pad_texts(texts)}


def grouped_lengths(frames: list[int], reduction: int) -> list[int]:
    """Transformer steps per utterance of ``frames`` mel frames grouped ``reduction`` at a time: what
    the frame budget counts (:meth:`TrainingData.lengths`; the train driver's check before Ray starts)."""
    return [math.ceil(n / reduction) for n in frames]


def delayed_lengths(frames: list[int], n_levels: int) -> list[int]:
    """Transformer steps per utterance of ``frames`` code frames: T + the delay pattern's K - 1
    (:meth:`CodeTrainingData.lengths`)."""
    return [n + n_levels - 1 for n in frames]


class TrainingData:
    """A split's normalised frames and BPE ids, ready for :func:`collate`."""

    def __init__(self, store: FeatureStore, stats: NormStats, tokenizer, reduction: int):
        self.store, self.stats, self.reduction = store, stats, reduction
        self.texts = [tokenizer.encode(r["text"]) for r in store.index]
        self._lengths = grouped_lengths(store.lengths, reduction)

    def lengths(self) -> list[int]:
        """Transformer steps per utterance (built once: callers index it per utterance; do not modify it)."""
        return self._lengths

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        mels = [self.stats.normalise(self.store[i]) for i in indices]
        return collate(mels, [self.texts[i] for i in indices], self.reduction)


def collate_codes(codes: list[np.ndarray], texts: list[list[int]]) -> dict[str, torch.Tensor]:
    """Pad (T, K) integer code arrays and BPE id lists into a Codec-LM batch.

    Padding is code 0: the model masks steps past each utterance's length, so the value is never read.

    Returns: codes (B, T, K) int64, codes_len (B,), text (B, L), text_len (B,).
    """
    B, K = len(codes), codes[0].shape[1]
    T = max(c.shape[0] for c in codes)
    out = torch.zeros(B, T, K, dtype=torch.long)
    for b, c in enumerate(codes):
        out[b, : c.shape[0]] = torch.from_numpy(np.asarray(c, dtype=np.int64))
    return {"codes": out, "codes_len": torch.tensor([c.shape[0] for c in codes], dtype=torch.long), **pad_texts(texts)}


class CodeTrainingData:
    """A split's DAC codes and BPE ids, ready for :func:`collate_codes` (the Codec-LM counterpart of TrainingData)."""

    def __init__(self, store: CodeStore, tokenizer):
        self.store = store
        self.texts = [tokenizer.encode(r["text"]) for r in store.index]
        self._lengths = delayed_lengths(store.lengths, store.n_levels)

    def lengths(self) -> list[int]:
        """Transformer steps per utterance for the frame budget (:func:`delayed_lengths`; built once, do not
        modify it)."""
        return self._lengths

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate_codes([self.store[i] for i in indices], [self.texts[i] for i in indices])
