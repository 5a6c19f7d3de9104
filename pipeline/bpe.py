"""bpe stage: SentencePiece BPE on the training transcripts.

    python -m pipeline.bpe --params params.yaml --corpus data/corpus --out data/bpe
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meld.config import BPEConfig, load_section
from meld.corpus import read_manifest
from meld.text import BPETokenizer, train_bpe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--corpus", default="data/corpus")
    p.add_argument("--out", default="data/bpe")
    args = p.parse_args(argv)
    cfg = load_section(args.params, "bpe", BPEConfig)
    rows = read_manifest(Path(args.corpus) / "train" / "manifest.jsonl")
    model = train_bpe((r["text"] for r in rows if isinstance(r.get("text"), str)), Path(args.out) / "bpe", cfg.vocab_size)
    tok = BPETokenizer(model)
    n_tokens = sum(len(tok.encode(r["text"])) for r in rows[:200] if isinstance(r.get("text"), str) and r["text"].strip())
    print(f"BPE: {tok.vocab_size} pieces; {n_tokens / max(1, min(len(rows), 200)):.1f} tokens per utterance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
