"""codes stage: every split of the corpus encoded with DAC into a code store (Codec-LM's training data).

    python -m pipeline.codes --params params.yaml --system codec_lm --corpus data/corpus --out data/codes/codec_lm

Writes ``<out>/<split>/`` (``codes.i16``: (T, K) int16 codes at 50 Hz, ``index.jsonl``, ``rejected.jsonl``),
``<out>/codec.json`` (which codec made the codes; ``"random": true`` when ``<system>.codec_weights`` is
null and a seeded random DAC was used, whose codes carry no speech) and ``<out>/summary.json``.

The utterances kept are those the features stage keeps (the same checks and ``features.min_seconds`` /
``max_seconds``); unreadable audio and empty transcripts are skipped and listed with their reason in
``rejected.jsonl``, and a split that rejects more than ``features.max_rejected_fraction`` fails the stage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from multiprocessing import get_context
from pathlib import Path

from meld.codes import CODEC_FILE, build_codec, codec_from_description, encode_waveform
from meld.config import CodecLMConfig, FeaturesConfig, ModelConfig, read_params, run_stage
from meld.corpus import check_manifest_durations, load_utterance, read_manifest
from meld.models.codec_lm import codec_lm_kwargs
from meld.progress import progress
from meld.staging import staged_folder
from meld.store import enforce_rejected_fraction, write_code_store

_WORKER_CODEC = None  # each encoding process's own codec (not picklable cheaply, not thread-safe)


def _init_worker(desc: dict) -> None:
    global _WORKER_CODEC
    import torch

    # the narrow codec's convolutions are too small to gain from threads: processes are the parallelism
    torch.set_num_threads(1)
    codec = codec_from_description(desc)  # checked against the description's hash
    # the full-size DAC encodes at about real time on two CPU cores; a GPU, when there is one, is far faster.
    # Full float32 there: cuDNN's default TF32 convolutions could flip near-tie codes, so the codes
    # would depend on the machine that made them
    if torch.cuda.is_available():
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    _WORKER_CODEC = codec.to("cuda") if torch.cuda.is_available() else codec


def encode_one(job: tuple[dict, float, float]):
    """(manifest row, min s, max s) -> (meta, (T, K) int16 codes or None, reason or None)."""
    row, min_s, max_s = job
    meta, wav, reason = load_utterance(row, min_s, max_s)
    if reason:
        return meta, None, reason
    return meta, encode_waveform(_WORKER_CODEC, wav), None


class _InProcess:
    """Stands in for the process pool when encode_workers == 1 (or there is one utterance)."""

    def __init__(self, desc: dict):
        _init_worker(desc)

    @staticmethod
    def imap(fn, jobs, chunksize=1):
        return map(fn, jobs)


def encode_split(rows: list[dict], out: Path, desc: dict, features: FeaturesConfig, pool, split: str) -> dict:
    """Encode one split into ``out/<split>`` with ``pool``'s processes; returns its summary.

    Exits with a message when the split rejects more than ``features.max_rejected_fraction``.
    """
    rejected: list[dict] = []
    jobs = [(r, features.min_seconds, features.max_seconds) for r in rows]

    def kept():
        results = pool.imap(encode_one, jobs, chunksize=4)
        for meta, codes, reason in progress(results, total=len(jobs), desc=f"codes {split}", unit="utt"):
            if reason:
                rejected.append({"id": meta["id"], "split": split, "reason": reason})
                continue
            yield meta, codes

    summary = write_code_store(out / split, kept(), rejected)
    summary["minutes"] = summary["frames"] / desc["frame_rate"] / 60
    summary["rejected_fraction"] = enforce_rejected_fraction("codes", split, rejected, len(rows),
                                                             features.max_rejected_fraction, out / split / "rejected.jsonl")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--system", default="codec_lm", help="params section naming the codec (codec_weights, ...)")
    p.add_argument("--corpus", default="data/corpus")
    p.add_argument("--out", default="data/codes/codec_lm", help="this system's code store (data/codes/<system> in the DAG)")
    args = p.parse_args(argv)
    params = read_params(args.params)
    for section in (args.system, "features"):
        if section not in params:
            raise SystemExit(f"codes: {args.params} has no '{section}' section")
    cfg = CodecLMConfig.from_dict(params[args.system], args.system)
    features = FeaturesConfig.from_dict(params["features"], "features")
    corpus, out = Path(args.corpus), Path(args.out)
    splits = sorted(d.name for d in corpus.iterdir() if (d / "manifest.jsonl").is_file()) if corpus.is_dir() else []
    if "train" not in splits:
        raise SystemExit(f"codes: {corpus} has no train/manifest.jsonl (did the corpus stage run?)")
    # the model's own builder resolves n_levels / codebook_size (and their DAC defaults), so the codes
    # always have the shape the Codec-LM will be built with
    shape = codec_lm_kwargs(ModelConfig(), n_text=1, **cfg.args)
    try:
        _, desc = build_codec(cfg.codec_weights, n_levels=shape["n_levels"], codebook_size=shape["codebook_size"],
                              random_width=cfg.random_codec_width, seed=cfg.random_codec_seed)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"codes: {args.system}.codec_weights: {err}") from err
    if desc["random"]:
        print(f"codes: {args.system}.codec_weights is null: encoding with a random DAC (width "
              f"{cfg.random_codec_width}, seed {cfg.random_codec_seed}); its codes carry no speech and "
              "evaluation will report the codec's weights as unavailable")
    summaries = {}
    manifests = {split: read_manifest(corpus / split / "manifest.jsonl") for split in splits}
    for split, rows in manifests.items():  # before any audio is encoded (about real time for the full DAC)
        check_manifest_durations("codes", split, rows, features.min_seconds, features.max_seconds,
                                 features.max_rejected_fraction)
    workers = min(cfg.encode_workers, max(len(rows) for rows in manifests.values()))
    # one pool for every split: a spawned worker's start (torch import, codec build) costs seconds
    with staged_folder(out, holds=CODEC_FILE, inputs=[corpus]) as work, (
        get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(desc,)) if workers > 1
        else contextlib.nullcontext(_InProcess(desc))
    ) as pool:
        for split in ["train"] + [s for s in splits if s != "train"]:  # train first: it must keep something
            summaries[split] = s = encode_split(manifests[split], work, desc, features, pool, split)
            print(f"{split}: kept {s['kept']}, rejected {s['rejected']}, {s['minutes']:.1f} min of audio")
            if split == "train" and s["kept"] == 0:  # as the features stage: else training stops later, naming
                # the features stage's summary
                raise SystemExit(f"codes: the train split of {corpus} kept no utterance of "
                                 f"{len(manifests[split])}: nothing for {args.system} to train on")
        (work / CODEC_FILE).write_text(json.dumps(desc, indent=2))
        (work / "summary.json").write_text(json.dumps(summaries, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("codes", main))
