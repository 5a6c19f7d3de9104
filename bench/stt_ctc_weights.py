"""STT WER of one checkpoint at several CTC weights (hybrid CTC/attention beam search), per split.

The evaluation's own path (``pipeline.evaluate.evaluate_stt`` with ``load_stt_model(model, weight)``;
beam, batch and length guard from params.yaml ``evaluate``), repeated per weight, so the weight can
be chosen on ``dev``. A training checkpoint (``checkpoints/step-N.pt``, without the normalisation
and tokenizer a finished ``model.pt`` carries) takes them from ``--features``/stats.json and
``--bpe``.

Run (from the repository root):
    .venv/bin/python -m bench.stt_ctc_weights --model models/meld_stt/model.pt --weights 0,0.3,0.5,0.7,1 --utterances 50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an STT-capable checkpoint trained with args.stt_ctc")
    p.add_argument("--features", default="data/features")
    p.add_argument("--bpe", default="data/bpe/bpe.model", help="only for a training checkpoint")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--weights", default="0,0.3,0.5,0.7,1", help="comma-separated CTC weights in [0, 1]")
    p.add_argument("--utterances", type=int, default=50, help="per split (evaluate.stt_max_utterances)")
    args = p.parse_args(argv)

    from meld.config import EvaluateConfig, load_section
    from meld.store import load_stats
    from meld.text import BPETokenizer
    from pipeline.evaluate import evaluate_stt, load_stt_model

    features = Path(args.features)
    cfg = dataclasses.replace(load_section(args.params, "evaluate", EvaluateConfig),
                              stt_max_utterances=args.utterances)
    # a training checkpoint carries neither normalisation nor tokenizer: load_stt_model takes these then
    stats = load_stats(features / "stats.json") if (features / "stats.json").exists() else None
    tokenizer = BPETokenizer(args.bpe) if Path(args.bpe).exists() else None
    results = {}
    for requested in (float(w) for w in args.weights.split(",")):
        t0 = time.time()
        stt = load_stt_model(args.model, requested, stats=stats, tokenizer=tokenizer)
        weight = stt.ctc_weight  # 0 for a model without a CTC head (load_stt_model logs it)
        out = evaluate_stt(stt, features, cfg)
        results[weight] = {split: v["wer"] for split, v in out.items()}
        per_speaker = {split: v["per_speaker"] for split, v in out.items()}
        print(f"ctc weight {weight:g}: " + ", ".join(f"{s} {w:.1%}" for s, w in results[weight].items())
              + f" ({time.time() - t0:.0f} s)", flush=True)
        for split, by in per_speaker.items():
            print(f"    {split}: " + ", ".join(f"{spk} {w:.1%}" for spk, w in by.items()), flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
