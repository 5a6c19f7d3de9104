"""Transcript normalisation and the SentencePiece BPE tokenizer shared by every system.

The normaliser is also what WER is computed on: lower case, ASCII letters, digits and
apostrophes kept (curly ones made straight), every other character a word break, runs of spaces
collapsed.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

_NOT_WORD = re.compile(r"[^a-z0-9' ]+")
_SPACES = re.compile(r"\s+")
# typographic apostrophes (Whisper writes "don’t"): the ASCII fold would delete them, joining "don" and "t"
_APOSTROPHES = frozenset("\u2018\u2019\u201b\u02bc")
# Latin letters that NFKD leaves whole (they are letters of their own, not a base letter plus an
# accent): the ASCII fold deleted them, turning "Øre" into "re" and "Æsop" into "sop". Each is
# spelled as English text writes it, so "Straße" meets a reference's "strasse".
_SPELLED_OUT = str.maketrans({
    "ß": "ss", "ẞ": "SS", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L",
    "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "TH", "ħ": "h", "Ħ": "H", "ı": "i", "ŧ": "t", "Ŧ": "T",
})
# invisible word breaks of category Cf (format), which the fold would delete, joining the words around them
_INVISIBLE_BREAKS = frozenset("\u200b")


def _fold_punctuation(ch: str) -> str:
    """One character before the ASCII fold: an apostrophe made straight, any other punctuation,
    symbol or space (Unicode categories P*, S*, Z*: dashes, curly quotes, no-break spaces) a space.
    Most of these have no ASCII decomposition, so the fold would delete them and join the words
    around them ("hello—world" -> "helloworld")."""
    if ch in _APOSTROPHES:
        return "'"
    if ch in _INVISIBLE_BREAKS:
        return " "
    return " " if ch != "'" and unicodedata.category(ch)[0] in "PSZ" else ch


def normalise_transcript(text: str) -> str:
    """Canonical form of a transcript: 'Hello,  World!' -> 'hello world'.

    Accents are folded to ASCII (NFKD), Latin letters without an accent-free form spelled out
    ("ß" -> "ss", "ø" -> "o"), punctuation of any script breaks words, quotes that wrap
    words are dropped, and apostrophes inside words are kept ("don't", "don’t").
    """
    if not isinstance(text, str):
        raise TypeError(f"transcript must be a string, got {type(text).__name__}")
    text = "".join(map(_fold_punctuation, unicodedata.normalize("NFKD", text))).translate(_SPELLED_OUT)
    text = text.encode("ascii", "ignore").decode("ascii").lower()
    text = _NOT_WORD.sub(" ", text)
    words = [w.strip("'") for w in text.split()]
    return _SPACES.sub(" ", " ".join(w for w in words if w)).strip()


class BPETokenizer:
    """A thin wrapper over a trained SentencePiece model: ids are 0..vocab_size-1, no specials.

    The union vocabulary of the models puts these ids after their own special tokens,
    so SentencePiece's own <unk>/<s>/</s> are disabled except <unk> (id 0).
    """

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path}: no SentencePiece model (did the bpe stage run?)")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        norm = normalise_transcript(text)
        if not norm:
            raise ValueError(f"transcript {text!r} is empty after normalisation")
        return list(self._sp.encode(norm, out_type=int))

    def unknown_characters(self, text: str) -> list[str]:
        """Characters of ``text`` that :meth:`encode` would turn into <unk> or silently drop.

        These are the characters no piece covers (digits or letters the BPE training text never
        held), and letters or digits that normalisation deletes because they have no ASCII form
        ("ŋ", "ə", CJK). Punctuation, which normalisation drops on purpose, is not reported.

        Returns:
            Each such character once, in order of first appearance: as normalised (lower case,
            accents folded) when it reaches the model, as written when normalisation deletes it.
        """
        norm = normalise_transcript(text)
        unk = self._sp.unk_id()
        known: dict[str, bool] = {}
        found: dict[str, None] = {}  # an ordered set
        for ch in text:
            # an apostrophe (straight or curly) survives only inside a word, so it is judged on the whole text
            apostrophe = _fold_punctuation(ch) == "'"
            folded = ("'" if "'" in norm else "") if apostrophe else normalise_transcript(ch)
            if not folded and ch.isalnum():
                found[ch] = None
            for c in folded:
                if c not in known:  # alone, c encodes as "▁" + c: any <unk> there is c's
                    known[c] = unk not in self._sp.encode(c, out_type=int)
                if not known[c]:
                    found[c] = None
        return list(found)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def min_bpe_vocab_size(sentences: Iterable[str]) -> int:
    """The smallest vocabulary SentencePiece trains on these normalised sentences: with
    ``character_coverage=1.0`` every character needs a piece, and so do the word boundary "▁" and <unk>."""
    return len(set().union(*map(set, sentences)) - {" "}) + 2


def train_bpe(texts: Iterable[str], model_prefix: str | Path, vocab_size: int, seed: int = 0) -> Path:
    """Train a SentencePiece BPE model on normalised transcripts; returns the ``.model`` path.

    Args:
        texts: training transcripts (normalised here).
        model_prefix: output path without extension (``.model`` and ``.vocab`` are written).
        vocab_size: BPE vocabulary size (paper: 4096); more than the transcripts support gives fewer pieces.
        seed: kept for a uniform signature; SentencePiece BPE training is deterministic.

    Raises:
        ValueError: no transcript is left after normalisation, or ``vocab_size`` is below
            :func:`min_bpe_vocab_size` of them (SentencePiece would stop in an internal check).
    """
    import sentencepiece as spm

    del seed
    sentences = [normalise_transcript(t) for t in texts]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("no non-empty transcripts to train BPE on")
    need = min_bpe_vocab_size(sentences)
    if vocab_size < need:
        raise ValueError(
            f"a BPE vocabulary of {vocab_size} is too small for these transcripts: their {need - 2} "
            f"characters, the word boundary and <unk> need {need} pieces"
        )
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        unk_id=0,
        hard_vocab_limit=False,
        # SentencePiece skips longer sentences (default 4192 bytes) with only a log line, which minloglevel
        # hides: a long transcript's characters became <unk>, and a split of long ones an internal error
        max_sentence_length=max(4192, max(len(s.encode()) for s in sentences)),
        num_threads=1,
        minloglevel=2,
    )
    return model_prefix.with_suffix(".model")


def tokenizer_from_bytes(model_proto: bytes) -> BPETokenizer:
    """A tokenizer from a serialised SentencePiece model (as embedded in checkpoints)."""
    import sentencepiece as spm

    tok = BPETokenizer.__new__(BPETokenizer)
    tok.model_path = Path("<embedded>")
    tok._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    return tok
