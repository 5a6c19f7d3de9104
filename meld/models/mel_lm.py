"""Mel-LM: the decoder-only Tacotron 2 baseline, and the skeleton it shares with MELLE.

TTS sequence: ``[BPE text] <TTS> x_1 ... x_T``. The hidden state at ``<TTS>`` and at every
frame predicts the next frame by regression and, through a stop predictor, whether the
utterance ends here: step t (0..T) predicts frame t (t < T) and ``stop = [t == T]``.
No sampling: generation is deterministic apart from the prenet's test-time dropout
(Tacotron 2 keeps it on at inference). Losses: MSE on pre- and post-net outputs, the
slowness penalty shared with MELD, and the stop BCE.

Batches follow MELD's layout (``meld/models/meld.py``): padded text and frame blocks,
``key_valid`` masking the gaps, per-token positions; frames are normalised log-mel grouped
by the reduction factor r into vectors of 80*r.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meld.models.backbone import Backbone, lengths_to_mask, packed_positions, prepare_for_decoding
from meld.models.builders import backbone_kwargs, mel_frames_kwargs
from meld.models.layers import (
    MelEncoder,
    Postnet,
    check_continuation_lengths,
    check_finite_frames,
    masked_frame_mean,
)
from meld.models.leaving_rows import LeavingRows, row_guards
from meld.models.meld import Generation, slowness_penalty
from meld.models.vocab import UnionEmbedding, UnionVocab


def stop_bce(logits: torch.Tensor, mel_len: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Stop-predictor loss: BCE over steps 0..T_b, target 1 only at step T_b (after the last frame).

    Args:
        logits: (B, T+1) stop logits; step t has seen frames < t.
        mel_len: (B,) real frames T_b.
        pos_weight: weight of the positive (stop) class, against the 1-in-(T_b+1) imbalance.

    Returns:
        scalar, mean over the B * (T_b + 1) real steps.
    """
    steps = torch.arange(logits.shape[1], device=logits.device)[None, :]  # (1, T+1)
    valid = steps <= mel_len[:, None]  # (B, T+1)
    target = (steps == mel_len[:, None]).float()
    weight = torch.tensor(pos_weight, device=logits.device, dtype=torch.float32)
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=weight, reduction="none")
    return (loss * valid).sum() / valid.sum().clamp_min(1)


def check_tts_task(system: str, task: str) -> None:
    if task != "tts":
        raise ValueError(f"{system} is a TTS-only system: task must be 'tts', got {task!r}")


@dataclass
class FrameGeneration(Generation):
    """A :class:`Generation` that also keeps the frames the model fed back to itself."""

    frames_pre: list[torch.Tensor] = field(default_factory=list)  # per utterance (T_i, D), before the postnet


@dataclass
class MelLMOutput:
    mel_pre: torch.Tensor  # (B, T, D) step t's prediction of frame t, before the postnet
    mel_post: torch.Tensor  # (B, T, D) after the postnet
    stop_logits: torch.Tensor  # (B, T+1) step t: "the utterance ends before frame t"
    frame_mask: torch.Tensor  # (B, T) real frames


class ContinuousFrameLM(nn.Module):
    """Decoder-only TTS over continuous frames with a stop predictor (shared by Mel-LM and MELLE).

    Subclasses add the frame head and implement :meth:`predict_frame` (one generation step's
    frame from a hidden state) and ``compute_losses``.

    Args:
        n_text: BPE vocabulary size.
        frame_dim: model frame size, 80 * reduction factor.
        d_model, n_layers, n_heads, d_ff, dropout: backbone.
        encoder_hidden, encoder_dropout: the prenet (MELD's mel encoder E); its dropout stays on
            at inference unless ``generate(test_time_dropout=False)``.
        postnet_channels, postnet_kernel, postnet_layers, postnet_dropout: Tacotron-2 postnet.
        stop_pos_weight: BCE weight of the stop class.
        stop_threshold: generation ends once sigmoid(stop logit) exceeds it.
    """

    system = ""

    def __init__(
        self,
        *,
        n_text: int,
        frame_dim: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        encoder_hidden: int,
        encoder_dropout: float,
        postnet_channels: int,
        postnet_kernel: int,
        postnet_layers: int,
        postnet_dropout: float,
        stop_pos_weight: float,
        stop_threshold: float,
    ):
        super().__init__()
        if not 0.0 < stop_threshold < 1.0:
            raise ValueError(f"stop_threshold must be in (0, 1), got {stop_threshold}")
        if not 0.0 < stop_pos_weight < float("inf"):  # 0 or less: the stop is never learned (or unlearned)
            raise ValueError(f"stop_pos_weight must be a positive finite number, got {stop_pos_weight}")
        self.vocab = UnionVocab(n_text=n_text)
        self.frame_dim = frame_dim
        self.stop_pos_weight = stop_pos_weight
        self.stop_threshold = stop_threshold  # an inference setting: may be changed on a loaded model
        self.token_emb = UnionEmbedding(self.vocab, d_model)
        self.encoder = MelEncoder(frame_dim, encoder_hidden, d_model, encoder_dropout)
        self.backbone = Backbone(d_model, n_layers, n_heads, d_ff, dropout)
        self.stop_head = nn.Linear(d_model, 1)
        self.postnet = Postnet(frame_dim, postnet_channels, postnet_kernel, postnet_layers, postnet_dropout)

    # ------------------------------------------------------------------ pieces
    def _prefix(
        self,
        text: torch.Tensor,
        text_len: torch.Tensor,
        frames: torch.Tensor,
        frame_len: torch.Tensor,
        encoder_dropout: bool | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed ``[text block] <TTS> [frame block]``: (B, L+1+T, d) inputs and (B, L+1+T) key_valid."""
        T = frames.shape[1]
        frame_emb = self.encoder(frames, dropout=encoder_dropout)  # (B, T, d)
        return self.token_emb.tts_sequence(text, text_len, frame_emb, lengths_to_mask(frame_len, T))

    def tts_hidden(
        self, text: torch.Tensor, text_len: torch.Tensor, mel: torch.Tensor, mel_len: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced backbone pass.

        Returns:
            h: (B, T+1, d) hidden states at ``<TTS>`` and every frame (step t predicts frame t / stop);
            frame_mask: (B, T) real frames.
        """
        L = text.shape[1]
        x, valid = self._prefix(text, text_len, mel, mel_len, encoder_dropout=None)
        h = self.backbone(x, packed_positions(valid), valid)  # (B, L+1+T, d)
        return h[:, L:], valid[:, L + 1 :]

    def uses_every_parameter(self, task: str) -> bool:
        """Whether a ``task`` batch's loss reaches every parameter: always (TTS only; MELLE's KL and
        flux terms are gated by multiplying with 0 before their start steps, which still reaches them)."""
        return True

    def predict_frame(
        self, h: torch.Tensor, *, zero_latent: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(b, d) hidden states -> (b, D) next frames before the postnet (what is fed back)."""
        raise NotImplementedError

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
    ) -> FrameGeneration:
        """Zero-shot TTS continuation, batched and KV-cached; finished utterances leave the batch.

        Each step first asks the stop predictor (sigmoid > ``stop_threshold`` ends the
        utterance without a new frame), then predicts a frame and feeds it back through the prenet.

        Args:
            text: (B, L) BPE ids of the full transcript; text_len: (B,).
            prompt: (B, P, D) normalised grouped prompt frames; prompt_len: (B,) (0 allowed).
            max_frames: guard on generated (grouped) frames, one for all or one per utterance (each
                stops at its own, as it would alone).
            temperature, top_k, top_p, repetition_penalty_value: accepted for a common interface
                and ignored (no categorical sampling here).
            test_time_dropout: keep the prenet's dropout on (Tacotron 2 / MELD: yes).
            zero_latent: MELLE: use the latent mean (epsilon = 0); Mel-LM: ignored.
            generator: MELLE's epsilon draws (prenet dropout uses the global RNG, as in MELD).
            kv_cache_dtype: the KV cache's dtype (None: the weights'; ``backbone.check_cache_dtype``).

        Returns:
            frames after the postnet, ``hit_max_length`` (ran into the guard), empty ``codes``,
            and ``frames_pre`` (what was fed back).

        Raises:
            ValueError: a prompt holds NaN or infinity (in its padding too), or a length does not fit
                its tensor (``check_lengths``).
        """
        what = f"{type(self).__name__}.generate"
        check_finite_frames(prompt, f"{what}: prompt")
        check_continuation_lengths(what, text, text_len, prompt, prompt_len)
        B, P, _ = prompt.shape
        prepare_for_decoding(self)
        max_frames, limits, own_guards = row_guards(max_frames, B)
        L = text.shape[1]
        x, valid = self._prefix(text, text_len, prompt, prompt_len, encoder_dropout=test_time_dropout)
        last = L + prompt_len  # each sequence's last real token (<TTS> when P_b == 0)
        h_last, cache, next_pos = self.backbone.prefill(x, valid, last, max_frames, cache_dtype=kv_cache_dtype)  # (B, d), cache, (B,)

        rows = LeavingRows(frames=prompt.new_empty(B, max(max_frames, 0), self.frame_dim))
        hit_max = [limit <= 0 for limit in limits]
        if 0 in own_guards:  # rows with a zero guard (below the batch's) get no frame, as alone
            idx = rows.leave([limit <= 0 for limit in limits], 0)
            h_last, next_pos = h_last[idx], next_pos[idx]
            cache.select(idx)
        for step in range(max(max_frames, 0)):
            stop = torch.sigmoid(self.stop_head(h_last)[:, 0].float()) > self.stop_threshold  # (b,)
            frame = self.predict_frame(h_last, zero_latent=zero_latent, generator=generator)  # (b, D)
            rows.write(step, frames=frame)
            stopped = stop.tolist()  # the one host sync per step: the stop check
            if any(stopped):
                idx = rows.leave(stopped, step)
                if idx is None:
                    break
                frame, next_pos = frame[idx], next_pos[idx]
                cache.select(idx)
            if step + 1 in own_guards:  # rows whose own guard this is stop with this frame, as alone
                done = [limits[i] == step + 1 for i in rows.rows_of]
                if any(done):
                    for i, d in zip(rows.rows_of, done):
                        hit_max[i] = hit_max[i] or d
                    idx = rows.leave(done, step + 1)
                    if idx is None:
                        break
                    frame, next_pos = frame[idx], next_pos[idx]
                    cache.select(idx)
            if step + 1 == max_frames:  # guard: whoever is still going stops here
                for i in rows.rows_of:
                    hit_max[i] = True
                rows.leave([True] * len(rows.rows_of), step + 1)
                break
            emb = self.encoder(frame, dropout=test_time_dropout)  # (b, d)
            h_last = self.backbone.step(emb, next_pos, cache)
            next_pos = next_pos + 1

        frames_pre = rows.outputs["frames"]  # (T_i, D) each
        frames = self.postnet.refine_each(frames_pre)
        return FrameGeneration(frames, hit_max, [[] for _ in range(B)], frames_pre)


class MelLM(ContinuousFrameLM):
    """Mel-LM: decoder-only Tacotron 2 (prenet -> Transformer -> linear frame projection + stop -> postnet).

    Args: those of :class:`ContinuousFrameLM` (Tacotron 2: plain BCE, ``stop_pos_weight=1``).

    Losses (unweighted; params.yaml ``train.loss_weights``): ``mse_pre``, ``mse_post`` (1 each),
    ``slowness`` (MELD paper: 0.2), ``stop`` (1).
    """

    system = "mel_lm"

    def __init__(
        self,
        *,
        n_text: int,
        frame_dim: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        encoder_hidden: int,
        encoder_dropout: float,
        postnet_channels: int,
        postnet_kernel: int,
        postnet_layers: int,
        postnet_dropout: float,
        stop_pos_weight: float = 1.0,
        stop_threshold: float = 0.5,
    ):
        super().__init__(
            n_text=n_text,
            frame_dim=frame_dim,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            d_ff=d_ff,
            dropout=dropout,
            encoder_hidden=encoder_hidden,
            encoder_dropout=encoder_dropout,
            postnet_channels=postnet_channels,
            postnet_kernel=postnet_kernel,
            postnet_layers=postnet_layers,
            postnet_dropout=postnet_dropout,
            stop_pos_weight=stop_pos_weight,
            stop_threshold=stop_threshold,
        )
        self.frame_head = nn.Linear(d_model, frame_dim)  # Tacotron 2's linear projection

    def predict_frame(
        self, h: torch.Tensor, *, zero_latent: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.frame_head(h)

    def forward_tts(
        self, text: torch.Tensor, text_len: torch.Tensor, mel: torch.Tensor, mel_len: torch.Tensor
    ) -> MelLMOutput:
        """Teacher-forced pass; text (B, L) 0-based BPE ids, mel (B, T, D) normalised grouped frames."""
        T = mel.shape[1]
        h, frame_mask = self.tts_hidden(text, text_len, mel, mel_len)  # (B, T+1, d)
        stop_logits = self.stop_head(h)[..., 0]  # (B, T+1)
        mel_pre = self.frame_head(h[:, :T])  # (B, T, D)
        mel_post = self.postnet(mel_pre, frame_mask)
        return MelLMOutput(mel_pre, mel_post, stop_logits, frame_mask)

    def compute_losses(
        self, batch: dict, task: str = "tts", generator: torch.Generator | None = None
    ) -> dict:
        """Namespaced losses for one batch (unweighted; train_step applies the weights)."""
        check_tts_task(self.system, task)
        out = self.forward_tts(batch["text"], batch["text_len"], batch["mel"], batch["mel_len"])
        target = batch["mel"]
        return {
            "loss/mse_pre": masked_frame_mean((out.mel_pre - target).pow(2), out.frame_mask),
            "loss/mse_post": masked_frame_mean((out.mel_post - target).pow(2), out.frame_mask),
            "loss/slowness": slowness_penalty(out.mel_post.float(), out.frame_mask),
            "loss/stop": stop_bce(out.stop_logits, batch["mel_len"], self.stop_pos_weight),
        }


def mel_lm_kwargs(
    model_cfg, *, n_text: int, stop_pos_weight: float = 1.0, stop_threshold: float = 0.5
) -> dict[str, Any]:
    """Constructor kwargs of :class:`MelLM` from a ModelConfig section and the BPE size.

    ``recon_hidden`` and ``q_temperature`` are MELD's and unused here.
    """
    return dict(
        n_text=n_text,
        **backbone_kwargs(model_cfg),
        **mel_frames_kwargs(model_cfg),
        stop_pos_weight=float(stop_pos_weight),
        stop_threshold=float(stop_threshold),
    )
