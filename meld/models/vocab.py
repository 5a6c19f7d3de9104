"""The union vocabulary: specials, then BPE text tokens, then codebook codes (MELD) or nothing."""

from __future__ import annotations

from dataclasses import dataclass

PAD, EOS, TTS, STT = 0, 1, 2, 3
N_SPECIALS = 4


@dataclass(frozen=True)
class UnionVocab:
    """Index layout of one output softmax over specials ∪ BPE tokens ∪ latent codes."""

    n_text: int
    n_codes: int = 0

    @property
    def text_offset(self) -> int:
        return N_SPECIALS

    @property
    def code_offset(self) -> int:
        return N_SPECIALS + self.n_text

    @property
    def size(self) -> int:
        return N_SPECIALS + self.n_text + self.n_codes

    def text_to_union(self, ids):
        return [int(i) + self.text_offset for i in ids]

    def union_to_text(self, ids) -> list[int]:
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if self.text_offset <= i < self.code_offset:
                out.append(i - self.text_offset)
        return out
