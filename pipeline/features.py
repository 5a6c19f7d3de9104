"""features stage: log-mel for every split into a feature store; normalisation stats from train only.

    python -m pipeline.features --params params.yaml --corpus data/corpus --out data/features

Bad inputs (unreadable audio, empty transcripts, NaN/inf, clips too long or too short) are
skipped and listed with their reason in ``<out>/<split>/rejected.jsonl``; the stage fails
only when a split rejects more than ``features.max_rejected_fraction``.
"""

from __future__ import annotations

import argparse
import json
import sys
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from meld.config import FeaturesConfig, load_section, run_stage
from meld.corpus import check_manifest_durations, load_utterance, read_manifest
from meld.features import FRAME_RATE, RunningStats, log_mel
from meld.progress import progress
from meld.staging import staged_folder
from meld.store import enforce_rejected_fraction, write_store


def extract_one(job: tuple[dict, float, float]) -> tuple[dict, np.ndarray | None, str | None]:
    """(manifest row, min s, max s) -> (meta, mel or None, reason or None). Runs in a worker process."""
    row, min_s, max_s = job
    meta, wav, reason = load_utterance(row, min_s, max_s)
    if reason:
        return meta, None, reason
    try:  # decoded audio is finite; samples so large that the spectrum overflows float32 are refused
        mel = log_mel(wav, 16_000)
    except ValueError as err:
        return meta, None, str(err)
    return meta, mel, None


def one_thread() -> None:
    """A worker process's initializer: processes are the parallelism, one per core, so each computes its
    FFTs in one thread (torch's default, a thread per core in every process, oversubscribes the cores
    num_workers times over)."""
    import torch

    torch.set_num_threads(1)


def process_split(rows: list[dict], out: Path, cfg: FeaturesConfig, split: str, stats: RunningStats | None) -> dict:
    rejected: list[dict] = []
    jobs = [(r, cfg.min_seconds, cfg.max_seconds) for r in rows]

    def items():
        with get_context("spawn").Pool(cfg.num_workers, initializer=one_thread) if cfg.num_workers > 1 else _Serial() as pool:
            for meta, mel, reason in progress(pool.imap(extract_one, jobs, chunksize=8), total=len(jobs),
                                          desc=f"features {split}", unit="utt"):
                if reason:
                    rejected.append({"id": meta["id"], "split": split, "reason": reason})
                    continue
                if stats is not None:
                    stats.update(mel)
                yield meta, mel

    summary = write_store(out / split, items(), rejected)
    summary["hours"] = summary["frames"] / FRAME_RATE / 3600
    summary["rejected_fraction"] = enforce_rejected_fraction("features", split, rejected, len(rows),
                                                             cfg.max_rejected_fraction, out / split / "rejected.jsonl")
    return summary


class _Serial:
    """Stands in for a process pool when num_workers == 1."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, jobs, chunksize=1):
        return map(fn, jobs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--corpus", default="data/corpus")
    p.add_argument("--out", default="data/features")
    args = p.parse_args(argv)
    cfg = load_section(args.params, "features", FeaturesConfig)
    corpus, out = Path(args.corpus), Path(args.out)
    splits = sorted(d.name for d in corpus.iterdir() if (d / "manifest.jsonl").is_file()) if corpus.is_dir() else []
    if "train" not in splits:  # the normalisation statistics come from the train split alone
        found = f"it has {splits}" if splits else "it has no split at all (did the corpus stage run?)"
        raise SystemExit(f"features: {corpus} has no train/manifest.jsonl, which the normalisation statistics "
                         f"come from; {found}: give the corpus a train split (corpus.utterances_per_voice.train, "
                         "or a train-* LibriSpeech subset)")
    manifests = {split: read_manifest(corpus / split / "manifest.jsonl") for split in splits}
    for split, rows in manifests.items():  # before any audio is decoded: the train split alone can take hours
        check_manifest_durations("features", split, rows, cfg.min_seconds, cfg.max_seconds, cfg.max_rejected_fraction)
    summaries = {}
    stats = RunningStats()
    # every split and the statistics of one run, or the old output untouched
    with staged_folder(out, holds="stats.json", inputs=[corpus]) as work:
        for split in ["train"] + [s for s in splits if s != "train"]:
            summaries[split] = process_split(manifests[split], work, cfg, split, stats if split == "train" else None)
            s = summaries[split]
            print(f"{split}: kept {s['kept']}, rejected {s['rejected']}, {s['hours'] * 60:.1f} min of audio")
            if split == "train" and stats.count < 2:  # before the other splits' work, which would be lost anyway
                listing = f", rejected ones listed in {work / split / 'rejected.jsonl'}" if s["rejected"] else ""
                raise SystemExit(f"features: the train split of {corpus} kept {s['kept']} of {len(manifests[split])} "
                                 f"utterances ({stats.count} frames); the normalisation statistics need at least "
                                 f"two frames{listing}")
        norm = stats.finalise()
        (work / "stats.json").write_text(json.dumps(norm.to_dict()))
        (work / "summary.json").write_text(json.dumps(summaries, indent=2))
    for split, s in summaries.items():
        if s["rejected"]:
            print(f"{split}: the rejected utterances and why: {out / split / 'rejected.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("features", main))
