"""dMel (Bai et al. 2024): log-mel discretised per channel into uniform bins, predicted by parallel heads.

TTS sequence: ``[BPE text] <TTS> x_1 ... x_T`` -> predicts ``x_1 ... x_T`` (bins) and ``<EOS>``
STT sequence: ``x_1 ... x_T <STT> [BPE text]`` -> predicts ``[BPE text] <EOS>`` (MELD's recipe)

Every channel c of a (normalised, grouped) frame is a bin index in ``[0, n_bins)`` of the
uniform grid over ``[lo, hi]`` (values outside are clipped to the end bins). A frame enters
the Transformer as the sum over channels of a per-channel bin embedding, and leaves it
through ``80r`` parallel categorical heads (one Linear ``d_model -> 80r * n_bins``).
Decoded frames are bin centres, so the round trip error inside ``[lo, hi]`` is at most half
a bin width.

Stopping: a separate ``<EOS>`` head, a two-way softmax {frame, ``<EOS>``} written as one
logit (its cross-entropy is a binary cross-entropy). Adding an EOS class to each of the 80r
channel heads instead would need a rule to combine 80r independent stop votes and would
take probability mass from every channel's bins; one head keeps the channels' distributions
pure and the stop decision single. At inference the stop is sampled from that two-way
distribution with the same temperature / top-k / top-p as the bins (top-p thus ignores an
``<EOS>`` probability below ``1 - top_p``, as MELD's nucleus does for its ``<EOS>`` code).

Text tokens and the ``<TTS>``/``<STT>``/``<EOS>`` specials share one union vocabulary (no
latent codes), with the same padded-block layout, ``key_valid`` gaps and per-token positions
as :mod:`meld.models.meld`, so :func:`meld.generate.stt_beam_search` works unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meld.features import N_MELS
from meld.models.backbone import Backbone, KVCache, lengths_to_mask, packed_positions, prepare_for_decoding
from meld.models.builders import backbone_kwargs, specaug_kwargs
from meld.models.layers import (
    check_continuation_lengths,
    check_finite_frames,
    check_lengths,
    group_frames,
    spec_augment,
    ungroup_frames,
)
from meld.models.leaving_rows import LeavingRows, row_guards
from meld.models.meld import Generation, STTOutput, select_rows
from meld.models.vocab import EOS, PAD, UnionEmbedding, UnionVocab
from meld.sampling import sample


def discretise(x: torch.Tensor, n_bins: int, lo: float, hi: float) -> torch.Tensor:
    """Uniform bins over [lo, hi]: (..., C) float -> (..., C) int64 in [0, n_bins); outside values clip."""
    width = (hi - lo) / n_bins
    return torch.floor((x.float() - lo) / width).clamp(0, n_bins - 1).long()


def bin_centres(bins: torch.Tensor, n_bins: int, lo: float, hi: float) -> torch.Tensor:
    """(..., C) bin indices -> (..., C) float32 centres ``lo + (b + 0.5) * width``."""
    width = (hi - lo) / n_bins
    return lo + (bins.float() + 0.5) * width


class ChannelEmbedding(nn.Module):
    """Sum over channels of a per-channel bin embedding: (..., C) bins -> (..., d).

    One table of ``C * n_bins`` rows; ``embedding_bag(mode="sum")`` adds the C rows of a frame
    without materialising (..., C, d). Rows start at std ``1/sqrt(C)`` so the sum has unit scale.
    """

    def __init__(self, channels: int, n_bins: int, d_model: int):
        super().__init__()
        self.channels, self.n_bins = channels, n_bins
        self.weight = nn.Parameter(torch.randn(channels * n_bins, d_model) / channels**0.5)
        self.register_buffer("offsets", torch.arange(channels) * n_bins, persistent=False)

    def forward(self, bins: torch.Tensor) -> torch.Tensor:
        lead = bins.shape[:-1]
        flat = (bins + self.offsets).reshape(-1, self.channels)  # (N, C) rows of the shared table
        return F.embedding_bag(flat, self.weight, mode="sum").reshape(*lead, self.weight.shape[1])  # (..., d)


@dataclass
class DMelTTSOutput:
    bin_logits: torch.Tensor  # (B, T, C, n_bins) step t predicts frame t (0-based) from frames < t
    eos_logits: torch.Tensor  # (B, T+1) logit of <EOS> at each step; step T_b should say <EOS>
    bin_targets: torch.Tensor  # (B, T, C) bins of the real frames
    frame_mask: torch.Tensor  # (B, T) real frames
    step_mask: torch.Tensor  # (B, T+1) steps that predict a frame or the <EOS> (t <= T_b)


class DMel(nn.Module):
    """The dMel system.

    Args:
        n_text: BPE vocabulary size.
        frame_dim: channels per model frame, 80 * reduction factor.
        n_bins: uniform bins per channel (dMel: 16).
        lo, hi: range of the bins in normalised log-mel units; values outside are clipped.
        d_model, n_layers, n_heads, d_ff, dropout: backbone.
        specaug_*: SpecAugment on STT inputs while training, as MELD (masks in 80-channel frames,
            applied to the continuous frames before they are discretised).
    """

    system = "dmel"

    def __init__(
        self,
        *,
        n_text: int,
        frame_dim: int,
        n_bins: int,
        lo: float,
        hi: float,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        specaug_freq_masks: int = 2,
        specaug_freq_width: int = 30,
        specaug_time_masks: int = 2,
        specaug_time_width: int = 50,
        specaug_max_time_fraction: float = 0.2,
    ):
        super().__init__()
        self.specaug = dict(
            freq_masks=specaug_freq_masks,
            freq_width=specaug_freq_width,
            time_masks=specaug_time_masks,
            time_width=specaug_time_width,
            max_time_fraction=specaug_max_time_fraction,
        )
        # an infinite end makes the bins infinitely wide: every value would fall in one of them
        if n_bins < 2 or not float("-inf") < lo < hi < float("inf"):
            raise ValueError(f"need n_bins >= 2 and finite lo < hi, got n_bins={n_bins}, lo={lo}, hi={hi}")
        self.vocab = UnionVocab(n_text=n_text, n_codes=0)
        self.frame_dim, self.n_bins, self.lo, self.hi = frame_dim, n_bins, float(lo), float(hi)
        self.token_emb = UnionEmbedding(self.vocab, d_model)
        self.frame_emb = ChannelEmbedding(frame_dim, n_bins, d_model)
        self.backbone = Backbone(d_model, n_layers, n_heads, d_ff, dropout)
        self.bin_head = nn.Linear(d_model, frame_dim * n_bins)
        self.eos_head = nn.Linear(d_model, 1)
        self.text_head = nn.Linear(d_model, self.vocab.size)

    # ------------------------------------------------------------------ pieces
    def discretise(self, mel: torch.Tensor) -> torch.Tensor:
        return discretise(mel, self.n_bins, self.lo, self.hi)

    def decode_bins(self, bins: torch.Tensor) -> torch.Tensor:
        return bin_centres(bins, self.n_bins, self.lo, self.hi)

    def _bin_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.bin_head(h).unflatten(-1, (self.frame_dim, self.n_bins))  # (..., C, n_bins)

    # ------------------------------------------------------------------ training
    def forward_tts(
        self, text: torch.Tensor, text_len: torch.Tensor, mel: torch.Tensor, mel_len: torch.Tensor
    ) -> DMelTTSOutput:
        """Teacher-forced TTS pass; text (B, L) 0-based BPE ids, mel (B, T, C) normalised frames."""
        B, T, _ = mel.shape
        L = text.shape[1]
        bins = self.discretise(mel)  # (B, T, C)
        frame_valid = lengths_to_mask(mel_len, T)
        x, valid = self.token_emb.tts_sequence(text, text_len, self.frame_emb(bins), frame_valid)  # (B, L+1+T, d)
        h = self.backbone(x, packed_positions(valid), valid)[:, L:]  # (B, T+1, d) <TTS> and frames
        step_mask = lengths_to_mask(mel_len + 1, T + 1)
        return DMelTTSOutput(
            bin_logits=self._bin_logits(h[:, :T]),
            eos_logits=self.eos_head(h)[..., 0],
            bin_targets=bins,
            frame_mask=frame_valid,
            step_mask=step_mask,
        )

    def forward_stt(
        self, mel: torch.Tensor, mel_len: torch.Tensor, text: torch.Tensor, text_len: torch.Tensor
    ) -> STTOutput:
        """Teacher-forced STT pass: discretised frames, <STT>, text -> text <EOS>."""
        B, T, _ = mel.shape
        L = text.shape[1]
        frame_valid = lengths_to_mask(mel_len, T)
        x, valid = self.token_emb.stt_sequence(self.frame_emb(self.discretise(mel)), frame_valid,
                                               text, text_len)  # (B, T+1+L, d)
        text_valid = valid[:, T + 1:]
        h = self.backbone(x, packed_positions(valid), valid)
        logits = self.text_head(h[:, T:])  # (B, L+1, V)
        targets = torch.full((B, L + 1), PAD, dtype=torch.long, device=mel.device)
        targets[:, :L] = torch.where(text_valid, text + self.vocab.text_offset, targets[:, :L])
        targets[torch.arange(B, device=mel.device), text_len] = EOS
        return STTOutput(logits, targets)

    def uses_every_parameter(self, task: str) -> bool:
        """Whether a ``task`` batch's loss reaches every parameter: never (TTS leaves the text head
        out, STT the bin and <EOS> heads)."""
        return False

    def compute_losses(
        self, batch: dict, task: str = "tts", generator: torch.Generator | None = None
    ) -> dict:
        """Namespaced, unweighted losses.

        tts: ``loss/ce_channels`` (mean over real frames and channels) and ``loss/eos``
        (binary cross-entropy of the <EOS> head over steps 0..T_b). stt: ``loss/stt_ce``
        (SpecAugment while training, drawn from ``generator``). joint: half the rows each, as MELD.
        """
        if task == "tts":
            out = self.forward_tts(batch["text"], batch["text_len"], batch["mel"], batch["mel_len"])
            targets = out.bin_targets.masked_fill(~out.frame_mask[..., None], -100)
            ce = F.cross_entropy(out.bin_logits.flatten(0, 2).float(), targets.flatten(), ignore_index=-100)
            T = out.bin_targets.shape[1]
            eos_target = (
                torch.arange(T + 1, device=targets.device)[None] == batch["mel_len"][:, None]
            ).float()
            eos = F.binary_cross_entropy_with_logits(out.eos_logits.float(), eos_target, reduction="none")
            m = out.step_mask.float()
            return {"loss/ce_channels": ce, "loss/eos": (eos * m).sum() / m.sum().clamp_min(1.0)}
        if task == "stt":
            mel = self.augment(batch["mel"], batch["mel_len"], generator) if self.training else batch["mel"]
            out = self.forward_stt(mel, batch["mel_len"], batch["text"], batch["text_len"])
            ce = F.cross_entropy(out.logits.flatten(0, 1).float(), out.targets.flatten(), ignore_index=PAD)
            return {"loss/stt_ce": ce}
        if task == "joint":  # half the batch speaks (TTS), the other half is transcribed (STT)
            B = batch["mel"].shape[0]
            tts_rows, stt_rows = (torch.arange(0, B, 2), torch.arange(1, B, 2)) if B > 1 else ([0], [0])
            losses = self.compute_losses(select_rows(batch, tts_rows), "tts", generator)
            losses.update(self.compute_losses(select_rows(batch, stt_rows), "stt", generator))
            return losses
        raise ValueError(f"unknown task {task!r} (expected 'tts', 'stt' or 'joint')")

    def augment(
        self, mel: torch.Tensor, mel_len: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """SpecAugment on grouped frames, applied in the 80-channel view (as MELD)."""
        r = self.frame_dim // N_MELS
        flat = spec_augment(ungroup_frames(mel, r), mel_len * r, generator=generator, **self.specaug)
        return group_frames(flat, r)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(
        self,
        text: torch.Tensor,
        text_len: torch.Tensor,
        prompt: torch.Tensor,
        prompt_len: torch.Tensor,
        *,
        max_frames: int | Sequence[int],
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty_value: float = 1.0,
        test_time_dropout: bool = True,
        zero_latent: bool = False,
        generator: torch.Generator | None = None,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> Generation:
        """Zero-shot TTS continuation, batched and KV-cached; finished utterances leave the batch.

        Args:
            text: (B, L) BPE ids of the full transcript; text_len: (B,).
            prompt: (B, P, C) normalised grouped prompt frames (discretised here); prompt_len: (B,) (0 allowed).
            max_frames: guard on generated frames, one for all or one per utterance (each stops at its
                own, as it would alone).
            temperature, top_k, top_p: per-channel sampling over bins, and the <EOS> decision.
            repetition_penalty_value, test_time_dropout, zero_latent: MELD-only; accepted and ignored.
            kv_cache_dtype: the KV cache's dtype (None: the weights'; ``backbone.check_cache_dtype``).

        Returns:
            Generation with frames = bin centres (T_i, C) and empty ``codes`` (dMel has no latent codes).

        Raises:
            ValueError: a prompt holds NaN or infinity (in its padding too), or a length does not fit
                its tensor (``check_lengths``).
        """
        check_finite_frames(prompt, "DMel.generate: prompt")
        check_continuation_lengths("DMel.generate", text, text_len, prompt, prompt_len)
        B, P, _ = prompt.shape
        prepare_for_decoding(self)
        max_frames, limits, own_guards = row_guards(max_frames, B)
        L = text.shape[1]
        device = prompt.device
        prompt_emb = self.frame_emb(self.discretise(prompt))  # (B, P, d)
        x, valid = self.token_emb.tts_sequence(text, text_len, prompt_emb, lengths_to_mask(prompt_len, P))
        last = L + prompt_len  # each sequence's last real token (<TTS> when P_b == 0)
        h_last, cache, next_pos = self.backbone.prefill(x, valid, last, max_frames, cache_dtype=kv_cache_dtype)  # (B, d), cache, (B,)

        rows = LeavingRows(bins=torch.empty(B, max(max_frames, 0), self.frame_dim, dtype=torch.long, device=device))
        hit_max = [False] * B
        for step in range(max_frames + 1):
            if step == max_frames:  # guard: whoever is still going stops here
                for i in rows.rows_of:
                    hit_max[i] = True
                rows.leave([True] * len(rows.rows_of), step)
                break
            if step in own_guards:  # rows whose own guard (below the batch's) this is stop here, as alone
                done = [limits[i] == step for i in rows.rows_of]
                if any(done):
                    for i, d in zip(rows.rows_of, done):
                        hit_max[i] = hit_max[i] or d
                    idx = rows.leave(done, step)
                    if idx is None:  # the rows with longer guards have already said <EOS>
                        break
                    h_last, next_pos = h_last[idx], next_pos[idx]
                    cache.select(idx)
            b = h_last.shape[0]
            eos_logit = self.eos_head(h_last)  # (b, 1)
            two_way = torch.cat([torch.zeros_like(eos_logit), eos_logit], dim=-1)  # (b, 2): frame, <EOS>
            stop = (
                sample(two_way, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator) == 1
            )
            logits = self._bin_logits(h_last).reshape(b * self.frame_dim, self.n_bins)
            bins = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            bins = bins.view(b, self.frame_dim)  # (b, C)
            rows.write(step, bins=bins)
            stopped = stop.tolist()  # the one host sync per step: the stop check
            if any(stopped):
                idx = rows.leave(stopped, step)
                if idx is None:
                    break
                bins, next_pos = bins[idx], next_pos[idx]
                cache.select(idx)
            h_last = self.backbone.step(self.frame_emb(bins), next_pos, cache)
            next_pos = next_pos + 1

        out = [
            self.decode_bins(f).to(prompt.dtype) if f.shape[0] else prompt.new_zeros(0, self.frame_dim)
            for f in rows.outputs["bins"]
        ]
        return Generation(out, hit_max, [[] for _ in range(B)])

    # ------------------------------------------------------------------ STT inference
    @torch.no_grad()
    def stt_prefix(
        self, mel: torch.Tensor, mel_len: torch.Tensor, max_new: int
    ) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        """Encode ``x_1..x_T <STT>`` into a fresh cache; returns (h at <STT>, cache, next positions).

        Raises:
            ValueError: some row holds NaN or infinity (in its padding too), or a length outside [0, T].
        """
        check_finite_frames(mel, "DMel.stt_prefix: mel")
        check_lengths("DMel.stt_prefix", "mel_len", mel_len, mel.shape[0], mel.shape[1])
        prepare_for_decoding(self)
        T = mel.shape[1]
        x, valid = self.token_emb.stt_sequence(self.frame_emb(self.discretise(mel)), lengths_to_mask(mel_len, T))
        return self.backbone.prefill(x, valid, T, max_new)  # <STT> is every row's last token

    def stt_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed (b,) union-vocabulary tokens at (b,) positions; returns (b, d) hidden states."""
        return self.backbone.step(self.token_emb(tokens), positions, cache)

    def text_logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """(b, d) -> (b, V) log-probabilities restricted to BPE tokens and <EOS> (others -inf)."""
        logits = self.text_head(h).float()
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=h.device)
        allowed[EOS] = True
        allowed[self.vocab.text_offset : self.vocab.code_offset] = True
        return logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)


def dmel_kwargs(
    model_cfg, *, n_text: int, n_bins: int = 16, lo: float = -4.0, hi: float = 4.0
) -> dict[str, Any]:
    """Constructor kwargs of :class:`DMel` from a ModelConfig section and the data sizes.

    Args:
        n_bins: bins per channel (dMel: 16).
        lo, hi: bin range in normalised log-mel units (per-channel z-scores; +-4 keeps all but
            the rarest values inside, and 16 bins then are 0.5 std wide).
    """
    return dict(
        n_text=n_text,
        frame_dim=N_MELS * model_cfg.reduction_factor,
        n_bins=n_bins,
        lo=float(lo),
        hi=float(hi),
        **backbone_kwargs(model_cfg),
        **specaug_kwargs(model_cfg),
    )
