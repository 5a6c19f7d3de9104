"""MELD: discrete latent variables over log-mel frames, TTS and STT in one decoder-only Transformer.

TTS sequence: ``[BPE text] <TTS> x_1 ... x_T`` -> predicts ``z_1 ... z_T <EOS>``
STT sequence: ``x_1 ... x_T <STT> [BPE text]`` -> predicts ``[BPE text] <EOS>``

One softmax over the union vocabulary (specials ∪ BPE ∪ codes). Frames are normalised
log-mel, grouped by the reduction factor r into vectors of 80*r. Padded batches keep each
segment (text, frames) in its own padded block; ``key_valid`` masks the gaps and every
token's position is its index among the real tokens of its own sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from meld.models.backbone import Backbone, KVCache, lengths_to_mask, packed_positions, prepare_for_decoding
from meld.models.layers import (
    ConvFrontEnd,
    MelEncoder,
    Postnet,
    check_continuation_lengths,
    check_finite_frames,
    check_lengths,
    check_voice_perturb,
    group_frames,
    masked_frame_mean,
    spec_augment,
    ungroup_frames,
    voice_perturb,
)
from meld.models.leaving_rows import LeavingRows, row_guards
from meld.models.vocab import EOS, PAD, UnionEmbedding, UnionVocab
from meld.sampling import repetition_penalty, sample, sample_among_top_k, top_k_mask


def select_rows(batch: dict, rows) -> dict:
    """Sub-batch of the given rows, trimmed to its own longest text and frame sequence."""
    sub = {k: v[rows] for k, v in batch.items()}
    sub["mel"] = sub["mel"][:, : int(sub["mel_len"].max())]
    sub["text"] = sub["text"][:, : int(sub["text_len"].max())]
    return sub


def slowness_penalty(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bounded penalty on slowly changing frames: mean over steps of exp(-mean_d (x_t - x_{t-1})^2).

    1 for a static output, towards 0 as consecutive frames differ; in [0, 1] whatever the scale.
    frames: (B, T, D), mask: (B, T) valid frames. A step counts when both of its frames are valid.
    Computed in float32 whatever the frames' dtype, as every other loss (under bf16 autocast the
    postnet's output is bf16, and a bf16 count of valid steps above 256 would round).
    """
    frames = frames.float()
    if frames.shape[1] < 2:
        return frames.new_zeros(())
    step = (frames[:, 1:] - frames[:, :-1]).pow(2).mean(-1)  # (B, T-1)
    valid = (mask[:, 1:] & mask[:, :-1]).to(frames.dtype)
    return (torch.exp(-step) * valid).sum() / valid.sum().clamp_min(1.0)


@dataclass
class TTSOutput:
    logits: torch.Tensor  # (B, T+1, V) step t predicts z_{t+1}, step T_b predicts <EOS>
    targets: torch.Tensor  # (B, T+1) union ids (codes, EOS), PAD beyond
    mel_pre: torch.Tensor  # (B, T, D) reconstruction before the postnet
    mel_post: torch.Tensor  # (B, T, D) after the postnet
    frame_mask: torch.Tensor  # (B, T) real frames


@dataclass
class STTOutput:
    logits: torch.Tensor  # (B, L+1, V) step i predicts text token i+1, step L_b predicts <EOS>
    targets: torch.Tensor  # (B, L+1) union ids, PAD beyond
    frame_hidden: torch.Tensor | None = None  # (B, T, d) hidden states at the frame positions


@dataclass
class Generation:
    frames: list[torch.Tensor]  # per utterance (T_i, D) normalised frames, after the postnet
    hit_max_length: list[bool]  # per utterance: stopped by the guard, not by <EOS>
    codes: list[list[int]]  # per utterance: sampled code indices (0..K-1)


class MELD(nn.Module):
    """The MELD system.

    Args:
        n_text: BPE vocabulary size.
        codebook_size: number of k-means codes K (paper: 8192).
        frame_dim: model frame size, 80 * reduction factor.
        d_model, n_layers, n_heads, d_ff, dropout: backbone (paper: 1024, 12, 16, 4096, 0.2).
        encoder_hidden: width of the mel encoder E's hidden layers.
        encoder_dropout: E's dropout (paper: 0.5), kept on at TTS inference.
        recon_hidden: width of the reconstruction MLP.
        postnet_channels, postnet_kernel, postnet_layers, postnet_dropout: Tacotron-2 postnet.
        q_temperature: tau of q(z|x) = softmax(-||x - c_k||^2 / tau).
        specaug_*: SpecAugment on STT inputs while training (masks in 80-channel frames, before grouping):
            freq_masks bands of up to freq_width channels, time_masks spans of up to
            min(time_width, max_time_fraction * length) frames.
        stt_ctc: auxiliary CTC on the frame states of STT sequences (not in the paper); at inference it
            can join the beam search (``stt_beam_search(ctc_weight=...)``, docs/decisions.md).
        stt_bidirectional_frames: in STT sequences the frames also attend to later frames (a prefix
            LM over the given audio; not in the paper, docs/decisions.md). TTS stays causal.
        stt_frontend_layers, stt_frontend_kernel: residual convolutions over STT's embedded frames
            (0 layers: none, as in the paper; docs/decisions.md).
        stt_voice_warp, stt_speed_perturb, stt_spectral_tilt: random voice changes on STT inputs while
            training, before SpecAugment (:func:`voice_perturb`; 0: off, as in the paper;
            docs/decisions.md).
    """

    system = "meld"

    def __init__(
        self,
        *,
        n_text: int,
        codebook_size: int,
        frame_dim: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        encoder_hidden: int,
        encoder_dropout: float,
        recon_hidden: int,
        postnet_channels: int,
        postnet_kernel: int,
        postnet_layers: int,
        postnet_dropout: float,
        q_temperature: float,
        specaug_freq_masks: int = 2,
        specaug_freq_width: int = 30,
        specaug_time_masks: int = 2,
        specaug_time_width: int = 50,
        specaug_max_time_fraction: float = 0.2,
        stt_ctc: bool = False,
        stt_bidirectional_frames: bool = False,
        stt_frontend_layers: int = 0,
        stt_frontend_kernel: int = 5,
        stt_voice_warp: float = 0.0,
        stt_speed_perturb: float = 0.0,
        stt_spectral_tilt: float = 0.0,
    ):
        super().__init__()
        self.stt_ctc = stt_ctc
        check_voice_perturb(stt_voice_warp, stt_speed_perturb, stt_spectral_tilt)
        self.voice_perturb = dict(max_warp=stt_voice_warp, max_speed=stt_speed_perturb, max_tilt=stt_spectral_tilt)
        self.stt_bidirectional_frames = stt_bidirectional_frames
        self.specaug = dict(freq_masks=specaug_freq_masks, freq_width=specaug_freq_width, time_masks=specaug_time_masks,
                            time_width=specaug_time_width, max_time_fraction=specaug_max_time_fraction)
        self.vocab = UnionVocab(n_text=n_text, n_codes=codebook_size)
        self.frame_dim = frame_dim
        self.q_temperature = q_temperature
        self.register_buffer("codebook", torch.zeros(codebook_size, frame_dim))  # frozen k-means centroids
        self.token_emb = UnionEmbedding(self.vocab, d_model)
        self.encoder = MelEncoder(frame_dim, encoder_hidden, d_model, encoder_dropout)
        self.backbone = Backbone(d_model, n_layers, n_heads, d_ff, dropout)
        self.head = nn.Linear(d_model, self.vocab.size)
        self.recon_linear = nn.Linear(d_model, frame_dim)
        self.recon_mlp = nn.Sequential(
            nn.Linear(2 * d_model, recon_hidden), nn.ReLU(), nn.Linear(recon_hidden, frame_dim)
        )
        self.postnet = Postnet(frame_dim, postnet_channels, postnet_kernel, postnet_layers, postnet_dropout)
        self.stt_frontend = (ConvFrontEnd(d_model, stt_frontend_layers, stt_frontend_kernel)
                             if stt_frontend_layers else None)

    # ------------------------------------------------------------------ pieces
    def set_codebook(self, centroids: torch.Tensor) -> None:
        if centroids.shape != self.codebook.shape:
            raise ValueError(f"codebook shape {tuple(centroids.shape)} != model's {tuple(self.codebook.shape)}")
        self.codebook.copy_(centroids)

    def quantise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample z ~ q(z|x) = softmax(-||x - c||^2 / tau); x (..., D) -> (...,) code indices."""
        d2 = torch.cdist(x.reshape(-1, x.shape[-1]).float(), self.codebook.float()).pow(2)  # (N, K)
        probs = torch.softmax(-d2 / self.q_temperature, dim=-1)
        z = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return z.reshape(x.shape[:-1])

    def reconstruct(self, h: torch.Tensor, codes: torch.Tensor, encoder_dropout: bool | None = None) -> torch.Tensor:
        """x_hat = Linear(h) + MLP([h ; E(c_z)]); h (..., d_model), codes (...,) -> (..., D)."""
        cz = self.encoder(self.codebook[codes], dropout=encoder_dropout)  # (..., d_model)
        return self.recon_linear(h) + self.recon_mlp(torch.cat([h, cz], dim=-1))

    # ------------------------------------------------------------------ training
    def forward_tts(
        self,
        text: torch.Tensor,
        text_len: torch.Tensor,
        mel: torch.Tensor,
        mel_len: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> TTSOutput:
        """Teacher-forced TTS pass.

        Args:
            text: (B, L) BPE ids (0-based, not offset), padded anyhow; text_len: (B,).
            mel: (B, T, D) normalised grouped frames; mel_len: (B,) real frames.
        """
        B, T, _ = mel.shape
        L = text.shape[1]
        frame_valid = lengths_to_mask(mel_len, T)  # (B, T)
        x, valid = self.token_emb.tts_sequence(text, text_len, self.encoder(mel), frame_valid)  # (B, L+1+T, d)
        h = self.backbone(x, packed_positions(valid), valid)  # (B, L+1+T, d)
        h_pred = h[:, L:]  # (B, T+1, d): <TTS> and every frame predict the next frame / <EOS>
        logits = self.head(h_pred)  # (B, T+1, V)

        with torch.no_grad():
            z = self.quantise(mel, generator)  # (B, T)
        targets = torch.full((B, T + 1), PAD, dtype=torch.long, device=mel.device)
        targets[:, :T] = torch.where(frame_valid, z + self.vocab.code_offset, targets[:, :T])
        targets[torch.arange(B, device=mel.device), mel_len] = EOS

        mel_pre = self.reconstruct(h_pred[:, :T], z)  # (B, T, D)
        mel_post = self.postnet(mel_pre, frame_valid)
        return TTSOutput(logits, targets, mel_pre, mel_post, frame_valid)

    def forward_stt(self, mel: torch.Tensor, mel_len: torch.Tensor, text: torch.Tensor, text_len: torch.Tensor) -> STTOutput:
        """Teacher-forced STT pass: frames (no encoder dropout), <STT>, text -> text <EOS>."""
        B, T, _ = mel.shape
        L = text.shape[1]
        frame_valid = lengths_to_mask(mel_len, T)
        x, valid = self.token_emb.stt_sequence(self.embed_stt_frames(mel, frame_valid), frame_valid,
                                               text, text_len)  # (B, T+1+L, d)
        text_valid = valid[:, T + 1:]
        h = self.backbone(x, packed_positions(valid), valid, bidirectional_prefix=self._stt_prefix(T))
        logits = self.head(h[:, T:])  # (B, L+1, V)
        targets = torch.full((B, L + 1), PAD, dtype=torch.long, device=mel.device)
        targets[:, :L] = torch.where(text_valid, text + self.vocab.text_offset, targets[:, :L])
        targets[torch.arange(B, device=mel.device), text_len] = EOS
        return STTOutput(logits, targets, h[:, :T])

    def ctc_loss(self, frame_hidden: torch.Tensor, mel_len: torch.Tensor, text: torch.Tensor,
                 text_len: torch.Tensor) -> torch.Tensor:
        """Auxiliary CTC over BPE tokens at the frame positions of STT sequences (not in the paper).

        Decoder-only STT has to discover by itself which frames each token should attend to; on a small
        corpus the text prefix alone lowers the cross-entropy so well that this takes very long. CTC
        makes the frame states carry the transcript from the start. It reuses the output head's text rows
        (PAD's row as the blank), so it adds no parameters; at inference it can join the beam search
        (:meth:`stt_prefix_with_ctc`, hybrid CTC/attention decoding) or be left out. Causal
        frame states can only emit a token after hearing it, which CTC's free alignment allows.

        Args:
            frame_hidden: (B, T, d) backbone states at the (grouped) frame positions.
            mel_len: (B,) real frames; text: (B, L) BPE ids; text_len: (B,).
        """
        log_probs = self.ctc_log_probs(frame_hidden)  # (T, B, C): blank = 0, BPE id i = i + 1
        return F.ctc_loss(log_probs, text + 1, mel_len, text_len, blank=0, zero_infinity=True)

    def ctc_log_probs(self, frame_hidden: torch.Tensor) -> torch.Tensor:
        """The CTC head: (B, T, d) frame states -> (T, B, 1 + n_text) log-probs; class 0 is the blank
        (PAD's row of the output head), class i + 1 is BPE id i (union id ``text_offset + i``)."""
        offset, n_text = self.vocab.text_offset, self.vocab.n_text
        rows = torch.cat([torch.tensor([PAD], device=frame_hidden.device),
                          torch.arange(offset, offset + n_text, device=frame_hidden.device)])
        logits = F.linear(frame_hidden, self.head.weight[rows], self.head.bias[rows]).float()  # (B, T, 1+n_text)
        return logits.log_softmax(-1).transpose(0, 1)  # (T, B, 1+n_text)

    def uses_every_parameter(self, task: str) -> bool:
        """Whether every batch of a ``task`` run reaches every parameter (DDP may then skip its
        unused-parameter search). TTS does, unless the STT conv front end exists; STT leaves the
        reconstruction and postnet out. A joint run's TTS-only warm-up batches and its half-TTS,
        half-STT batches both reach every parameter without the front end; with it, the warm-up
        leaves the front end out, so such a run is not declared."""
        return task in ("tts", "joint") and self.stt_frontend is None

    def compute_losses(self, batch: dict, task: str = "tts", generator: torch.Generator | None = None) -> dict:
        """Namespaced losses for one batch (unweighted; train_step applies the weights)."""
        if task == "tts":
            out = self.forward_tts(batch["text"], batch["text_len"], batch["mel"], batch["mel_len"], generator)
            ce = F.cross_entropy(out.logits.flatten(0, 1).float(), out.targets.flatten(), ignore_index=PAD)
            target = batch["mel"]
            return {
                "loss/ce": ce,
                "loss/mse_pre": masked_frame_mean((out.mel_pre.float() - target).pow(2), out.frame_mask),
                "loss/mse_post": masked_frame_mean((out.mel_post.float() - target).pow(2), out.frame_mask),
                "loss/slowness": slowness_penalty(out.mel_post, out.frame_mask),
            }
        if task == "stt":
            mel, mel_len = batch["mel"], batch["mel_len"]
            if self.training:
                mel, mel_len = self.augment(mel, mel_len, generator)
            out = self.forward_stt(mel, mel_len, batch["text"], batch["text_len"])
            ce = F.cross_entropy(out.logits.flatten(0, 1).float(), out.targets.flatten(), ignore_index=PAD)
            losses = {"loss/stt_ce": ce}
            if self.stt_ctc:
                losses["loss/stt_ctc"] = self.ctc_loss(out.frame_hidden, mel_len, batch["text"],
                                                       batch["text_len"])
            return losses
        if task == "joint":  # half the batch speaks (TTS), the other half is transcribed (STT)
            B = batch["mel"].shape[0]
            tts_rows, stt_rows = (torch.arange(0, B, 2), torch.arange(1, B, 2)) if B > 1 else ([0], [0])
            losses = self.compute_losses(select_rows(batch, tts_rows), "tts", generator)
            losses.update(self.compute_losses(select_rows(batch, stt_rows), "stt", generator))
            return losses
        raise ValueError(f"unknown task {task!r} (expected 'tts', 'stt' or 'joint')")

    def augment(self, mel: torch.Tensor, mel_len: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Voice perturbation, then SpecAugment, on grouped frames, applied in the 80-channel,
        62.5 Hz view: returns the frames and their (possibly changed) grouped lengths."""
        r = self.frame_dim // 80
        flat, flat_len = ungroup_frames(mel, r), mel_len * r  # (B, T*r, 80)
        # a tempo change keeps whole groups of r frames
        flat, flat_len = voice_perturb(flat, flat_len, length_multiple=r, generator=generator, **self.voice_perturb)
        flat = spec_augment(flat, flat_len, generator=generator, **self.specaug)
        return group_frames(flat, r), flat_len // r

    # ------------------------------------------------------------------ inference
    def _code_logits(self, h: torch.Tensor, tts_head: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits restricted to codes and <EOS>: (B, d) -> (B, 1 + K), column 0 is <EOS>.

        ``tts_head``: :meth:`_tts_head`'s weight and bias, made once per generation, so that a
        step computes only these 1 + K outputs (not the text rows of the union vocabulary).
        """
        if tts_head is not None:
            return F.linear(h, *tts_head)
        logits = self.head(h)
        return torch.cat([logits[:, EOS : EOS + 1], logits[:, self.vocab.code_offset :]], dim=-1)

    def _tts_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The output layer's <EOS> and code rows as one (1 + K, d) weight and (1 + K,) bias, in the
        head weight's own memory order (:func:`prepare_for_decoding` may have transposed it). With
        the paper's 4096 BPE tokens and 8192 codes it is a third less of the largest weight a
        TTS decoding step reads."""
        rows = torch.cat([torch.tensor([EOS]), torch.arange(self.vocab.code_offset, self.vocab.size)]).to(self.head.weight.device)
        weight = self.head.weight.detach()[rows]
        if not self.head.weight.is_contiguous():  # keep the decoding layout: (in, out)-contiguous
            weight = weight.t().contiguous().t()
        return weight, self.head.bias.detach()[rows]

    def tts_prompt(
        self, text: torch.Tensor, text_len: torch.Tensor, prompt: torch.Tensor, prompt_len: torch.Tensor,
        *, test_time_dropout: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sequence a TTS generation starts from: ``[text] <TTS> [prompt frames]``, padded.

        Returns x (B, S, d), valid (B, S) and last (B,), each row's last real token (<TTS> when its
        prompt is empty), whose hidden state predicts the first new frame. :meth:`generate` and the
        benchmarks' baselines (``bench.generation``, ``bench.generation_ratios``) all start here.
        """
        B, P, _ = prompt.shape
        prompt_emb = self.encoder(prompt, dropout=test_time_dropout) if P else prompt.new_zeros(B, 0, self.backbone.d_model)
        x, valid = self.token_emb.tts_sequence(text, text_len, prompt_emb, lengths_to_mask(prompt_len, P))
        return x, valid, text.shape[1] + prompt_len

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
            prompt: (B, P, D) normalised grouped prompt frames; prompt_len: (B,) (0 allowed).
            max_frames: guard on generated (grouped) frames, one for all or one per utterance (each
                stops at its own, as it would alone).
            temperature, top_k, top_p: sampling over codes (the top-k also defines the
                repetition penalty's candidate set).
            repetition_penalty_value: >= 1; penalises last step's top-k candidates.
            test_time_dropout: keep the mel encoder's dropout on (paper: yes).
            zero_latent: ablation: reconstruct with a zero codeword embedding.
            kv_cache_dtype: the KV cache's dtype (None: the weights'; ``backbone.check_cache_dtype``).

        Raises:
            ValueError: a prompt holds NaN or infinity (in its padding too), or a length does not fit
                its tensor (``layers.check_lengths``).
        """
        check_finite_frames(prompt, "MELD.generate: prompt")
        check_continuation_lengths("MELD.generate", text, text_len, prompt, prompt_len)
        prepare_for_decoding(self)
        B = prompt.shape[0]
        max_frames, limits, own_guards = row_guards(max_frames, B)
        device = prompt.device
        x, valid, last = self.tts_prompt(text, text_len, prompt, prompt_len, test_time_dropout=test_time_dropout)
        h_last, cache, next_pos = self.backbone.prefill(x, valid, last, max_frames, cache_dtype=kv_cache_dtype)  # (B, d), cache, (B,)

        rows = LeavingRows(frames=prompt.new_empty(B, max_frames, self.frame_dim),
                           codes=torch.empty(B, max_frames, dtype=torch.long, device=device))
        hit_max = [False] * B
        prev_cand: torch.Tensor | None = None
        # the decoding loop in inference mode: no version counters or view tracking on its ~200 small
        # ops per step, 8 % of a tiny model's batch-1 step on CPU. The cache and buffers were made
        # outside it (updated in place here); what leaves the loop is read-only.
        tts_head = self._tts_head()
        with torch.inference_mode():
            for step in range(max_frames + 1):
                logits = self._code_logits(h_last, tts_head)  # (b, 1+K)
                logits = repetition_penalty(logits, prev_cand, repetition_penalty_value)
                if 0 < top_k < logits.shape[-1]:  # one topk serves the draw and the next step's penalty
                    choice, cand = sample_among_top_k(logits, top_k, temperature=temperature, top_p=top_p,
                                                      generator=generator)
                    prev_cand = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, cand, True)
                else:
                    prev_cand = top_k_mask(logits, top_k) if top_k > 0 else None
                    choice = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                if step == max_frames:  # guard: whoever is still going stops here
                    for i in rows.rows_of:
                        hit_max[i] = True
                    rows.leave([True] * len(rows.rows_of), step)
                    break
                stop = choice == 0  # column 0 is <EOS>
                z = (choice - 1).clamp_min(0)
                x_hat = self.reconstruct(h_last, z, encoder_dropout=test_time_dropout)  # (b, D)
                if zero_latent:
                    x_hat = self.recon_linear(h_last) + self.recon_mlp(torch.cat([h_last, torch.zeros_like(h_last)], -1))
                rows.write(step, frames=x_hat, codes=z)
                stopped = stop.tolist()  # the one host sync per step: the stop check
                if step in own_guards:  # rows whose own guard is this step stop here (before <EOS>, as alone)
                    for row, i in enumerate(rows.rows_of):
                        if limits[i] == step:
                            stopped[row] = hit_max[i] = True
                if any(stopped):
                    idx = rows.leave(stopped, step)
                    if idx is None:
                        break
                    x_hat, next_pos = x_hat[idx], next_pos[idx]
                    prev_cand = prev_cand[idx] if prev_cand is not None else None
                    cache.select(idx)
                emb = self.encoder(x_hat, dropout=test_time_dropout)  # (b, d)
                h_last = self.backbone.step(emb, next_pos, cache)
                next_pos = next_pos + 1

        out = self.postnet.refine_each(rows.outputs["frames"])  # (T_i, D) each
        return Generation(out, hit_max, [c.tolist() for c in rows.outputs["codes"]])

    # ------------------------------------------------------------------ STT inference
    @torch.no_grad()
    def stt_prefix(self, mel: torch.Tensor, mel_len: torch.Tensor, max_new: int) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        """Encode ``x_1..x_T <STT>`` into a fresh cache; returns (h at <STT>, cache, next positions)."""
        h_last, cache, pos, _ = self._stt_prefill(mel, mel_len, max_new)
        return h_last, cache, pos

    @torch.no_grad()
    def stt_prefix_with_ctc(
        self, mel: torch.Tensor, mel_len: torch.Tensor, max_new: int
    ) -> tuple[torch.Tensor, KVCache, torch.Tensor, torch.Tensor]:
        """:meth:`stt_prefix` plus the CTC head's (T, B, 1 + n_text) log-probs over the given frames, for
        hybrid CTC/attention decoding (only meaningful for a model trained with ``stt_ctc``).

        The frame states come from the same prefill pass: frames never attend to ``<STT>`` or the
        text, so they are the states training's CTC saw, whatever is decoded after them.
        """
        h_last, cache, pos, h = self._stt_prefill(mel, mel_len, max_new)
        return h_last, cache, pos, self.ctc_log_probs(h[:, : mel.shape[1]])

    def _stt_prefill(self, mel: torch.Tensor, mel_len: torch.Tensor, max_new: int):
        check_finite_frames(mel, "MELD STT: mel")  # else NaN logits, and the beam search ranks garbage
        check_lengths("MELD STT", "mel_len", mel_len, mel.shape[0], mel.shape[1])
        prepare_for_decoding(self)
        T = mel.shape[1]
        frame_valid = lengths_to_mask(mel_len, T)
        x, valid = self.token_emb.stt_sequence(self.embed_stt_frames(mel, frame_valid), frame_valid)
        # <STT> is every row's last token
        return self.backbone.prefill(x, valid, T, max_new, bidirectional_prefix=self._stt_prefix(T),
                                     return_states=True)

    def embed_stt_frames(self, mel: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
        """STT's frame embeddings: E without dropout (no prenet dropout in STT), then the front end if any."""
        emb = self.encoder(mel, dropout=False)
        return self.stt_frontend(emb, frame_valid) if self.stt_frontend is not None else emb

    def _stt_prefix(self, T: int) -> int:
        """Slots of an STT sequence that attend both ways: the (padded) frame block, when enabled."""
        return T if self.stt_bidirectional_frames else 0

    def stt_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed (b,) union-vocabulary tokens at (b,) positions; returns (b, d) hidden states."""
        return self.backbone.step(self.token_emb(tokens), positions, cache)

    def text_logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """(b, d) -> (b, V) log-probabilities restricted to BPE tokens and <EOS> (others -inf)."""
        logits = self.head(h).float()
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=h.device)
        allowed[EOS] = True
        allowed[self.vocab.text_offset : self.vocab.code_offset] = True
        return logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
