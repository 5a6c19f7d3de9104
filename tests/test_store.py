"""Feature store round trip, the frame-budget sampler (budget, sharding, resume) and collate."""

from __future__ import annotations

import itertools
import json
import math
import re
from itertools import islice

import numpy as np
import pytest
import torch

from meld.features import N_MELS
from meld.store import FeatureStore, FrameBudgetSampler, collate, write_store


def _items(n: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        frames = int(rng.integers(1, 60))
        meta = {
            "id": f"utt-{i}",
            "speaker": f"spk-{i % 3}",
            "text": f"sentence number {i}",
            "duration": frames / 62.5,
        }
        out.append((meta, rng.standard_normal((frames, N_MELS)).astype(np.float32)))
    return out


def test_write_store_round_trip(tmp_path):
    items = _items()
    rejected = [{"id": "bad-1", "reason": "unreadable audio"}]
    summary = write_store(tmp_path / "split", iter(items), rejected)
    assert summary == {"kept": len(items), "rejected": 1, "frames": sum(m.shape[0] for _, m in items)}
    assert not list((tmp_path / "split").glob("*.tmp"))

    store = FeatureStore(tmp_path / "split")
    assert len(store) == len(items)
    assert store.lengths == [m.shape[0] for _, m in items]
    for i, (meta, mel) in enumerate(items):
        np.testing.assert_array_equal(store[i], mel)
        assert store[i].dtype == np.float32
        row = store.index[i]
        assert {k: row[k] for k in meta} == meta
    np.testing.assert_array_equal(store.all_frames(), np.concatenate([m for _, m in items]))
    lines = (tmp_path / "split" / "rejected.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rejected


def test_empty_store_and_missing_store(tmp_path):
    write_store(tmp_path / "empty", [], [])
    store = FeatureStore(tmp_path / "empty")
    assert len(store) == 0 and store.lengths == []
    with pytest.raises(FileNotFoundError, match="not a feature store"):
        FeatureStore(tmp_path / "nowhere")


def _lengths(n: int = 200, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(1, 80, n).tolist()


def test_batches_fit_the_budget_and_cover_every_utterance_once():
    lengths, budget = _lengths(), 300
    sampler = FrameBudgetSampler(lengths, budget, seed=3)
    served = sorted(i for b in sampler.batches for i in b)
    assert served == list(range(len(lengths)))
    for epoch in range(3):
        for batch in sampler.epoch_batches(epoch):
            assert batch and max(lengths[i] for i in batch) * len(batch) <= budget
    for batch in islice(iter(sampler), 2 * len(sampler.batches) + 5):  # across epoch boundaries
        assert max(lengths[i] for i in batch) * len(batch) <= budget
    assert 0.0 <= sampler.padding_fraction() < 0.5
    assert sampler.epoch_batches(0) != sampler.epoch_batches(1)  # reshuffled every epoch


def test_ranks_get_disjoint_shards_of_equal_size():
    lengths, budget = _lengths(n=101, seed=1), 250
    shards = [FrameBudgetSampler(lengths, budget, rank=r, world_size=2, seed=5) for r in range(2)]
    for epoch in range(3):
        mine = [s.epoch_batches(epoch) for s in shards]
        assert len(mine[0]) == len(mine[1]) == shards[0].per_rank > 0
        sets = [{i for b in batches for i in b} for batches in mine]
        assert not sets[0] & sets[1]
    # the iterators agree on the count too, so DDP never waits on a missing batch
    counts = []
    for s in shards:
        n = 0
        for _ in iter(s):
            n += 1
            if s.state.epoch > 0:
                break
        counts.append(n)
    assert counts[0] == counts[1]


def test_state_dict_resumes_with_the_same_batches():
    lengths, budget = _lengths(n=60, seed=2), 200
    a = FrameBudgetSampler(lengths, budget, seed=11)
    it = iter(a)
    per_epoch = len(a.epoch_batches(0))
    consumed = list(islice(it, per_epoch + 3))  # into the second epoch
    assert len(consumed) == per_epoch + 3
    state = a.state_dict()
    expected = list(islice(it, per_epoch))  # the rest of epoch 1 and some of epoch 2

    b = FrameBudgetSampler(lengths, budget, seed=11)
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip (checkpoints)
    assert b.state_dict() == state
    assert list(islice(iter(b), per_epoch)) == expected


def test_a_shard_or_saved_position_outside_the_epoch_is_refused():
    """rank >= world_size took an empty share (perm[rank::world] past the end) and a saved position past
    the shard's epoch skipped the rest of it: both silently, as a shorter run. An end-of-epoch position
    (what a checkpoint at an epoch's last batch holds) is fine and moves on to the next epoch."""
    lengths, budget = _lengths(n=60, seed=2), 200
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match=f"rank {rank} of world_size {world}: need whole numbers"):
            FrameBudgetSampler(lengths, budget, rank=rank, world_size=world)
    sampler = FrameBudgetSampler(lengths, budget, rank=1, world_size=2, seed=4)
    for epoch, position in ((0, sampler.per_rank + 1), (0, -1), (-1, 0)):
        with pytest.raises(ValueError, match=f"epoch {epoch}, position {position} does not fit this shard's "
                                             f"{sampler.per_rank} batches per epoch"):
            sampler.load_state_dict({"epoch": epoch, "position": position})
    sampler.load_state_dict({"epoch": 0, "position": sampler.per_rank})
    assert next(iter(sampler)) == sampler.epoch_batches(1)[0] and sampler.state_dict() == {"epoch": 1, "position": 1}


def test_runs_with_neighbouring_seeds_do_not_share_batch_orders_an_epoch_apart():
    """Seeding each epoch with seed + epoch gave run seed=1 at epoch e the very order of run seed=0 at
    epoch e + 1: hand-made multi-seed runs were not independent in their data order."""
    lengths, budget = _lengths(n=200, seed=6), 120
    runs = {seed: FrameBudgetSampler(lengths, budget, seed=seed) for seed in (0, 1, 2, -1)}
    assert len(runs[0].batches) >= 20  # orders of this many batches agree by chance with odds of 1 in 20!
    orders = {(seed, epoch): runs[seed].epoch_batches(epoch) for seed in runs for epoch in range(4)}
    for (a, ea), (b, eb) in itertools.combinations(orders, 2):
        assert orders[a, ea] != orders[b, eb], f"seed {a} epoch {ea} and seed {b} epoch {eb} share one order"
    # the order is still a function of (seed, epoch) alone
    assert FrameBudgetSampler(lengths, budget, seed=1).epoch_batches(3) == orders[1, 3]


def test_utterances_longer_than_the_budget_are_left_out_and_listed_up_to_a_share():
    lengths, budget = _lengths(n=200, seed=4), 300
    lengths[7], lengths[150] = 301, 900  # two of 200: 1 %
    sampler = FrameBudgetSampler(lengths, budget, seed=3, max_skipped_fraction=0.01)
    assert sampler.skipped == [7, 150]
    served = sorted(i for b in sampler.batches for i in b)
    assert served == [i for i in range(200) if i not in (7, 150)]  # every other one, once
    assert all(max(lengths[i] for i in b) * len(b) <= budget for b in sampler.batches)
    # padding is counted over what is trained on: the left-out frames are neither real nor padded
    padded = sum(max(lengths[i] for i in b) * len(b) for b in sampler.batches)
    assert sampler.padding_fraction() == pytest.approx(1 - sum(lengths[i] for i in served) / padded)
    with pytest.raises(ValueError, match=r"3 of 200 utterance\(s\) are longer than the frame budget \(300\), more "
                                         r"than train.max_skipped_fraction \(0.01\)"):
        FrameBudgetSampler([*lengths[:-1], 301], budget, max_skipped_fraction=0.01)
    with pytest.raises(ValueError, match=r"1 of 4 utterance\(s\) are longer than the frame budget \(100\)"):
        FrameBudgetSampler([10, 20, 101, 5], 100, max_skipped_fraction=0.0)
    # the share is compared as a division: 29 of 100 is within 0.29 (0.29 * 100 is 28.999... in floats)
    assert len(FrameBudgetSampler([10] * 71 + [500] * 29, 400, max_skipped_fraction=0.29).skipped) == 29
    # a budget that leaves everything out says to raise it, not (as the too-few-batches check would) to lower it
    with pytest.raises(ValueError, match=r"all 2 utterance\(s\) are longer than the frame budget \(400\): raise"):
        FrameBudgetSampler([500, 600], 400, max_skipped_fraction=1.0)
    with pytest.raises(ValueError, match=r"only 1 batches of 100 frames for 2 workers \(1 utterance\(s\) longer"):
        FrameBudgetSampler([40, 50, 101], 100, world_size=2, max_skipped_fraction=0.5)


def test_collate_groups_frames_by_the_reduction_factor():
    rng = np.random.default_rng(0)
    mels = [rng.standard_normal((n, N_MELS)).astype(np.float32) for n in (5, 8, 3)]
    texts = [[3, 1, 4], [1], [5, 9, 2, 6]]
    batch = collate(mels, texts, reduction=2)
    assert batch["mel"].shape == (3, 4, 2 * N_MELS)  # ceil(8 / 2) groups of 160
    assert batch["mel_len"].tolist() == [math.ceil(n / 2) for n in (5, 8, 3)]
    assert batch["text"].shape == (3, 4) and batch["text"].dtype == torch.long
    assert batch["text_len"].tolist() == [3, 1, 4]
    for b, (m, t) in enumerate(zip(mels, texts)):
        frames = batch["mel"][b].reshape(-1, N_MELS)  # (8, 80): ungrouped
        np.testing.assert_array_equal(frames[: m.shape[0]].numpy(), m)
        assert frames[m.shape[0] :].abs().sum() == 0  # zero padding, inside the last group too
        assert batch["text"][b, : len(t)].tolist() == t
        assert batch["text"][b, len(t) :].abs().sum() == 0


def test_too_few_batches_for_the_workers_names_the_param_to_change():
    # 3 utterances that fit one 100-frame batch, for 2 workers
    with pytest.raises(ValueError, match=r"only 1 batches of 100 frames for 2 workers: lower train.frames_per_batch"):
        FrameBudgetSampler([30, 30, 30], frames_per_batch=100, rank=0, world_size=2)


def test_a_staged_folder_replaces_the_output_whole_or_leaves_it_as_it_was(tmp_path):
    from meld.staging import staged_folder

    out = tmp_path / "out"
    (out / "stale").mkdir(parents=True)
    (out / "summary.json").write_text("old")
    with pytest.raises(RuntimeError, match="stopped"), staged_folder(out) as work:
        (work / "new.txt").write_text("half")
        raise RuntimeError("stopped")
    assert sorted(p.name for p in out.iterdir()) == ["stale", "summary.json"]
    assert (tmp_path / "out.partial" / "new.txt").read_text() == "half"  # kept to read
    with staged_folder(out) as work:
        assert list(work.iterdir()) == []  # the earlier run's partial output is not carried over
        (work / "summary.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"] and (out / "summary.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with staged_folder(tmp_path / "fresh" / "deeper") as work:  # no previous output, no parent yet
        (work / "x").write_text("x")
    assert (tmp_path / "fresh" / "deeper" / "x").read_text() == "x"


def test_a_run_killed_in_the_middle_of_the_swap_loses_no_output(tmp_path):
    from meld.staging import staged_folder

    out = tmp_path / "out"
    (tmp_path / "out.previous").mkdir()  # the old output, renamed away just before the kill
    (tmp_path / "out.previous" / "summary.json").write_text("old")
    (tmp_path / "out.partial").mkdir()  # the new one, never swapped in
    with pytest.raises(RuntimeError), staged_folder(out):
        raise RuntimeError("this run fails too")
    assert (out / "summary.json").read_text() == "old"  # put back before anything was cleared
    assert not (tmp_path / "out.previous").exists()


def test_a_symlinked_output_is_replaced_where_it_lives(tmp_path):
    from meld.staging import staged_folder

    disk = tmp_path / "big_disk"
    (disk / "features").mkdir(parents=True)
    (disk / "features" / "summary.json").write_text("old")
    (tmp_path / "data").mkdir()
    link = tmp_path / "data" / "features"
    link.symlink_to(disk / "features")
    for run in ("first", "second"):
        with staged_folder(link) as work:
            (work / "summary.json").write_text(run)
        assert link.is_symlink() and (link / "summary.json").read_text() == run
        assert sorted(p.name for p in disk.iterdir()) == ["features"]
        assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["features"]


def test_a_folder_that_is_not_a_stages_output_is_not_replaced(tmp_path):
    from meld.staging import staged_folder

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="no summary.json"), staged_folder(tmp_path):
        pass
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_another_stages_output_and_the_stages_own_inputs_are_not_replaced(tmp_path):
    """Every data stage writes a summary.json, so a codebook run given the feature store as --out
    used to replace it: the stage's own files (``holds``) and its inputs tell them apart."""
    from meld.staging import staged_folder

    features = tmp_path / "features"
    (features / "train").mkdir(parents=True)
    for name in ("summary.json", "stats.json", "train/index.jsonl"):
        (features / name).write_text(name)
    before = sorted(p.relative_to(features) for p in features.rglob("*"))
    with pytest.raises(SystemExit, match="output of another stage .* no r\\*.npy"), \
            staged_folder(features, holds="r*.npy"):
        pass
    for out in (features, features / "codebook", tmp_path):  # the input, inside it, around it
        with pytest.raises(SystemExit, match="where the stage reads"), \
                staged_folder(out, holds="r*.npy", inputs=[features]):
            pass
    assert sorted(p.relative_to(features) for p in features.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]  # no partial folder either
    with staged_folder(features, holds="stats.json", inputs=[tmp_path / "corpus"]) as work:  # its own output
        (work / "summary.json").write_text("new")
    assert (features / "summary.json").read_text() == "new"


_GOOD_STATS = {"mean": [0.0] * N_MELS, "std": [1.0] * N_MELS}


@pytest.mark.parametrize("content, says", [
    ("{not json", "unreadable normalisation statistics"),
    (json.dumps({"mean": _GOOD_STATS["mean"]}), "unreadable normalisation statistics (KeyError"),
    (json.dumps({**_GOOD_STATS, "std": [1.0] * 40}), "'std' has shape (40,), expected (80,)"),
    (json.dumps({**_GOOD_STATS, "mean": [0.0] * 5 + [float("nan")] + [0.0] * 74}), "'mean' holds NaN or infinite values (channel 5)"),
    (json.dumps({**_GOOD_STATS, "std": [1.0] * 7 + [0.0] + [1.0] * 72}), "'std' is not positive at channel 7"),
])
def test_unusable_normalisation_statistics_are_refused_naming_the_file(tmp_path, content, says):
    """A std of 0 in a hand-edited stats.json surfaced stages later as 'codebook vectors hold NaN or
    inf', naming no file; every stage loading it now stops at the file, saying what is wrong."""
    from meld.store import StatsError, load_stats

    path = tmp_path / "stats.json"
    path.write_text(content)
    with pytest.raises(StatsError, match=re.escape(f"{path}: ") + ".*" + re.escape(says)):
        load_stats(path)
    path.write_text(json.dumps(_GOOD_STATS))
    assert load_stats(path).std.shape == (N_MELS,)


def test_a_stage_given_unusable_statistics_ends_in_one_line(tmp_path, capsys):
    from meld.config import run_stage
    from meld.store import load_stats

    path = tmp_path / "stats.json"
    path.write_text(json.dumps({**_GOOD_STATS, "std": [0.0] * N_MELS}))
    assert run_stage("codebook", lambda: load_stats(path) and 0) == 1
    assert capsys.readouterr().err.strip() == f"codebook: {path}: 'std' is not positive at channel 0"


def test_an_empty_split_is_named_as_empty_not_as_too_small_a_budget():
    with pytest.raises(ValueError, match="no utterances to batch: the split is empty"):
        FrameBudgetSampler([], frames_per_batch=100)


@pytest.mark.parametrize("edit, says", [
    (lambda lines: lines[:2] + ['{"id": "utt-2", "offset": 5'] + lines[3:], r":3: not a JSON row"),
    (lambda lines: lines[:1] + [json.dumps({"id": "utt-1", "offset": 3})] + lines[2:],
     r":2: a row needs whole 'offset' and 'frames' counts >= 0"),
    (lambda lines: lines[:1] + [json.dumps({"id": "utt-1", "offset": 3, "frames": -1})] + lines[2:],
     r":2: a row needs whole 'offset' and 'frames' counts >= 0"),
    (lambda lines: lines[:-1] + [json.dumps({**json.loads(lines[-1]), "offset": 10_000})],
     r": row 7 \(utt-6\) ends at row 10\d\d\d of a \d+-row frames.f32"),
    # what every training worker reads of a row (its transcript; its id in messages): a KeyError naming nothing
    (lambda lines: lines[:3] + [json.dumps({k: v for k, v in json.loads(lines[3]).items() if k != "text"})] + lines[4:],
     r":4: a row needs an 'id' and a 'text' string"),
    (lambda lines: lines[:3] + [json.dumps({**json.loads(lines[3]), "id": 17})] + lines[4:],
     r":4: a row needs an 'id' and a 'text' string"),
])
def test_an_index_that_cannot_be_read_as_written_is_refused_naming_the_file_and_line(tmp_path, edit, says):
    """A hand-edited or half-copied index.jsonl was a JSONDecodeError or KeyError naming no file (in
    every Ray worker of a training run), or, with a row past the data's end, silently short arrays."""
    from meld.store import StoreError

    write_store(tmp_path / "split", iter(_items()), [])
    index = tmp_path / "split" / "index.jsonl"
    good = index.read_text()
    index.write_text("\n".join(edit(good.splitlines())) + "\n")
    with pytest.raises(StoreError, match=re.escape(str(index)) + says):
        FeatureStore(tmp_path / "split")
    index.write_text(good)
    assert len(FeatureStore(tmp_path / "split")) == 7


def test_a_truncated_data_file_ends_a_stage_in_one_line(tmp_path, capsys):
    from meld.config import run_stage

    write_store(tmp_path / "split", iter(_items()), [])
    data = tmp_path / "split" / "frames.f32"
    data.write_bytes(data.read_bytes()[:-4])
    assert run_stage("train", lambda: FeatureStore(tmp_path / "split") and 0) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"train: {data}: expected ") and "truncated, or written with another width" in err
    assert "\n" not in err


def _retarget(lines: list[str], n: int, offset: int) -> list[str]:
    """index.jsonl's lines with row ``n`` (0-based) pointed at ``offset``, its frame count kept."""
    return [json.dumps({**json.loads(line), "offset": offset}) if k == n else line for k, line in enumerate(lines)]


@pytest.mark.parametrize("edit, says", [
    # the second row pointed at the first one's frames: as many rows in all, so the size check passed
    (lambda lines: _retarget(lines, 1, 0), r": row 2 \(utt-1\) starts at row 0 of frames.f32, inside the rows of utt-0"),
    # the second row pointed one row further: it reads one row of the third utterance, and one row is read by none
    (lambda lines: _retarget(lines, 1, json.loads(lines[1])["offset"] + 1),
     r": row 2 \(utt-1\) starts at row \d+ of frames.f32, leaving rows \d+\.\.\d+ to no utterance"),
])
def test_index_rows_that_share_or_skip_rows_of_the_data_are_refused(tmp_path, edit, says):
    """Rows must tile the data file: a hand-edited or merged index.jsonl whose rows overlapped read one
    utterance's frames as (part of) another's, paired with the wrong text, without a word."""
    from meld.store import StoreError

    write_store(tmp_path / "split", iter(_items()), [])
    index = tmp_path / "split" / "index.jsonl"
    good = index.read_text().splitlines()
    index.write_text("\n".join(edit(good)) + "\n")
    with pytest.raises(StoreError, match=re.escape(str(index)) + says):
        FeatureStore(tmp_path / "split")
    # rows in another order still tile the file: each utterance reads its own frames
    index.write_text("\n".join(reversed(good)) + "\n")
    store = FeatureStore(tmp_path / "split")
    by_id = {meta["id"]: mel for meta, mel in _items()}
    assert len(store) == len(by_id)
    for i, row in enumerate(store.index):
        np.testing.assert_array_equal(store[i], by_id[row["id"]])


def test_an_index_cut_short_is_refused_naming_the_index(tmp_path):
    """An index.jsonl cut off (empty, or its last lines lost) next to a whole data file read as an empty
    split ("no utterances to batch") or as a truncated data file; it is the index that lacks rows."""
    from meld.store import StoreError

    write_store(tmp_path / "split", iter(_items()), [])
    index = tmp_path / "split" / "index.jsonl"
    lines = index.read_text().splitlines()
    for kept in (lines[:0], lines[:-1]):
        index.write_text("".join(line + "\n" for line in kept))
        with pytest.raises(StoreError, match=re.escape(str(tmp_path / "split" / "frames.f32")) +
                           r": \d+ bytes, more than the \d+ .*index.jsonl's \d+ row\(s\) account for: a cut off index.jsonl"):
            FeatureStore(tmp_path / "split")
