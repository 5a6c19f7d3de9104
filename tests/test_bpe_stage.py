"""The bpe stage on transcripts the features stage would reject: it leaves them out and says so."""

from __future__ import annotations

import json

import yaml

from meld.text import BPETokenizer
from pipeline import bpe


def test_transcripts_empty_after_normalisation_are_left_out(tmp_path, capsys):
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
    good = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    bad = ["!!!", "日本語", "   ", ""]
    manifest = tmp_path / "corpus" / "train" / "manifest.jsonl"
    manifest.parent.mkdir(parents=True)
    rows = [{"id": f"u{i}", "audio": f"u{i}.wav", "text": t, "speaker": "s"} for i, t in enumerate(bad + good)]
    rows.append({"id": "no-text", "audio": "x.wav", "speaker": "s"})  # no transcript at all
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"bpe": {"vocab_size": 40}}))
    assert bpe.main(["--params", str(params), "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "bpe")]) == 0
    out = capsys.readouterr().out
    assert f"5 of {len(rows)} transcripts in {manifest} are empty after normalisation" in out
    tok = BPETokenizer(str(tmp_path / "bpe" / "bpe.model"))
    assert tok.decode(tok.encode(good[0])) == good[0]
