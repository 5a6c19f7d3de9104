"""The bpe stage on transcripts the features stage would reject: it leaves them out and says so."""

from __future__ import annotations

import json

import pytest
import yaml

from meld.config import ConfigError
from meld.text import BPETokenizer, train_bpe
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


def _write_train_manifest(root, texts: list[str]):
    manifest = root / "corpus" / "train" / "manifest.jsonl"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text("".join(json.dumps({"id": f"u{i}", "audio": f"u{i}.wav", "text": t, "speaker": "s"}) + "\n"
                                for i, t in enumerate(texts)))
    return manifest


def _run_stage(root, vocab_size: int) -> int:
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"bpe": {"vocab_size": vocab_size}}))
    return bpe.main(["--params", str(params), "--corpus", str(root / "corpus"), "--out", str(root / "bpe")])


def test_a_vocabulary_too_small_for_the_transcripts_characters_is_a_config_error_naming_what_they_need(tmp_path):
    """SentencePiece needs a piece per character, one for the word boundary and <unk>; fewer used to end the
    stage in SentencePiece's internal check (a RuntimeError traceback). The count the stage names is the
    one SentencePiece applies: it trains at exactly that size."""
    texts = ["abc ab", "cab ba", "dd"]
    need = len(set("".join(texts)) - {" "}) + 2
    manifest = _write_train_manifest(tmp_path, texts)
    with pytest.raises(ConfigError, match=rf"bpe.vocab_size: {need - 1} is too small for .*{manifest}.* {need} pieces"):
        _run_stage(tmp_path, need - 1)
    assert _run_stage(tmp_path, need) == 0
    assert BPETokenizer(tmp_path / "bpe" / "bpe.model").vocab_size == need


def test_a_training_split_without_any_usable_transcript_ends_the_stage_naming_the_manifest(tmp_path, capsys):
    manifest = _write_train_manifest(tmp_path, ["!!!", "   ", "日本語"])
    with pytest.raises(SystemExit, match=rf"bpe: no transcript in {manifest} is left after normalisation"):
        _run_stage(tmp_path, 40)
    assert not (tmp_path / "bpe" / "bpe.model").exists()


def test_a_vocabulary_larger_than_the_transcripts_support_is_trained_smaller_and_said(tmp_path, capsys):
    _write_train_manifest(tmp_path, ["the cat sat", "a cat sat on the mat"])
    assert _run_stage(tmp_path, 5000) == 0
    pieces = BPETokenizer(tmp_path / "bpe" / "bpe.model").vocab_size
    assert pieces < 5000
    assert f"BPE: {pieces} pieces (bpe.vocab_size asks for 5000; the transcripts support no more)" in capsys.readouterr().out


def test_a_transcript_longer_than_sentencepieces_default_limit_still_trains_the_model(tmp_path):
    """SentencePiece skips, without a word at our log level, sentences over 4192 bytes: a long transcript's
    characters became <unk>, and a split of only long transcripts stopped in an internal error."""
    long_text = " ".join(["zebra quiz"] * 500)  # 5,499 bytes
    model = train_bpe(["the cat sat", long_text], tmp_path / "bpe", 40)
    tok = BPETokenizer(model)
    assert tok.unknown_characters("zebra quiz") == []
    assert tok.decode(tok.encode(long_text)) == long_text
    only_long = BPETokenizer(train_bpe([long_text], tmp_path / "only_long", 30))
    assert only_long.decode(only_long.encode(long_text)) == long_text


def test_bpe_training_writes_the_same_model_on_every_run(tmp_path):
    texts = [" ".join(f"w{(i * j) % 37}" for j in range(9)) for i in range(60)]
    first = train_bpe(texts, tmp_path / "bpe", 80).read_bytes()
    (tmp_path / "bpe.model").unlink()
    assert train_bpe(texts, tmp_path / "bpe", 80).read_bytes() == first


@pytest.mark.parametrize("written, normalised", [
    ("Straße", "strasse"), ("STRASSE", "strasse"), ("Æsop's fables", "aesop's fables"), ("œuvre", "oeuvre"),
    ("Øre", "ore"), ("Łódź", "lodz"), ("Þór", "thor"), ("Đorđe", "dorde"), ("hello\u200bworld", "hello world"),
])
def test_latin_letters_without_an_ascii_decomposition_are_spelled_out_not_deleted(written, normalised):
    """NFKD folds "é" to "e" but leaves "ß", "æ", "ø", "ł" whole, and the ASCII fold then deleted them:
    "Øre" became "re" (another word), "Æsop" "sop". A zero-width space, a word break nobody sees, joined
    the words around it."""
    from meld.text import normalise_transcript

    assert normalise_transcript(written) == normalised


def test_a_transliterated_letter_encodes_as_its_spelling_not_as_unknown(tmp_path):
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing strasse".split()
    model = train_bpe([" ".join(words[i:] + words[:i]) for i in range(len(words))], tmp_path / "bpe", 60)
    tok = BPETokenizer(model)
    assert tok.decode(tok.encode("Straße")) == "strasse"
    assert tok.unknown_characters("Straße") == []
