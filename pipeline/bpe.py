"""bpe stage: SentencePiece BPE on the training transcripts.

    python -m pipeline.bpe --params params.yaml --corpus data/corpus --out data/bpe
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meld.config import BPEConfig, ConfigError, load_section, run_stage
from meld.corpus import read_manifest
from meld.text import BPETokenizer, min_bpe_vocab_size, normalise_transcript, train_bpe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--corpus", default="data/corpus")
    p.add_argument("--out", default="data/bpe")
    args = p.parse_args(argv)
    cfg = load_section(args.params, "bpe", BPEConfig)
    manifest = Path(args.corpus) / "train" / "manifest.jsonl"
    rows = read_manifest(manifest)
    # the transcripts the features stage keeps: text that is still there after normalisation ("!!!" is not)
    texts = [t for t in (normalise_transcript(r["text"]) if isinstance(r.get("text"), str) else "" for r in rows) if t]
    if len(texts) < len(rows):
        print(f"BPE: {len(rows) - len(texts)} of {len(rows)} transcripts in {manifest} are empty after normalisation "
              "(the features stage rejects those utterances too): left out")
    if not texts:
        raise SystemExit(f"bpe: no transcript in {manifest} is left after normalisation (of {len(rows)} rows); "
                         "the BPE model is trained on the train split's transcripts")
    need = min_bpe_vocab_size(texts)
    if cfg.vocab_size < need:
        raise ConfigError(f"bpe.vocab_size: {cfg.vocab_size} is too small for the transcripts in {manifest}: their "
                          f"{need - 2} characters, the word boundary and <unk> need {need} pieces")
    model = train_bpe(texts, Path(args.out) / "bpe", cfg.vocab_size)
    tok = BPETokenizer(model)
    sample = texts[:200]
    n_tokens = sum(len(tok.encode(t)) for t in sample)
    # hard_vocab_limit=False: SentencePiece stops merging when no pair is left, below the size asked for
    fewer = (f" (bpe.vocab_size asks for {cfg.vocab_size}; the transcripts support no more)"
             if tok.vocab_size < cfg.vocab_size else "")
    print(f"BPE: {tok.vocab_size} pieces{fewer}; {n_tokens / max(1, len(sample)):.1f} tokens per utterance")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage("bpe", main))
