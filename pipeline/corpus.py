"""DVC stage ``corpus``: write ``<out>/<split>/manifest.jsonl`` (+ audio) and ``<out>/summary.json``.

``corpus.name: mini`` synthesises the embedded multi-speaker corpus (offline, seeded);
``corpus.name: librispeech`` prepares LibriSpeech from ``corpus.librispeech_root``.

Run::

    python -m pipeline.corpus --params params.yaml --out data/corpus
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from meld.config import CorpusConfig, FeaturesConfig, load_section, read_params, run_stage
from meld.corpus import read_manifest
from meld.staging import staged_folder


def summarise(out_dir: Path) -> dict:
    """Utterances, hours and per-speaker counts of every split found under ``out_dir``."""
    splits = {}
    for manifest in sorted(out_dir.glob("*/manifest.jsonl")):
        rows = read_manifest(manifest)
        speakers = Counter(str(r["speaker"]) for r in rows)
        splits[manifest.parent.name] = {
            "utterances": len(rows),
            "hours": round(sum(float(r["duration"]) for r in rows) / 3600, 4),
            "num_speakers": len(speakers),
            "speakers": dict(sorted(speakers.items())),
        }
    return {
        "splits": splits,
        "total_utterances": sum(s["utterances"] for s in splits.values()),
        "total_hours": round(sum(s["hours"] for s in splits.values()), 4),
    }


def build_corpus(cfg: CorpusConfig, out_dir: Path, max_rejected_fraction: float = 0.05) -> dict:
    """Build the corpus ``cfg`` names into ``out_dir``; returns the summary (also written as summary.json).

    ``max_rejected_fraction`` (``features.max_rejected_fraction``, the limit the features and codes
    stages apply too) bounds the LibriSpeech utterances a split may lose to unreadable audio or a
    missing transcript; the mini corpus rejects nothing.
    """
    if cfg.name == "mini":
        from meld.corpus.mini import build_mini_corpus

        build_mini_corpus(
            out_dir,
            seed=cfg.seed,
            train_voices=cfg.train_voices,
            held_out_voices=cfg.held_out_voices,
            utterances=cfg.utterances_per_voice,
            min_words=cfg.min_words,
            max_words=cfg.max_words,
            num_workers=cfg.num_workers,
        )
    else:  # librispeech; imported lazily so the mini path needs none of its dependencies
        from meld.corpus.librispeech import prepare_librispeech

        prepare_librispeech(
            root=Path(cfg.librispeech_root),
            out_dir=out_dir,
            subsets=list(cfg.librispeech_subsets),
            download=cfg.librispeech_download,
            max_rejected_fraction=max_rejected_fraction,
        )
    summary = {"corpus": cfg.name, **summarise(out_dir)}
    if not summary["splits"]:
        raise RuntimeError(f"{out_dir}: the corpus stage wrote no manifests")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params.yaml path")
    parser.add_argument("--out", type=Path, required=True, help="corpus folder (data/corpus)")
    args = parser.parse_args(argv)

    cfg = load_section(args.params, "corpus", CorpusConfig)
    limit = FeaturesConfig.from_dict(read_params(args.params).get("features", {}), "features").max_rejected_fraction
    inputs = [Path(cfg.librispeech_root)] if cfg.name == "librispeech" else []
    # the whole corpus of one run, or the old one untouched: a killed or failed run used to leave a
    # new train split beside an older run's dev and test, which the features stage then read
    with staged_folder(args.out, holds="*/manifest.jsonl", inputs=inputs) as work:
        summary = build_corpus(cfg, work, limit)

    print(f"corpus {cfg.name} -> {args.out}")
    for split, s in summary["splits"].items():
        print(
            f"  {split:12s} {s['utterances']:7d} utts  {s['num_speakers']:4d} speakers  {s['hours']:8.3f} h"
        )
    print(f"  {'total':12s} {summary['total_utterances']:7d} utts  {'':13s}  {summary['total_hours']:8.3f} h")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("corpus", main))
