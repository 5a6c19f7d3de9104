"""STT diagnosis of a trained checkpoint: does the decoder read the audio, or recite memorised text?

For each split, on up to ``--utterances`` utterances (no SpecAugment, eval mode):

* text cross-entropy with the right audio and with another utterance's audio (a model that reads
  the audio does much worse with the wrong one; a train/dev gap means memorised transcripts);
* CTC per token and the greedy CTC WER of the frame states read through the output head's text rows
  (only meaningful for a model trained with ``args.stt_ctc``): what the acoustic side alone recognises.

    .venv/bin/python -m bench.stt_diagnose --model models/meld_stt/model.pt --features data/features

Results in docs/results.md (STT runs).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> int:
    from meld.evaluation.metrics import wer_details
    from meld.features import NormStats
    from meld.models.vocab import PAD
    from meld.store import FeatureStore, TrainingData
    from meld.text import tokenizer_from_bytes
    from meld.training import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--features", default="data/features")
    p.add_argument("--splits", nargs="+", default=["train", "dev", "test", "test_unseen"])
    p.add_argument("--utterances", type=int, default=50)
    p.add_argument("--batch", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, state = load_model(args.model)
    model.eval()
    extra = state["extra"]
    stats = NormStats(extra["norm_mean"].numpy(), extra["norm_std"].numpy())
    tok = tokenizer_from_bytes(bytes(extra["bpe_model"].numpy().tobytes()))
    r = int(extra["reduction_factor"])
    offset, n_text = model.vocab.text_offset, model.vocab.n_text
    ctc_rows = torch.cat([torch.tensor([PAD]), torch.arange(offset, offset + n_text)])
    print("| split | text CE (right audio) | text CE (other audio) | CTC/token | CTC greedy WER | utterances |")
    print("|---|---|---|---|---|---|")
    for split in args.splits:
        store = FeatureStore(f"{args.features}/{split}")
        data = TrainingData(store, stats, tok, r)
        n = min(args.utterances, len(store))
        ce = ce_other = ctc = 0.0
        refs, hyps = [], []
        for s in range(0, n, args.batch):
            idx = list(range(s, min(n, s + args.batch)))
            b = data.batch(idx)
            other = dict(b)
            perm = torch.roll(torch.arange(len(idx)), 1)  # each text with its neighbour's audio
            other["mel"], other["mel_len"] = b["mel"][perm], b["mel_len"][perm]
            with torch.no_grad():
                out = model.forward_stt(b["mel"], b["mel_len"], b["text"], b["text_len"])
                ce += F.cross_entropy(out.logits.flatten(0, 1), out.targets.flatten(), ignore_index=PAD).item() * len(idx)
                o = model.forward_stt(other["mel"], other["mel_len"], other["text"], other["text_len"])
                ce_other += F.cross_entropy(o.logits.flatten(0, 1), o.targets.flatten(), ignore_index=PAD).item() * len(idx)
                ctc += model.ctc_loss(out.frame_hidden, b["mel_len"], b["text"], b["text_len"]).item() * len(idx)
                best = F.linear(out.frame_hidden, model.head.weight[ctc_rows], model.head.bias[ctc_rows]).argmax(-1)
            for j, i in enumerate(idx):
                seq = best[j, : int(b["mel_len"][j])].tolist()
                ids = [t - 1 for k, t in enumerate(seq) if t != 0 and (k == 0 or t != seq[k - 1])]  # collapse, drop blanks
                hyps.append(tok.decode(ids))
                refs.append(store.index[i]["text"])
        wer = wer_details(refs, hyps)["wer"]
        print(f"| {split} | {ce / n:.3f} | {ce_other / n:.3f} | {ctc / n:.3f} | {100 * wer:.1f} % | {n} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
