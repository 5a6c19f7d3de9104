"""The union vocabulary: specials, then BPE text tokens, then codebook codes (MELD) or nothing,
and :class:`UnionEmbedding`, the token table every system embeds text and specials with."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meld.models.backbone import lengths_to_mask

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


class UnionEmbedding(nn.Embedding):
    """The ``vocab.size``-row token table, with the two ways the systems embed tokens.

    A plain ``nn.Embedding`` (its parameter is still ``weight``, so checkpoints and
    initialisation are unchanged); calling it embeds union-vocabulary ids as before.
    """

    def __init__(self, vocab: UnionVocab, d_model: int):
        super().__init__(vocab.size, d_model)
        self.vocab = vocab

    def text_block(self, text: torch.Tensor, text_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A padded block of BPE text.

        Args:
            text: (B, L) 0-based BPE ids (not offset), anything beyond each length.
            text_len: (B,) real tokens per row.

        Returns:
            (B, L, d) embeddings of the union ids (``PAD`` beyond each length), (B, L) real-token mask.
        """
        mask = lengths_to_mask(text_len, text.shape[1])
        ids = torch.where(mask, text + self.vocab.text_offset, torch.full_like(text, PAD))
        return self(ids), mask

    def special(
        self, token: int, batch: int, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One special ``token`` (TTS, STT, ...) for every row: (batch, 1, d) embeddings, (batch, 1) all-True mask."""
        device = device if device is not None else self.weight.device
        ids = torch.full((batch, 1), token, dtype=torch.long, device=device)
        return self(ids), torch.ones(batch, 1, dtype=torch.bool, device=device)

    def tts_sequence(
        self, text: torch.Tensor, text_len: torch.Tensor, frames: torch.Tensor, frame_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """TTS's input layout, ``[text block] <TTS> [frame block]``: every system's training pass and
        generation prompt, so the layout is said once.

        Args:
            text, text_len: as :meth:`text_block` (B, L).
            frames: (B, T, d) the system's own embeddings of its frames (mel, bins or codes; T may be 0).
            frame_valid: (B, T) real frames.

        Returns:
            (B, L+1+T, d) inputs and (B, L+1+T) key_valid; ``<TTS>`` is at index L of every row.
        """
        text_emb, text_valid = self.text_block(text, text_len)
        tts_emb, tts_valid = self.special(TTS, frames.shape[0], frames.device)
        return (torch.cat([text_emb, tts_emb, frames], dim=1),
                torch.cat([text_valid, tts_valid, frame_valid], dim=1))

    def stt_sequence(
        self, frames: torch.Tensor, frame_valid: torch.Tensor,
        text: torch.Tensor | None = None, text_len: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """STT's input layout, ``[frame block] <STT> [text block]`` (training), or up to ``<STT>``
        without ``text`` (a decoding prefill, whose text comes one token at a time).

        Args:
            frames: (B, T, d) frame embeddings; frame_valid: (B, T) real frames.
            text, text_len: as :meth:`text_block`, or None.

        Returns:
            (B, T+1(+L), d) inputs and their key_valid; ``<STT>`` is at index T of every row.
        """
        stt_emb, stt_valid = self.special(STT, frames.shape[0], frames.device)
        parts, valid = [frames, stt_emb], [frame_valid, stt_valid]
        if text is not None:
            text_emb, text_valid = self.text_block(text, text_len)
            parts.append(text_emb)
            valid.append(text_valid)
        return torch.cat(parts, dim=1), torch.cat(valid, dim=1)
